"""Off-policy estimates of a router's accuracy and cost from a decision log (pure functions).

A decision log observes one target per request: the one that answered (``a_i``), its score
``r_i`` (the label, soft allowed) and cost ``c_i``, and the probability ``p_i = mu(a_i | x_i)``
that the logging router (with its epsilon-greedy exploration, ``serving/exploration.py``) sent
the request there. What a *new* router ``pi`` would have scored is estimated from the logged rows
where it agrees with the log, each reweighted by the inverse propensity.

Shapes: ``m`` logged rows (one per logged (query, target) cell), ``T`` targets.

- ``policy``: ``(m, T)`` the new router's choice probabilities ``pi(t | x_i)`` for row ``i``'s
  query (a deterministic router: one-hot of its choice ``pi_i``; ``(m,)`` target indices are
  turned into that), ``action``: ``(m,)`` ``a_i``; ``reward``: ``(m,)`` ``r_i``; ``cost``: ``(m,)``
  ``c_i``; ``propensity``: ``(m,)`` ``p_i``, NaN where the log has none (pinned requests: not
  randomised, so no estimate can use them; excluded and counted); ``Q``: ``(m, T)`` a reward model
  (predicted P(correct) of every target for row ``i``'s query, e.g. the router's own); ``C_hat``:
  ``(m, T)`` a cost model (the price model's expected cost); ``counts``: ``(m,)`` logged decisions
  merged into each row (a repeated prompt sent to one target several times; default 1): every
  sum below weighs row ``i`` by ``d_i = counts[i]``, so the estimates are over requests.
- Importance weight ``w_i = min(1 / p_i, max_weight)``: clipping bounds the variance that a rare
  exploration (``p_i`` of a few percent) would bring, at the price of a downward bias of the
  estimates (IPS, DR) on the clipped rows. ``v_i = pi(a_i | x_i) * w_i`` (for a deterministic
  router ``1[pi_i == a_i] * w_i``).

Estimators (``D = sum_i d_i`` over the rows with a propensity):

- IPS: ``sum_i d_i v_i r_i / D`` (unbiased without clipping when ``p_i > 0`` wherever ``pi`` goes);
- SNIPS: ``sum_i d_i v_i r_i / sum_i d_i v_i`` (self-normalised: less variance, small bias;
  NaN when no row matches);
- DM (direct method): ``sum_i d_i sum_t pi(t | x_i) Q[i, t] / D`` (the reward model alone);
- DR: ``sum_i d_i (sum_t pi(t | x_i) Q[i, t] + v_i (r_i - Q[i, a_i])) / D`` (unbiased when either
  the propensities or ``Q`` are right; exact when ``Q`` is the true reward);
- the same four for cost with ``c`` and ``C_hat``;
- the logging policy itself: ``sum_i d_i r_i / D`` and ``sum_i d_i c_i / D``.

Intervals: a percentile bootstrap over the logged rows (seeded; each replicate reweights the rows
by their draw counts, :func:`training.evaluate.uncertainty.bootstrap_weights`). Diagnostics: the
rows (and decisions) where the router picks the logged target, and Kish's effective sample size
``(sum d v)^2 / sum d v^2`` of the importance weights: far fewer than the matching rows means a
few heavily weighted rows carry the estimate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.evaluate.uncertainty import bootstrap_weights, percentile_interval

ESTIMATORS = ("ips", "snips", "dm", "dr")


def policy_matrix(policy: np.ndarray, n_targets: int) -> np.ndarray:
    """``(m, T)`` choice probabilities: ``policy`` as given when 2-D, else one-hot of its ``(m,)`` indices."""
    policy = np.asarray(policy)
    if policy.ndim == 2:
        return policy.astype(np.float64)
    out = np.zeros((len(policy), n_targets))
    out[np.arange(len(policy)), policy.astype(int)] = 1.0
    return out


def importance_weights(propensity: np.ndarray, max_weight: float = np.inf) -> np.ndarray:
    """``(m,)`` ``min(1 / p, max_weight)``; NaN where ``p`` is NaN. Refuses ``p`` outside (0, 1]."""
    p = np.asarray(propensity, dtype=np.float64)
    bad = ~np.isnan(p) & ((p <= 0) | (p > 1))
    if bad.any():
        raise ValueError(f"propensities must lie in (0, 1]; got {p[bad][:3].tolist()}")
    if not max_weight >= 1:
        raise ValueError(f"max_weight must be >= 1 (a weight of 1 / p is at least 1); got {max_weight}")
    with np.errstate(divide="ignore"):
        return np.minimum(1.0 / p, max_weight)


def _terms(Pi: np.ndarray, action: np.ndarray, outcome: np.ndarray, w: np.ndarray,
           model: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per estimator ``(numerator terms (m,), denominator terms (m,) or None: D)``."""
    rows = np.arange(len(action))
    v = Pi[rows, action] * w
    out = {"ips": (v * outcome, None), "snips": (v * outcome, v)}
    if model is not None:
        direct = (Pi * model).sum(axis=1)
        out["dm"] = (direct, None)
        out["dr"] = (direct + v * (outcome - model[rows, action]), None)
    return out


