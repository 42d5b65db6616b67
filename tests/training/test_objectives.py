"""Training objectives (training/objectives.py) and the pairwise AUC (training/metrics.py)."""

import numpy as np
import pytest
import torch

from training.metrics import pairwise_auc
from training.objectives import (OBJECTIVES, ObjectiveConfig, listwise_softmax_loss, objective,
                                 pairwise_logistic_loss, residual_bce_loss)
from shared.trunk import masked_bce_loss


def test_pairwise_auc_weighs_differing_pairs_and_skips_missing_labels():
    Y = np.array([[1.0, 0.0, np.nan], [0.2, 0.8, 0.5]])
    P = np.array([[0.9, 0.1, 0.3], [0.5, 0.5, 0.5]])
    # row 0: one pair, ranked right (weight 1); row 1: constant scores tie every pair (weights .6, .3, .3)
    assert pairwise_auc(Y, P) == pytest.approx((1 + 0.5 * 1.2) / 2.2)
    assert pairwise_auc(Y, -P) == pytest.approx((0 + 0.5 * 1.2) / 2.2)
    assert np.isnan(pairwise_auc(np.ones((3, 2)), np.zeros((3, 2))))  # no pair differs
    # a per-query shift of the scores changes nothing: it reads the order of targets inside a query
    assert pairwise_auc(Y, P + np.array([[5.0], [-3.0]])) == pairwise_auc(Y, P)


def test_ranking_losses_read_only_the_order_inside_a_query_and_skip_missing_labels():
    torch.manual_seed(0)
    s, y = torch.randn(6, 4), torch.rand(6, 4)
    y[0, 1] = float("nan")
    shifted = s + torch.randn(6, 1) * 3
    for loss in (pairwise_logistic_loss, listwise_softmax_loss, residual_bce_loss):
        assert torch.isfinite(loss(s, y, None))
        assert loss(shifted, y, None).item() == pytest.approx(loss(s, y, None).item(), rel=1e-5)
    # a missing label gets no gradient, whatever the logit
    s.requires_grad_(True)
    for loss in (pairwise_logistic_loss, listwise_softmax_loss, residual_bce_loss, masked_bce_loss):
        s.grad = None
        loss(s, y, None).backward()
        assert s.grad[0, 1] == 0 and s.grad.abs().sum() > 0
    # ranked the right way round, the pairwise loss is lower
    good = torch.tensor([[3.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert pairwise_logistic_loss(*good) < pairwise_logistic_loss(-good[0], good[1])
    assert pairwise_logistic_loss(torch.zeros(2, 2), torch.ones(2, 2)) == 0  # no pair differs


def test_objective_registry_and_config():
    assert set(OBJECTIVES) == {"bce", "pairwise", "listwise", "residual", "sample_llm"}
    s, y = torch.randn(5, 3), torch.rand(5, 3)
    assert objective()(s, y).item() == pytest.approx(masked_bce_loss(s, y).item())
    both = objective(ObjectiveConfig(kind="pairwise", weight=2.0))(s, y)
    assert both.item() == pytest.approx((masked_bce_loss(s, y) + 2 * pairwise_logistic_loss(s, y)).item())
    assert ObjectiveConfig(kind="listwise", temperature=0.05).label() == "listwise x1 t0.05"
    with pytest.raises(ValueError, match="unknown objective 'hinge'"):
        ObjectiveConfig(kind="hinge")


def _shared_difficulty_toy(n: int = 3000, seed: int = 0):
    """Two targets share one strong difficulty ``d``; which is better depends on ``b`` (a weaker
    effect): ``P(y_t = 1) = sigmoid(3 d + 0.8 b s_t)``, ``s = (+1, -1)``. Target 0 is the better
    choice exactly when ``b = +1``."""
    rng = np.random.default_rng(seed)
    d, b = rng.normal(size=n), rng.choice([-1.0, 1.0], size=n)
    X = np.column_stack([d, b, rng.normal(size=(n, 6))]).astype(np.float32)
    logit = 3 * d[:, None] + 0.8 * b[:, None] * np.array([1.0, -1.0])
    Y = (rng.random((n, 2)) < 1 / (1 + np.exp(-logit))).astype(float)
    return X, Y, np.where(b > 0, 0, 1)


def test_the_ranking_objective_picks_the_better_target_where_bce_learns_the_difficulty():
    """A trunk with little capacity (one hidden unit here; in practice few labels for many similar
    targets) spends it on what lowers the BCE most, how hard the query is, which does not pick a
    target; the pairwise term is blind to difficulty and spends it on which target is better."""
    from training.loop import TrunkConfig, build_ensemble, train_one

    X, Y, best = _shared_difficulty_toy()
    tr, va, te = slice(0, 2000), slice(2000, 2500), slice(2500, None)
    picked = {}
    for kind in ("bce", "pairwise"):
        cfg = TrunkConfig(hidden=[1], dropout=[0.0], lr=1e-2, batch_size=256, max_epochs=60, patience=8,
                          objective=ObjectiveConfig(kind=kind, weight=5.0))
        members = [train_one(X[tr], Y[tr], None, X[va], Y[va], None, seed=s, cfg=cfg) for s in range(2)]
        P = build_ensemble(members).predict_proba(X[te])
        picked[kind] = (float(np.mean(P.argmax(axis=1) == best[te])), pairwise_auc(Y[te], P))
    assert picked["pairwise"][0] > 0.9 and picked["bce"][0] < 0.65
    assert picked["pairwise"][1] > picked["bce"][1] + 0.15
