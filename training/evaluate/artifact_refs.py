"""What ``prefill-router evaluate`` reads from the router artifact and writes back into it.

Written back (``meta.json`` only; the weights and their checksums are untouched): the operating
point calibrated on val (``policy.operating_point``) and task-best's task-level choices on
train + val (``training_metrics.task_best``, :meth:`TaskBestRouter.record`). Read back on a
table without train rows (a held-out check, :func:`from_artifact`): always-cheapest from the
artifact's prices, always-best from the best single target fit recorded
(``training_metrics.best_single``), task-best from its record (a task it never saw: the best
single target of train + val).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from training.dataset import RoutingData


def from_artifact(artifact, data: RoutingData, skipped: dict[str, str], meta=None) -> tuple[dict[str, Any],
                                                                                             dict[str, str]]:
    """Routers skipped for want of train rows, from what the artifact knows instead:
    ``({router: preset}, {router: where it came from})``, each found one removed from ``skipped``.
    always-cheapest: the lowest mean price-model cost on these rows (the artifact's prices and
    median answer lengths over the prompts' tokens: what routing knows before any answer; equal:
    the first target); always-best: the best single target the artifact recorded on its train rows
    at fit; task-best: ``(record, target names)`` from ``training_metrics.task_best`` (needs the
    rows' tasks, ``meta``). An older artifact without a record keeps the router skipped."""
    from training.evaluate.scoring import decision_costs

    names, preset, sources = artifact.router.target_names, {}, {}
    recorded = artifact.router.meta.training_metrics
    if "always-cheapest" in skipped:
        mean = decision_costs(artifact.router, data).mean(axis=0)
        j, tied = int(np.argmin(mean)), int(np.isclose(mean, mean.min(), rtol=1e-9, atol=0).sum())
        preset["always-cheapest"] = j
        sources["always-cheapest"] = (f"{names[j]}, the target with the lowest mean cost on these rows under the "
                                      "artifact's prices" + (f" (the first of {tied} tied)" if tied > 1 else ""))
    if "always-best" in skipped:
        best = recorded.get("best_single") or {}
        if best.get("target") in names:
            preset["always-best"] = names.index(best["target"])
            sources["always-best"] = (f"{best['target']}, the best single target on the artifact's "
                                      f"{best.get('n', '?')} {best.get('rows', 'train')} rows (recorded at fit)")
        else:
            skipped["always-best"] += "; the artifact records no best single target (fitted before fit recorded one)"
    if "task-best" in skipped:
        record = recorded.get("task_best")
        if record and meta is not None and any(meta.task):
            preset["task-best"] = (record, names)
            seen = set(np.asarray(meta.task).tolist()) & set(record["groups"])
            sources["task-best"] = (f"each task's best target on the artifact's train + val rows (recorded at "
                                    f"evaluate: {', '.join(f'{g} -> {t}' for g, t in record['groups'].items())}); "
                                    f"a task it never saw -> {record['default']}, the best single target there "
                                    f"({len(seen)} of these rows' tasks were seen)")
        else:
            skipped["task-best"] += ("; the artifact records no task-level choices (evaluate records them when "
                                     "it scores task-best with train rows)" if not record else
                                     "; the rows have no task (give queries=)")
    for name in preset:
        del skipped[name]
    return preset, sources


def write_back(cfg, artifact, op, models) -> bool:
    """Write a calibrated operating point (when configured; the returned bool), the novelty gate evaluate
    calibrated (``novelty_quantile``) and a task-best fitted on train rows into the artifact's ``meta.json``."""
    from shared.artifact import OperatingPoint, update_meta

    fitted = [m for m in models if m.name == "task-best" and m.choice and not m.from_artifact]
    written = cfg.write_operating_point and op.status == "calibrated"
    gated = cfg.novelty_quantile is not None and artifact.router.meta.policy.novelty is not None
    if not (cfg.write_operating_point and (written or fitted or gated)):
        return False
    update: dict[str, Any] = {}
    if written or gated:  # the in-memory policy carries the gate evaluate calibrated (run.set_gate)
        point = OperatingPoint(param=getattr(op, op.policy), **{k: getattr(op, k) for k in (
            "policy", "target_cost", "target_accuracy", "val_accuracy", "val_cost")}) if written else None
        policy = artifact.router.meta.policy
        update["policy"] = policy.model_copy(update={"operating_point": point}) if written else policy
    if fitted:
        update["training_metrics"] = {**artifact.router.meta.training_metrics,
                                      "task_best": fitted[0].record(artifact.router.target_names)}
    update_meta(cfg.artifact, **update)
    return bool(written)
