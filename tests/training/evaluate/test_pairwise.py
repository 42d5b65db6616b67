"""The pairwise AUC part of the evaluation report (training/evaluate/pairwise.py)."""

import numpy as np
import pytest

from training.evaluate.pairwise import pairwise_lines, pairwise_scores
from training.evaluate.uncertainty import paired_bootstrap_pairwise_margin
from training.metrics import pairwise_auc


def _queries(n: int = 400, seed: int = 0):
    """Three targets; the best one for a query is its ``best`` column (label 1, the others 0 or 1)."""
    rng = np.random.default_rng(seed)
    best = rng.integers(0, 3, size=n)
    Y = (rng.random((n, 3)) < 0.3).astype(float)
    Y[np.arange(n), best] = 1.0
    tasks = np.where(np.arange(n) < n // 2, "alpha", "beta")
    return Y, best, tasks, rng


def test_a_router_that_knows_the_better_target_wins_the_pairwise_margin():
    Y, best, tasks, rng = _queries()
    knows = rng.random(Y.shape) * 0.5
    knows[np.arange(len(Y)), best] += 0.5
    difficulty = np.repeat(rng.random((len(Y), 1)), 3, axis=1)  # how hard a query is, the same for every target
    out = pairwise_scores(Y, {"ours": knows, "difficulty": difficulty}, "ours", n_boot=200, tasks=tasks)
    table, margin = out["pairwise_auc"], out["pairwise_margin"]["difficulty"]
    assert table["difficulty"]["mean"] == pytest.approx(0.5)  # constant within a query: no knowledge
    assert table["ours"]["mean"] > 0.8 and set(table["ours"]["by_task"]) == {"alpha", "beta"}
    assert table["ours"]["by_task"]["alpha"] == pytest.approx(pairwise_auc(Y[:200], knows[:200]))
    assert margin["margin"] == pytest.approx(table["ours"]["mean"] - 0.5)
    assert 0 < margin["low"] <= margin["margin"] <= margin["high"] and margin["p_le_zero"] == 0
    md = "\n".join(pairwise_lines(out))
    assert "| ours | " in md and "| alpha | beta |" in md and "| difficulty | +" in md
    # one task: no per-task columns; no bootstrap: no margins
    flat = pairwise_scores(Y, {"ours": knows}, "ours", n_boot=0, tasks=np.full(len(Y), "alpha"))
    assert flat["pairwise_auc"]["ours"]["by_task"] == {} and flat["pairwise_margin"] == {}


def test_the_pairwise_margin_interval_covers_zero_for_two_equal_routers():
    Y, _, tasks, rng = _queries(seed=1)
    P, Q = rng.random(Y.shape), rng.random(Y.shape)  # two routers that know nothing
    m = paired_bootstrap_pairwise_margin(Y, P, Q, n_boot=300, groups=tasks)
    assert m["low"] < 0 < m["high"] and 0.05 < m["p_le_zero"] < 0.95
    assert m["margin"] == pytest.approx(pairwise_auc(Y, P) - pairwise_auc(Y, Q))
