"""Off-policy estimators (training.evaluate.off_policy) on synthetic logs whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate.off_policy import (importance_weights, logging_policy_value, off_policy_estimates,
                                          policy_matrix)

T = 3
PRICE = np.array([1.0, 2.0, 5.0])


def uniform_log(m: int, seed: int, soft: bool = False):
    """A uniform logging policy over T targets: ``(Q_true (m, T), action, reward, cost, propensity)``."""
    rng = np.random.default_rng(seed)
    Q = rng.random((m, T))
    a = rng.integers(0, T, size=m)
    p_true = Q[np.arange(m), a]
    r = p_true if soft else (rng.random(m) < p_true).astype(float)
    return Q, a, r, PRICE[a], np.full(m, 1.0 / T)


def new_policy(Q: np.ndarray) -> np.ndarray:
    """A fixed new router: the target with the best true P(correct) minus a cost penalty."""
    return np.argmax(Q - 0.05 * PRICE, axis=1)


def test_ips_snips_dr_cover_the_truth_of_a_fixed_policy():
    Q, a, r, c, p = uniform_log(30_000, seed=0)
    pi = new_policy(Q)
    truth = Q[np.arange(len(pi)), pi].mean()
    noisy_Q = np.clip(Q + np.random.default_rng(1).normal(scale=0.2, size=Q.shape), 0, 1)  # a wrong reward model
    out = off_policy_estimates(pi, a, r, c, p, Q=noisy_Q, C_hat=np.tile(PRICE, (len(a), 1)), n_boot=300)
    for est in ("ips", "snips", "dr"):
        value, low, high = out["accuracy"][est]
        assert low <= truth <= high, (est, value, low, high, truth)
        assert high - low < 0.03
    cost_truth = PRICE[pi].mean()
    for est in ("ips", "snips", "dr"):
        low, high = out["cost"][est][1:]
        assert low <= cost_truth <= high
    assert out["cost"]["dr"][0] == pytest.approx(cost_truth)        # an exact cost model: DR is the truth
    assert out["n_match"] == int((pi == a).sum()) and out["n_without_propensity"] == 0
    assert out["effective_sample_size"] == pytest.approx(out["n_match"])  # equal weights: ESS = matching rows


def test_ips_and_dr_are_unbiased_over_many_logs():
    """Mean over 200 small logs within 4 standard errors of the truth (IPS unclipped, DR with a biased Q)."""
    ips, dr, truths = [], [], []
    for seed in range(200):
        Q, a, r, c, p = uniform_log(300, seed)
        pi = new_policy(Q)
        out = off_policy_estimates(pi, a, r, c, p, Q=np.clip(Q + 0.15, 0, 1), n_boot=0)
        ips.append(out["accuracy"]["ips"][0])
        dr.append(out["accuracy"]["dr"][0])
        truths.append(Q[np.arange(300), pi].mean())
    for values in (np.asarray(ips), np.asarray(dr)):
        err = values - np.asarray(truths)
        assert abs(err.mean()) < 4 * err.std() / np.sqrt(len(err))
    dm = off_policy_estimates(pi, a, r, c, p, Q=np.clip(Q + 0.15, 0, 1), n_boot=0)["accuracy"]["dm"][0]
    assert dm > truths[-1] + 0.1  # the direct method alone inherits the reward model's bias


def test_dr_is_exact_when_q_is_the_true_reward():
    Q, a, r, c, p = uniform_log(2_000, seed=3, soft=True)         # r = Q[i, a_i] exactly
    pi = new_policy(Q)
    out = off_policy_estimates(pi, a, r, c, p, Q=Q, n_boot=50)
    assert out["accuracy"]["dr"][0] == pytest.approx(Q[np.arange(len(pi)), pi].mean(), abs=1e-12)
    assert out["accuracy"]["dm"][0] == pytest.approx(out["accuracy"]["dr"][0], abs=1e-12)
    assert set(out["cost"]) == {"ips", "snips"}                   # no cost model given: no DM / DR of cost


def test_rows_without_propensity_are_excluded_and_counted():
    Q, a, r, c, p = uniform_log(1_000, seed=4)
    pi = new_policy(Q)
    base = off_policy_estimates(pi, a, r, c, p, Q=Q, n_boot=100, seed=7)
    pinned = 37                                                    # pinned requests: absurd scores, no propensity
    extra = dict(policy=np.concatenate([pi, np.zeros(pinned, int)]), action=np.concatenate([a, np.zeros(pinned, int)]),
                 reward=np.concatenate([r, np.full(pinned, 100.0)]), cost=np.concatenate([c, np.full(pinned, 1e3)]),
                 propensity=np.concatenate([p, np.full(pinned, np.nan)]),
                 Q=np.concatenate([Q, np.ones((pinned, T))]))
    got = off_policy_estimates(**extra, n_boot=100, seed=7)
    assert got["accuracy"] == base["accuracy"] and got["cost"] == base["cost"]
    assert (got["n_rows"], got["n_without_propensity"], got["n_used"]) == (1_037, 37, 1_000)
    lp = logging_policy_value(extra["reward"], extra["cost"], extra["propensity"], n_boot=20)
    assert lp["accuracy"][0] == pytest.approx(r.mean()) and lp["n_used"] == 1_000


def test_clipping_bounds_the_weights_and_counts_the_clipped_rows():
    # two logged rows: an explored one (p = 0.01, weight 100) and a usual one (p = 0.9)
    action, reward, p = np.array([1, 0]), np.array([1.0, 1.0]), np.array([0.01, 0.9])
    pi = np.array([1, 0])                                          # the new router agrees with both
    raw = off_policy_estimates(pi, action, reward, np.ones(2), p, n_boot=0)
    clipped = off_policy_estimates(pi, action, reward, np.ones(2), p, max_weight=20.0, n_boot=0)
    assert raw["accuracy"]["ips"][0] == pytest.approx((100 + 1 / 0.9) / 2)
    assert clipped["accuracy"]["ips"][0] == pytest.approx((20 + 1 / 0.9) / 2)
    assert clipped["accuracy"]["snips"][0] == pytest.approx(1.0)   # self-normalised: the weights cancel
    assert (raw["n_clipped"], clipped["n_clipped"]) == (0, 1)
    assert importance_weights(np.array([0.5, np.nan, 0.01]), 10.0).tolist()[::2] == [2.0, 10.0]
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        importance_weights(np.array([0.0]))
    with pytest.raises(ValueError, match="max_weight"):
        importance_weights(np.array([0.5]), 0.5)


def test_counts_weigh_a_row_as_that_many_decisions():
    Q, a, r, c, p = uniform_log(50, seed=5)
    pi = new_policy(Q)
    counts = np.random.default_rng(0).integers(1, 4, size=50)
    merged = off_policy_estimates(pi, a, r, c, p, Q=Q, counts=counts, n_boot=0)
    rep = np.repeat(np.arange(50), counts)
    expanded = off_policy_estimates(pi[rep], a[rep], r[rep], c[rep], p[rep], Q=Q[rep], n_boot=0)
    for key in ("accuracy", "cost"):
        for est, v in merged[key].items():
            assert v[0] == pytest.approx(expanded[key][est][0])
    assert merged["n_decisions"] == counts.sum() and merged["n_used"] == 50
    assert merged["effective_sample_size"] == pytest.approx(expanded["effective_sample_size"])


def test_a_stochastic_router_and_seeded_intervals():
    Q, a, r, c, p = uniform_log(500, seed=6)
    uniform = np.full((500, T), 1.0 / T)                           # the logging policy itself, as choice weights
    out = off_policy_estimates(uniform, a, r, c, p, n_boot=100, seed=1)
    assert out["accuracy"]["ips"][0] == pytest.approx(r.mean()) and out["n_match"] == 500
    assert out == off_policy_estimates(uniform, a, r, c, p, n_boot=100, seed=1)
    assert out != off_policy_estimates(uniform, a, r, c, p, n_boot=100, seed=2)
    assert set(out["accuracy"]) == {"ips", "snips"}                # no reward model: no DM / DR
    assert policy_matrix(np.array([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]


def test_no_matching_row_leaves_snips_undefined():
    out = off_policy_estimates(np.array([0, 0]), np.array([1, 1]), np.ones(2), np.ones(2), np.array([0.5, 0.5]),
                               n_boot=10)
    assert out["accuracy"]["ips"][0] == 0.0 and np.isnan(out["accuracy"]["snips"][0])
    assert out["n_match"] == 0 and out["effective_sample_size"] == 0.0
    empty = off_policy_estimates(np.zeros(1, int), np.zeros(1, int), np.ones(1), np.ones(1), np.array([np.nan]))
    assert empty["n_used"] == 0 and np.isnan(empty["accuracy"]["ips"][0])
