"""The adapted encoder as one more of tune's candidates: cross-validated on tune's own folds and score, and
written only when it beats tune's choice (``prefill-router adapt tune_report=...``, the pipeline's adapt stage).

Tune (:mod:`training.fit.tune`) scores each frozen-feature candidate on K group folds of train + val
(:func:`training.cv.split_folds`) and chooses by ``choose_by``. Here the adapted blocks (and a trunk) are
trained once per fold on the same training rows, early-stopped on the same rows, and their held-out
predictions scored by the same function (:func:`training.cv.score_folds`). The adapted candidate is chosen
when its ``choose_by`` exceeds tune's chosen candidate's by more than ``margin``; only then is it trained on
the train split (early-stopped on val) and written as the router artifact.

Differences from a tune candidate, stated in the report: one adapted model per fold (a tune candidate is an
ensemble of ``seeds`` members), and the adapted model reads its window of the last tokens.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from shared import storage
from shared.errors import BadInput
from training.adapt.inputs import load_windows
from training.adapt.model import AdaptInputs, predict_proba
from training.adapt.train import fit_adapted
from training.cv import fold_groups, row_tasks, score_folds, score_row, split_folds
from training.dataset import RoutingData, load_routing_data

log = logging.getLogger(__name__)
REPORT = "adapt.json"


def adapt_fold(model: Any, spec: Any, windows: AdaptInputs, frozen: dict[str, np.ndarray], tr: np.ndarray,
               es: np.ndarray, held: np.ndarray, n_components: int, train: Any, label: str) -> tuple[np.ndarray, Any]:
    """One fold: the adapted blocks and a trunk trained on rows ``tr``, early-stopped on ``es``; returns
    ``(P (len(held), T) of the held rows, the fit's TrainResult)``. ``model``: the encoder's causal LM."""
    fit = fit_adapted(model, spec, windows, frozen, tr, es, n_components, train, label=label)
    P = predict_proba(fit.adapter, fit.transform, fit.trunk, windows.take(held), {b: x[held] for b, x in frozen.items()})
    return P, fit.result


def tune_rows(cfg: Any, tune: dict[str, Any]) -> RoutingData:
    """The rows tune scored (its splits, in the capture's order), with ``cfg.frozen_blocks``; refuses rows
    that differ from tune's count (another capture or labels than tune read)."""
    data = load_routing_data(cfg.activations, cfg.labels, cfg.targets, cfg.frozen_blocks or None)
    data = data.where(*tune["config"]["splits"])
    if len(data.query_ids) != tune["n_rows"] or list(data.targets) != list(tune["config"]["targets"]):
        raise BadInput(f"{cfg.tune_report} scored {tune['n_rows']} rows of {tune['config']['targets']}; "
                       f"{cfg.activations} with {cfg.labels} give {len(data.query_ids)} rows of {list(data.targets)}: "
                       "run tune and adapt on the same capture, labels and targets")
    return data


def cross_validate(cfg: Any, tune: dict[str, Any]) -> dict[str, Any]:
    """The adapted candidate's row, scored as tune scores its candidates (same rows, folds and scores)."""
    from shared.adapter import AdapterSpec
    from shared.models import load_causal_lm
    from shared.progress import Progress
    from shared.registry import load_registry
    from training.router_meta import encoder_info

    t = tune["config"]
    data = tune_rows(cfg, tune)
    windows, window = load_windows(cfg, data)
    spec = AdapterSpec(from_layer=cfg.from_layer, n_blocks=cfg.n_blocks, window=window, poolings=cfg.poolings)
    lm = load_causal_lm(load_registry(cfg.registry).encoder(encoder_info(cfg.activations)["name"]), device="cpu")
    frozen, start, predictions, fits = {b: data.blocks[b] for b in cfg.frozen_blocks}, time.perf_counter(), [], []
    splits = list(split_folds(len(data.Y), fold_groups(data, t["queries"]), t["folds"], t["seed"],
                              t["early_stop_share"]))
    with Progress(len(splits), "adapt: cross-validating on tune's folds", "folds") as progress:
        for k, (tr, es, held) in enumerate(splits):
            P, result = adapt_fold(lm.model, spec, windows, frozen, tr, es, held, cfg.n_components, cfg.train,
                                   f"fold {k + 1}")
            predictions.append((held, P))
            fits.append({"start_val_loss": result.start_val_loss, "val_loss": result.val_loss,
                         "seconds": round(result.seconds, 1)})
            progress.update(1, detail=f"fold {k + 1}: val loss {result.start_val_loss:.5f} -> {result.val_loss:.5f}")
    label = "+".join(spec.block_names() + list(cfg.frozen_blocks)) + f" / {cfg.n_components} (adapted)"
    return {"label": label, "blocks": spec.block_names() + list(cfg.frozen_blocks), "n_components": cfg.n_components,
            "objective": cfg.train.objective.model_dump(), "adapter": spec.model_dump(), "folds": fits,
            "seconds": round(time.perf_counter() - start, 1),
            **score_row(score_folds(data.Y, predictions, row_tasks(data, t["queries"])), data.targets)}


def choose(cfg: Any) -> dict[str, Any]:
    """Cross-validate the adapted candidate against ``cfg.tune_report``'s choice; write ``adapt.json`` under
    ``cfg.cv_out`` and return it: ``chosen`` (True: train and write the artifact), both rows and the reason."""
    tune = storage.read_json(cfg.tune_report)
    key, best = tune["config"]["choose_by"], tune["best"]
    row = cross_validate(cfg, tune)
    if not np.isfinite(row.get(key, np.nan)):
        raise BadInput(f"the adapted candidate has no cross-validated {key} (too few rows or tasks?)")
    chosen = bool(row[key] > best[key] + cfg.margin)
    reason = (f"adapted {key} {row[key]:.4f} {'>' if chosen else '<='} tune's choice {best['label']} "
              f"{best[key]:.4f} + margin {cfg.margin:g}")
    report = {"choose_by": key, "margin": cfg.margin, "chosen": chosen, "reason": reason, "adapted": row,
              "tune_best": best, "n_rows": tune["n_rows"], "tune_report": cfg.tune_report,
              "note": "one adapted model per fold; tune's candidates are ensembles of "
                      f"{tune['config']['seeds']} members per fold"}
    storage.write_json(storage.join(cfg.cv_out, REPORT), report)
    log.info("adapt: %s (%s)", "chosen" if chosen else "not chosen", reason)
    return report