def _estimate(W: np.ndarray, num: np.ndarray, den: np.ndarray | None, level: float) -> list[float]:
    """``[value, low, high]``: ``W @ num / W @ den`` (``den`` None: ``W.sum``) on the full sample (row 0
    of ``W``) and its percentile interval over the replicates (NaN without replicates)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        est = (W @ num) / (W.sum(axis=1) if den is None else W @ den)
    low, high = percentile_interval(est[1:], level) if len(est) > 1 else (float("nan"), float("nan"))
    return [float(est[0]), low, high]


def _check(action: np.ndarray, arrays: dict[str, Any], m: int) -> None:
    for name, a in arrays.items():
        if a is not None and len(a) != m:
            raise ValueError(f"{name} has {len(a)} rows for {m} logged rows")
    if m and (action.min() < 0):
        raise ValueError("logged target indices must be >= 0")


def off_policy_estimates(policy: np.ndarray, action: np.ndarray, reward: np.ndarray, cost: np.ndarray,
                         propensity: np.ndarray, Q: np.ndarray | None = None, C_hat: np.ndarray | None = None,
                         counts: np.ndarray | None = None, max_weight: float = np.inf, n_boot: int = 1000,
                         level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """A router's off-policy accuracy and cost (see the module docstring for shapes and formulas).

    Returns ``{"accuracy": {est: [value, low, high]}, "cost": {...}}`` for ``est`` in IPS, SNIPS and,
    with ``Q`` (``C_hat`` for cost), DM and DR; and the counts: ``n_rows`` (logged rows given),
    ``n_without_propensity`` (excluded), ``n_used``, ``n_decisions`` (``D``), ``n_match`` (rows where the
    router may pick the logged target: ``pi(a_i | x_i) > 0``), ``n_match_decisions``, ``n_clipped``
    (rows with ``1 / p_i > max_weight``) and ``effective_sample_size``. ``n_boot`` 0: no interval."""
    action = np.asarray(action, dtype=int)
    m = len(action)
    _check(action, {"policy": policy, "reward": reward, "cost": cost, "propensity": propensity, "Q": Q,
                    "C_hat": C_hat, "counts": counts}, m)
    T = max([np.shape(x)[1] for x in (policy, Q, C_hat) if x is not None and np.ndim(x) == 2]
            + [int(action.max()) + 1 if m else 1])
    p = np.asarray(propensity, dtype=np.float64)
    keep = ~np.isnan(p)
    d = np.ones(m) if counts is None else np.asarray(counts, dtype=np.float64)
    Pi = policy_matrix(policy, T)[keep]
    a, w, d = action[keep], importance_weights(p[keep], max_weight), d[keep]
    W = bootstrap_weights(len(a), n_boot, seed) * d if len(a) else np.zeros((1, 0))
    out: dict[str, Any] = {}
    for key, outcome, model in (("accuracy", reward, Q), ("cost", cost, C_hat)):
        outcome = np.asarray(outcome, dtype=np.float64)[keep]
        model = None if model is None else np.asarray(model, dtype=np.float64)[keep]
        out[key] = {est: _estimate(W, num, den, level) for est, (num, den) in _terms(Pi, a, outcome, w, model).items()}
    v = Pi[np.arange(len(a)), a] * w
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = float((d * v).sum() ** 2 / (d * v * v).sum())
    match = Pi[np.arange(len(a)), a] > 0
    return {**out, "n_rows": int(m), "n_without_propensity": int((~keep).sum()), "n_used": int(keep.sum()),
            "n_decisions": int(round(d.sum())), "n_match": int(match.sum()),
            "n_match_decisions": int(round(d[match].sum())),
            "n_clipped": int((1.0 / p[keep] > max_weight).sum()) if len(a) else 0,
            "effective_sample_size": ess if np.isfinite(ess) else 0.0}


def logging_policy_value(reward: np.ndarray, cost: np.ndarray, propensity: np.ndarray,
                         counts: np.ndarray | None = None, n_boot: int = 1000, level: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
    """The logging policy's own accuracy and cost on the rows with a propensity (the rows every
    estimate uses): ``sum_i d_i r_i / D`` and ``sum_i d_i c_i / D`` with percentile bootstrap
    intervals (the same draws as :func:`off_policy_estimates` with the same ``seed``). Returns
    ``{"accuracy": [value, low, high], "cost": [...], "n_used", "n_decisions"}``."""
    keep = ~np.isnan(np.asarray(propensity, dtype=np.float64))
    d = (np.ones(len(keep)) if counts is None else np.asarray(counts, dtype=np.float64))[keep]
    W = bootstrap_weights(len(d), n_boot, seed) * d if len(d) else np.zeros((1, 0))
    return {"accuracy": _estimate(W, np.asarray(reward, dtype=np.float64)[keep], None, level),
            "cost": _estimate(W, np.asarray(cost, dtype=np.float64)[keep], None, level),
            "n_used": int(keep.sum()), "n_decisions": int(round(d.sum()))}
