"""Inverse-propensity weighting of the training loss (training.loop.propensity_weights, fit / tune options)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import BadInput
from training.dataset import RoutingData
from training.loop import TrunkConfig, _tensors, propensity_weights, train_one
from training.objectives import ObjectiveConfig, objective

NAN = np.nan


def test_weights_per_mode():
    Y = np.array([[1.0, NAN], [0.0, 1.0]])
    P = np.array([[0.1, NAN], [NAN, 0.5]])                  # (1, 0): a pinned request's cell, no propensity
    assert propensity_weights(Y, P, "none") is None
    assert propensity_weights(Y, None, "ips") is None
    assert propensity_weights(Y, P, "ips").tolist() == [[pytest.approx(10.0), 0.0], [1.0, 2.0]]
    assert propensity_weights(Y, P, "clipped", clip=4.0).tolist() == [[4.0, 0.0], [1.0, 2.0]]
    with pytest.raises(ValueError, match="<= 0"):
        propensity_weights(Y, np.array([[0.0, NAN], [NAN, 1.0]]), "ips")
    with pytest.raises(ValueError, match="unknown propensity weighting"):
        propensity_weights(Y, P, "snips")


@pytest.mark.parametrize("kind", ["bce", "pairwise", "residual"])
def test_a_cell_of_propensity_0_1_counts_ten_times_one_of_1_0(kind):
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    Y = np.array([[1.0, 0.0], [0.0, NAN]])
    W = propensity_weights(Y, np.array([[0.1, 1.0], [1.0, NAN]]), "ips")  # cell (0, 0): weight 10
    _, y, m = _tensors(np.zeros((2, 1)), Y, W)
    assert m.dtype == torch.float32                        # float weights stay weights, not a bool mask
    weighted = objective(ObjectiveConfig(kind=kind, weight=0.0))(logits, y, m)
    # the same loss over ten copies of cell (0, 0) and one of each other labelled cell
    rep = torch.cat([logits[:1]] * 9 + [logits])
    y_rep = torch.cat([torch.tensor([[1.0, NAN]])] * 9 + [torch.as_tensor(Y, dtype=torch.float32)])
    copies = objective(ObjectiveConfig(kind=kind, weight=0.0))(rep, y_rep, None)
    assert float(weighted) == pytest.approx(float(copies), rel=1e-6)
    plain = objective(ObjectiveConfig(kind=kind, weight=0.0))(logits, y, None)
    assert float(weighted) != pytest.approx(float(plain))


def test_training_with_weights_fits_the_weighted_mean():
    """Identical inputs labelled 1 (propensity 0.1) and 0 (propensity 1.0): the fitted P(correct) goes to
    10 / 11 with the weights, to 1 / 2 without."""
    X = np.ones((40, 2), np.float32)
    Y = np.array([[1.0], [0.0]] * 20)
    W = propensity_weights(Y, np.where(Y == 1.0, 0.1, 1.0), "ips")
    cfg = TrunkConfig(hidden=[4], dropout=[0.0], lr=0.05, batch_size=40, max_epochs=300, patience=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        weighted = train_one(X, Y, W, X, Y, W, seed=0, cfg=cfg).build()
        plain = train_one(X, Y, None, X, Y, None, seed=0, cfg=cfg).build()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        pw, pp = (float(torch.sigmoid(net(torch.as_tensor(X[:1])))[0, 0]) for net in (weighted, plain))
    assert pw == pytest.approx(10 / 11, abs=0.02) and pp == pytest.approx(0.5, abs=0.02)


def _data(logged: bool) -> RoutingData:
    n, T = 6, 2
    Y = np.array([[1.0, NAN], [NAN, 0.0]] * 3)
    return RoutingData(query_ids=np.array([f"q{i}" for i in range(n)]), split=np.array(["train", "val"] * 3),
                       blocks={}, targets=["a", "b"], Y=Y, cost=np.zeros((n, T)), input_tokens=np.zeros((n, T)),
                       output_tokens=np.zeros((n, T)),
                       propensity=np.where(np.isnan(Y), NAN, 0.25) if logged else None,
                       decisions=np.where(np.isnan(Y), 0.0, 1.0) if logged else None)


def test_fit_and_tune_weights_need_propensities():
    from training.fit.run import loss_weights, run_name
    from training.fit.train_ray import TrainRunConfig
    from training.fit.tune import TuneConfig, tune_weights

    data = _data(True)
    tr, va = data.where("train"), data.where("val")
    assert loss_weights(TrainRunConfig(), tr, va) == (None, None)
    Wtr, Wva = loss_weights(TrainRunConfig(propensity_weighting="clipped", propensity_clip=3.0), tr, va)
    assert np.nanmax(Wtr) == 3.0 and Wva[0].tolist() == [0.0, 3.0]
    with pytest.raises(BadInput, match="carry no propensities"):
        loss_weights(TrainRunConfig(propensity_weighting="ips"), _data(False).where("train"), _data(False).where("val"))
    tune = dict(activations="a", labels="l", targets=["a", "b"],
                candidates=[{"blocks": ["h1_last"], "n_components": 2}])
    assert tune_weights(TuneConfig(**tune), data) is None
    assert tune_weights(TuneConfig(**tune, propensity_weighting="ips"), data)[0].tolist() == [4.0, 0.0]
    with pytest.raises(BadInput, match="carry no propensities"):
        tune_weights(TuneConfig(**tune, propensity_weighting="ips"), _data(False))

    X, Y = np.ones((3, 2), np.float32), tr.Y
    cfg = TrainRunConfig()
    assert run_name(cfg, X, Y) == run_name(cfg.model_copy(update={"propensity_weighting": "ips"}), X, Y)
    assert run_name(cfg, X, Y, Wtr) != run_name(cfg, X, Y) != run_name(cfg, X, Y, Wtr * 2)


def test_subset_keeps_the_propensities():
    data = _data(True)
    part = data.subset(np.array([True, False] * 3))
    assert part.logged and part.propensity.shape == (3, 2) and part.decisions.shape == (3, 2)
    assert not _data(False).subset(np.ones(6, bool)).logged
