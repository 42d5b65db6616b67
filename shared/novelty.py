"""The novelty gate: a prompt unlike the router's training prompts is routed by what the router knows of the
targets on average, not by its per-prompt prediction (pure functions and the artifact's record of the gate).

Why. A router trained on a few tasks transfers each task's specialist to prompts of a task it never saw:
held out one task at a time on RouterDC's train + val rows, SmolLM2's router sends every GSM8K prompt to
zephyr (35% right; MetaMath 82%, the strongest generalist 78%) and every HumanEval prompt to zephyr too
(docs/routerdc.md, "Unseen tasks and the novelty gate": ``bench/encoder_combination.py --fold-by task``).
Such prompts lie where the router's inputs are unusual, which its own transforms measure without keeping
any training row.

The score. The router's inputs are per block ``b`` a reduced vector ``z_b`` (``(k_b,)``: standardise -> PCA,
:class:`shared.trunk.FeatureTransform`) or, for an attention-pooled block, a window of reduced token vectors
(``(W, k_b)``, NaN rows for padding, :func:`shared.pooling.reduce_window`). With ``v_b`` ``(k_b,)`` the
variance of each reduced dimension over the training rows (tokens),
``s_b(x) = mean_j z_bj^2 / v_bj`` (a window: the mean of that over its present tokens), and the novelty
``s(x) = mean_b s_b(x)``: a Hotelling T^2 per dimension, about 1 for a typical training prompt.

The gate. ``threshold`` is the ``quantile`` of ``s`` over calibration rows the transforms were not fitted on
(val), so about ``1 - quantile`` of in-distribution prompts pass it. A prompt with ``s > threshold`` gets
``prior`` (``(T,)``, each target's mean score on train + val, task-averaged where tasks are known) as its
P(correct), so every policy routes it as it would route an average prompt (plain argmax: the strongest
generalist; tolerance: the cheapest target near it).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from pydantic import Field

from shared.config import StrictConfig


class NoveltyGate(StrictConfig):
    """The calibrated gate an artifact's policy carries (``meta.policy.novelty``)."""

    quantile: float = Field(gt=0, lt=1, description="Share of the calibration rows at or under the threshold.")
    threshold: float = Field(gt=0, description="Novelty above which a prompt is routed by the prior.")
    variances: dict[str, list[float]] = Field(description="Per block the router reads, each reduced dimension's "
                                                         "variance over the training rows (tokens).")
    prior: list[float] = Field(description="P(correct) per target (artifact order) given to a novel prompt.")
    prior_source: str = Field(description="How the prior was computed (which rows, pooled or task-averaged).")
    n_calibration: int = Field(ge=1, description="Rows the threshold was read from.")


def block_novelty(z: np.ndarray, variance: np.ndarray) -> np.ndarray:
    """``(n,)`` ``mean_j z_j^2 / v_j`` of ``z`` ``(n, k)``, or of ``(n, W, k)`` windows averaged over their
    present (non-NaN) token rows (a window with none: NaN)."""
    z = np.asarray(z, dtype=np.float64)
    v = np.maximum(np.asarray(variance, dtype=np.float64), 1e-12)
    per = (z ** 2 / v).mean(axis=-1)  # (n,) or (n, W); NaN on padded tokens
    if per.ndim == 1:
        return per
    present = ~np.isnan(per)
    total = np.where(present, per, 0.0).sum(axis=1)
    count = present.sum(axis=1)
    return np.divide(total, count, out=np.full(len(per), np.nan), where=count > 0)


def novelty(blocks: Mapping[str, np.ndarray], variances: Mapping[str, Any]) -> np.ndarray:
    """``(n,)`` the mean over ``variances``' blocks of :func:`block_novelty` of ``blocks[name]``."""
    return np.mean([block_novelty(blocks[name], variances[name]) for name in variances], axis=0)


def block_variances(blocks: Mapping[str, np.ndarray]) -> dict[str, list[float]]:
    """Per block, each reduced dimension's variance over rows (``(n, k)``) or present tokens (``(n, W, k)``)."""
    out = {}
    for name, z in blocks.items():
        z = np.asarray(z, dtype=np.float64).reshape(-1, np.shape(z)[-1])
        out[name] = np.nanvar(z[~np.isnan(z).any(axis=1)], axis=0).tolist()
    return out


def reduced_blocks(transform: Any, features: Mapping[str, np.ndarray],
                   transformed: Any = None) -> dict[str, np.ndarray]:
    """What the router's network reads, per block: a :class:`shared.trunk.FeatureTransform`'s output split back
    into its blocks; for a :class:`shared.pooled_head.PooledTransform`, its vector blocks so, and each attn
    block's reduced window as given (``(n, W, k)``). ``transformed``: ``transform.transform(features)`` when the
    caller already has it (the router head does), so it is not computed twice."""
    pooled = hasattr(transform, "dense")
    dense = transform.dense if pooled else transform
    out: dict[str, np.ndarray] = {}
    if dense.names:
        z = transform.transform(features) if transformed is None else transformed
        z, at = (z[0] if pooled else z), 0
        for name, block in zip(dense.names, dense.blocks):
            k = block.components.shape[0]
            out[name], at = z[:, at:at + k], at + k
    for name in transform.spec.names if pooled else []:
        out[name] = np.asarray(features[name])
    return out


def apply_gate(P: np.ndarray, scores: np.ndarray, gate: NoveltyGate | None) -> tuple[np.ndarray, np.ndarray]:
    """``(P', novel)``: ``novel`` ``(n,)`` bool, ``scores > gate.threshold`` (a NaN score is not novel), and
    ``P`` ``(n, T)`` with those rows replaced by ``gate.prior``. No gate: ``P`` unchanged, none novel."""
    P = np.asarray(P, dtype=np.float64)
    if gate is None:
        return P, np.zeros(len(P), dtype=bool)
    novel = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf) > gate.threshold
    if len(gate.prior) != P.shape[1]:
        raise ValueError(f"the novelty gate's prior has {len(gate.prior)} targets, the router {P.shape[1]}")
    return np.where(novel[:, None], np.asarray(gate.prior, dtype=np.float64)[None, :], P), novel


def calibrate(train: Mapping[str, np.ndarray], calibration: Mapping[str, np.ndarray], prior: np.ndarray,
              prior_source: str, quantile: float = 0.95) -> NoveltyGate:
    """The gate from the reduced blocks of the rows the transforms were fitted on (``train``: the variances) and
    of other rows (``calibration``: the threshold, their ``quantile`` of :func:`novelty`); ``prior`` ``(T,)``."""
    variances = block_variances(train)
    scores = novelty(calibration, variances)
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        raise ValueError("the novelty gate needs calibration rows with features")
    return NoveltyGate(quantile=quantile, threshold=max(float(np.quantile(scores, quantile)), 1e-9),
                       variances=variances, prior=[float(p) for p in prior], prior_source=prior_source,
                       n_calibration=len(scores))
