"""``prefill-router adapt``: fine-tune the encoder's top blocks on the routing labels -> a router artifact.

Reads a capture made with ``token_layers=[L]`` (the last ``token_window`` states of layer ``L`` per prompt, so
the frozen lower layers ran once, at capture) and the labels; copies the encoder's pretrained blocks
``L+1..L+k`` (:class:`shared.adapter.AdaptedTop`), trains them with a SharedTrunkNet end to end on the
**train** split, early-stopped on **val** (:mod:`training.adapt.train`), and writes a self-contained artifact:
encoder identity, the transform over ``frozen_blocks`` and the adapted blocks ``h{L+k}a{L}_{pooling}``, the
trunk (one member) and ``adapter.safetensors``. The Encoder replica serves it: the frozen encoder runs to
layer ``L`` (its prefix cache still used), the adapted blocks over the last ``window`` states.

    prefill-router adapt activations=runs/x/activations labels=runs/x/labels "targets=[a, b]" \\
        from_layer=12 n_blocks=1 window=128 "poolings=[last, mean]" out=runs/x/adapted

Runs in one process (torch's threads); sized for CPUs with ``n_blocks`` 1-2 and ``window`` 64-256.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from shared.cli_utils import config_command, console, run_cli
from shared.errors import BadInput
from shared.features import parse_block
from training.adapt.inputs import load_windows
from training.adapt.model import AdaptInputs, predict_proba
from training.adapt.train import AdaptedFit, AdaptTrainConfig, fit_adapted
from training.dataset import RoutingData, RoutingDataConfig, load_routing_data

log = logging.getLogger(__name__)


class AdaptConfig(RoutingDataConfig):
    """Config of ``prefill-router adapt``."""

    targets: list[str] = Field(description="Targets, in the order of the router's outputs.")
    out: str = Field("runs/adapted", description="Artifact directory: local path or s3:// URI.")
    registry: str | None = Field(None, description="Model registry YAML (encoder, prices); default configs/models.yaml.")
    from_layer: int = Field(ge=0, description="Frozen layer L whose token states the adapted blocks read; the "
                                              "capture must keep them (token_layers=[L]).")
    n_blocks: int = Field(1, gt=0, description="Adapted blocks k (encoder blocks L+1..L+k).")
    window: int | None = Field(None, gt=0, description="Last prompt tokens the blocks run over (at most the "
                                                       "capture's token_window); None: the capture's.")
    poolings: list[Literal["last", "mean"]] = Field(["last", "mean"], description="Poolings of the adapted blocks.")
    frozen_blocks: list[str] = Field(default_factory=list, description="Captured frozen blocks read beside the "
                                                                       "adapted ones, e.g. [h12_last, h12_mean].")
    n_components: int = Field(64, gt=0, description="PCA components per block (fitted on train only).")
    tolerance: float = Field(0.2, ge=0, le=1, description="Default routing tolerance stored in the artifact.")
    train: AdaptTrainConfig = Field(default_factory=AdaptTrainConfig, description="Training of blocks and trunk.")
    tune_report: str | None = Field(None, description="tune.json of the same capture, labels and targets: first "
                                    "cross-validate the adapted blocks on tune's folds and score (training/adapt/"
                                    "choose.py); write the artifact only if they beat tune's choice. None: always.")
    margin: float = Field(0.0, ge=-1, le=1, description="With tune_report: how far the adapted candidate's "
                          "choose_by score must exceed tune's chosen candidate's; negative: it is chosen unless "
                          "worse by more than that (e.g. to prefer it when it runs fewer layers).")
    cv_out: str = Field("runs/adapt", description="With tune_report: where adapt.json (both rows and the "
                                                  "decision) is written.")


def adapt_from_capture(cfg: AdaptConfig) -> tuple[AdaptedFit, RoutingData, AdaptInputs, Any]:
    """Train on the capture: ``(fit, data (train + val rows), windows of those rows, the adapter spec)``."""
    from shared.adapter import AdapterSpec
    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from training.router_meta import encoder_info

    bad = [b for b in cfg.frozen_blocks if parse_block(b)[1] not in ("last", "mean", "next")]
    if bad:
        raise BadInput(f"frozen_blocks {bad} are not captured vector blocks")
    data = load_routing_data(cfg.activations, cfg.labels, cfg.targets, cfg.frozen_blocks or None)
    data = data.where("train", "val")
    if not (data.split == "train").any() or not (data.split == "val").any():
        raise BadInput("adapt needs rows in both the train and the val split")
    windows, window = load_windows(cfg, data)
    spec = AdapterSpec(from_layer=cfg.from_layer, n_blocks=cfg.n_blocks, window=window, poolings=cfg.poolings)
    encoder = load_registry(cfg.registry).encoder(encoder_info(cfg.activations)["name"])
    lm = load_causal_lm(encoder, device="cpu")
    frozen = {b: data.blocks[b] for b in cfg.frozen_blocks}
    tr, va = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    log.info("adapt: %d train + %d val rows, blocks %d..%d of %s, window %d (%.1f states per row)", len(tr), len(va),
             cfg.from_layer + 1, spec.to_layer, encoder.name, window, windows.mask.sum(1).mean())
    fit = fit_adapted(lm.model, spec, windows, frozen, tr, va, cfg.n_components, cfg.train)
    return fit, data, windows, spec


def run_adapt(cfg: AdaptConfig) -> dict[str, Any]:
    """Train and write the artifact; returns its metadata as a dict. With ``tune_report``, the adapted candidate
    is first cross-validated against tune's choice (:func:`training.adapt.choose.choose`): not chosen, nothing
    is written and the result is ``{"chosen": False, "choice": report}``; chosen, the metadata gains
    ``"chosen": True`` and ``"choice"``."""
    from training.adapt.choose import choose

    choice = choose(cfg) if cfg.tune_report else None
    if choice is not None and not choice["chosen"]:
        console.print(f"adapted encoder not chosen: {choice['reason']}; no artifact written "
                      f"(report: {cfg.cv_out}/adapt.json)")
        return {"chosen": False, "choice": choice}
    if choice is not None:
        console.print(f"adapted encoder chosen: {choice['reason']}")
    start = time.perf_counter()
    fit, data, windows, spec = adapt_from_capture(cfg)
    meta = write_adapted(cfg, fit, data, windows, spec, time.perf_counter() - start)
    return {**meta, "chosen": True, "choice": choice} if choice is not None else meta


def write_adapted(cfg: AdaptConfig, fit: AdaptedFit, data: RoutingData, windows: AdaptInputs, spec: Any,
                  seconds: float | None = None) -> dict[str, Any]:
    """Write :func:`adapt_from_capture`'s result as an artifact at ``cfg.out`` (val metrics from the served
    computation, :func:`training.adapt.model.predict_proba`); returns its metadata as a dict."""
    from shared.artifact import ArtifactMeta, PolicyDefaults, save_artifact
    from shared.trunk import Ensemble
    from training.router_meta import best_single_record, encoder_info, target_table, val_metrics

    va = np.flatnonzero(data.split == "val")
    P = predict_proba(fit.adapter, fit.transform, fit.trunk, windows.take(va),
                      {b: data.blocks[b][va] for b in cfg.frozen_blocks})
    r = fit.result
    metrics = {**val_metrics(P, data.Y[va], data.targets), "objective": cfg.train.objective.model_dump(),
               "adapt": {"val_loss": r.val_loss, "start_val_loss": r.start_val_loss, "history": r.history,
                         "train_seconds": round(r.seconds, 1), "seconds": round(seconds or r.seconds, 1)},
               "n_train": int((data.split == "train").sum()), "n_val": int(len(va)),
               "features": {"n_components": cfg.n_components, "chosen_by": "adapt"},
               "best_single": best_single_record(data.where("train"))}
    names = fit.transform.names
    meta = ArtifactMeta(encoder=encoder_info(cfg.activations),
                        layers=sorted({parse_block(b)[0] for b in cfg.frozen_blocks}),
                        pooling={b: parse_block(b)[1] for b in names}, targets=target_table(data, cfg.registry),
                        training_metrics=metrics, policy=PolicyDefaults(tolerance=cfg.tolerance))
    written = save_artifact(cfg.out, meta, fit.transform, Ensemble([fit.trunk]), adapter=fit.adapter)
    console.print(f"adapted router artifact written to {cfg.out}: blocks {names}, adapted {spec.block_names()}, "
                  f"val loss {r.start_val_loss:.5f} -> {r.val_loss:.5f}, val mean AUC {metrics['val_mean_auc']:.3f}, "
                  f"{metrics['adapt']['seconds']:.0f} s")
    return written.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router adapt", argv, config_command(
        AdaptConfig, run_adapt, "Fine-tune the encoder's top blocks on the routing labels and write a router artifact."))
