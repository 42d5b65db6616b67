"""RouterDC's sample-LLM contrastive loss (training/objectives.py, objective ``sample_llm``) on toys."""

import math

import numpy as np
import pytest
import torch

from shared.errors import BadInput
from training.objectives import ObjectiveConfig, TargetEmbeddings, objective, sample_llm_contrastive_loss

NAN = float("nan")


def test_value_by_hand_top_and_bottom_sets_ties_and_missing_labels():
    y = torch.tensor([[1.0, 0.0, 0.5, NAN], [0.0, 0.0, 0.0, 0.0]])
    s = torch.tensor([[2.0, -1.0, 0.0, 5.0], [1.0, 2.0, 3.0, 4.0]])
    # query 0: top-1 = target 0, bottom-1 = target 1 (target 3 is missing: in neither set); query 1: all tie
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + math.exp(-1.0)))
    assert float(sample_llm_contrastive_loss(s, y, None, 1, 1)) == pytest.approx(expected, rel=1e-6)
    # top-2 = {0, 2}, bottom-2 = {1, 2}: positive 0 against {1, 2}, positive 2 against {1} (2 does not beat itself)
    two = (-math.log(math.exp(2) / (math.exp(2) + math.exp(-1) + math.exp(0))) -
           math.log(math.exp(0) / (math.exp(0) + math.exp(-1)))) / 2
    assert float(sample_llm_contrastive_loss(s, y, None, 2, 2)) == pytest.approx(two, rel=1e-6)
    assert float(sample_llm_contrastive_loss(s[1:], y[1:], None, 1, 1)) == 0.0  # every target ties: no signal


def test_gradient_pulls_towards_the_best_and_away_from_the_worst():
    y = torch.tensor([[0.9, 0.1, 0.5]])
    s = torch.zeros(1, 3, requires_grad=True)
    sample_llm_contrastive_loss(s, y, None, 1, 1).backward()
    g = s.grad[0]
    assert g[0] < 0 < g[1] and g[2] == 0  # descent raises the best's similarity, lowers the worst's


def test_learned_embeddings_route_each_query_to_its_best_target():
    """Queries of three kinds, each best served by a different target: training the query embeddings'
    map and the target embeddings on the contrastive loss alone makes argmax similarity the best target."""
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 3, size=300)
    x = torch.as_tensor(np.eye(3)[kind] + 0.3 * rng.normal(size=(300, 3)), dtype=torch.float32)
    y = torch.as_tensor(np.where(np.eye(3)[kind] > 0, 0.9, 0.2) + 0.05 * rng.random((300, 3)), dtype=torch.float32)
    torch.manual_seed(0)
    encoder, keys = torch.nn.Linear(3, 8), TargetEmbeddings(8, 3, temperature=0.1)
    before = float(sample_llm_contrastive_loss(keys(encoder(x)), y, None, 1, 1).detach())
    opt = torch.optim.Adam(list(encoder.parameters()) + list(keys.parameters()), lr=0.05)
    for _ in range(100):
        opt.zero_grad()
        sample_llm_contrastive_loss(keys(encoder(x)), y, None, 1, 1).backward()
        opt.step()
    with torch.no_grad():
        sim = keys(encoder(x))
    assert float(sample_llm_contrastive_loss(sim, y, None, 1, 1)) < 0.2 * before
    assert (sim.argmax(dim=1).numpy() == kind).mean() > 0.95
    assert sim.abs().max() <= 1 / 0.1 + 1e-4  # cosine / temperature


def test_objective_adds_the_bce_and_needs_an_embedding():
    cfg = ObjectiveConfig(kind="sample_llm", weight=2.0, temperature=0.2, top_k=1, bottom_k=1)
    obj = objective(cfg)
    assert obj.needs_embedding and not objective(ObjectiveConfig()).needs_embedding
    assert cfg.label() == "sample_llm x2 t0.2 top1 bottom1"
    logits, y, sim = torch.zeros(2, 3), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, NAN]]), torch.randn(2, 3)
    expected = objective(ObjectiveConfig())(logits, y) + 2.0 * sample_llm_contrastive_loss(sim, y, None, 1, 1)
    assert float(obj(logits, y, None, sim)) == pytest.approx(float(expected))
    with pytest.raises(BadInput, match="prefill-router adapt"):
        obj(logits, y)
