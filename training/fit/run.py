"""``prefill-router fit``: SharedTrunkNet on Ray Train -> a self-contained router artifact.

Steps: join activations and labels; fit per-block StandardScaler + PCA on the **train**
split only; train a seed ensemble on Ray Train (``training/fit/train_ray.py``) with early
stopping on **val**; keep the ``keep`` members with the lowest validation loss; write the
versioned artifact (``shared/artifact.py``) with the encoder's identity, the blocks, the
target table (registry prices, median answer length on train) and validation metrics.

With ``h{layer}_attn`` blocks among the chosen ones (learned token pooling), :mod:`training.fit.attn` fits
and writes the artifact instead (PooledTrunkNet members on the capture's token states, trained on Ray Train as well).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from pydantic import Field

from shared import storage
from shared.cli_utils import config_command, console, run_cli
from shared.errors import BadInput
from shared.ray_boot import ensure_ray
from shared.reach import require_reachable
from shared.features import is_attn, parse_block
from training.dataset import RoutingData, RoutingDataConfig, load_routing_data
from training.fit.train_ray import TrainRunConfig, run_name
from training.objectives import ObjectiveConfig
from training.pooled import PoolConfig
from training.router_meta import best_single_record, encoder_info, target_table, val_metrics

log = logging.getLogger(__name__)


class FitConfig(RoutingDataConfig):
    """Config of ``prefill-router fit``."""

    targets: list[str] = Field(description="Targets, in the order of the router's outputs.")
    out: str = Field("runs/router", description="Artifact directory: local path or s3:// URI.")
    registry: str | None = Field(None, description="Model registry YAML (prices); default configs/models.yaml.")
    blocks: list[str] | None = Field(None, description="Activation columns to use, e.g. [h12_last, h20_mean].")
    tune_report: str | None = Field(None, description="tune.json whose chosen blocks, n_components and training "
                                                      "objective are used when blocks is unset (`prefill-router tune`).")
    probe_report: str | None = Field(None, description="probe.json whose selected blocks are used when neither "
                                                       "blocks nor tune_report is set.")
    n_components: int = Field(128, gt=0, description="PCA components per block (fitted on train only); "
                                                     "tune_report's choice replaces it.")
    tolerance: float = Field(0.2, ge=0, le=1, description="Default routing tolerance stored in the artifact.")
    ray_address: str | None = Field(None, description="Ray cluster address; None starts or joins a local one.")
    train: TrainRunConfig = Field(default_factory=TrainRunConfig, description="Ray Train settings.")
    pool: PoolConfig | None = Field(None, description="How h<layer>_attn blocks pool the capture's token states; "
                                                      "None: the tune report's pool settings when its blocks are "
                                                      "used, else the defaults. Not read without attn blocks.")


def chosen_features(cfg: FitConfig) -> tuple[list[str] | None, int, str]:
    """``(blocks, n_components, source)``: ``blocks`` as set, else the tune report's choice
    (with its PCA size), else the probe's selection, else None (every captured block)."""
    if cfg.blocks:
        return list(cfg.blocks), cfg.n_components, "config"
    if cfg.tune_report:
        best = storage.read_json(cfg.tune_report)["best"]
        return list(best["blocks"]), int(best["n_components"]), "tune"
    if cfg.probe_report:
        return list(storage.read_json(cfg.probe_report)["selected"]["blocks"]), cfg.n_components, "probe"
    return None, cfg.n_components, "all"


def chosen_objective(cfg: FitConfig) -> ObjectiveConfig:
    """The training objective: the tune report's choice when its blocks are used (see
    :func:`chosen_features`), else ``train.trunk.objective``."""
    if not cfg.blocks and cfg.tune_report:
        best = storage.read_json(cfg.tune_report)["best"]
        if best.get("objective"):
            return ObjectiveConfig.model_validate(best["objective"])
    return cfg.train.trunk.objective


def chosen_pool(cfg: FitConfig) -> PoolConfig:
    """The attn blocks' pooling: ``pool`` as set, else the tune report's (when its blocks are used, see
    :func:`chosen_features`), else :class:`training.pooled.PoolConfig`'s defaults."""
    if cfg.pool is not None:
        return cfg.pool
    if not cfg.blocks and cfg.tune_report:
        pool = storage.read_json(cfg.tune_report).get("config", {}).get("pool")
        if pool:
            return PoolConfig.model_validate(pool)
    return PoolConfig()


def loss_weights(cfg: TrainRunConfig, tr: RoutingData, va: RoutingData) -> tuple[np.ndarray | None, ...]:
    """``(Wtr, Wva)``: the train and val cells' loss weights under ``cfg.propensity_weighting``
    (:func:`training.loop.propensity_weights`); ``(None, None)`` for ``none``. Refuses weighting on
    labels without propensities (not a decision-log import)."""
    from training.loop import propensity_weights

    if cfg.propensity_weighting == "none":
        return None, None
    if not tr.logged:
        raise BadInput(f"train.propensity_weighting={cfg.propensity_weighting}, but the labels carry no propensities "
                       "(<labels>/<target>/propensity.parquet: `data import format=decision-log` writes them); "
                       "set train.propensity_weighting=none")
    return tuple(propensity_weights(d.Y, d.propensity, cfg.propensity_weighting, cfg.propensity_clip)
                 for d in (tr, va))


def fit_features(cfg: FitConfig, data: RoutingData | None = None) -> tuple[RoutingData, Any, np.ndarray, np.ndarray]:
    """``(data, transform, Xtr, Xva)``: the routing data, the per-block standardise + PCA fitted
    on train only, and the ``(n, d)`` train and val features the trunk is trained on."""
    from shared.trunk import FeatureTransform

    blocks, n_components, source = chosen_features(cfg)
    attn = [b for b in blocks or [] if is_attn(b)]
    if attn:
        raise BadInput(f"blocks {blocks} (from {source}) include learned token pooling {attn}: they are not "
                       "features of a fixed width; run_fit trains them (training.fit.attn)")
    data = data or load_routing_data(cfg.activations, cfg.labels, cfg.targets, blocks)
    tr, va = data.where("train"), data.where("val")
    if len(tr.query_ids) == 0 or len(va.query_ids) == 0:
        raise BadInput("fit needs rows in both the train and the val split")
    transform = FeatureTransform.fit(tr.blocks, n_components=n_components)
    return data, transform, transform.transform(tr.blocks), transform.transform(va.blocks)


def run_fit(cfg: FitConfig, data: RoutingData | None = None) -> dict[str, Any]:
    """Fit and write the artifact; returns its metadata as a dict. With attn blocks among the chosen ones:
    :func:`training.fit.attn.run_attn_fit` (PooledTrunkNet members, on Ray Train as well)."""
    from shared.artifact import ArtifactMeta, PolicyDefaults, save_artifact
    from training.loop import build_ensemble, select_ensemble
    from training.fit.train_ray import train_ensemble

    blocks, n_components, source = chosen_features(cfg)
    if any(is_attn(b) for b in blocks or []):
        from training.fit.attn import run_attn_fit

        return run_attn_fit(cfg, blocks, n_components, source, chosen_objective(cfg), chosen_pool(cfg), data)
    data, transform, Xtr, Xva = fit_features(cfg, data)
    tr, va = data.where("train"), data.where("val")
    ensure_ray(cfg.ray_address, log_to_driver=False)
    require_reachable(cfg.train.storage_path, "train.storage_path")  # Ray Train workers write checkpoints there
    obj = chosen_objective(cfg)
    run = cfg.train.model_copy(update={"trunk": cfg.train.trunk.model_copy(update={"objective": obj})})
    Wtr, Wva = loss_weights(cfg.train, tr, va)
    members, _ = train_ensemble(Xtr, tr.Y, Xva, va.Y, run.model_copy(update={"name": run_name(run, Xtr, tr.Y, Wtr)}),
                                Wtr, Wva)
    kept = select_ensemble(members, min(cfg.train.keep, len(members)))
    ensemble = build_ensemble(kept)
    metrics = {**val_metrics(ensemble.predict_proba(Xva), va.Y, data.targets),
               "members_val_loss": {str(m.seed): m.val_loss for m in members},
               "kept_seeds": [m.seed for m in kept], "n_train": int(len(tr.query_ids)), "n_val": int(len(va.query_ids)),
               "features": dict(zip(("n_components", "chosen_by"), chosen_features(cfg)[1:])),
               "objective": obj.model_dump(),
               **({"propensity_weighting": {"mode": cfg.train.propensity_weighting,
                                            "clip": cfg.train.propensity_clip}} if Wtr is not None else {}),
               "best_single": best_single_record(tr)}
    blocks = transform.names
    meta = ArtifactMeta(
        encoder=encoder_info(cfg.activations) if cfg.activations else {"name": "unknown"},
        layers=sorted({parse_block(b)[0] for b in blocks}),
        pooling={b: parse_block(b)[1] for b in blocks},
        targets=target_table(data, cfg.registry),
        training_metrics=metrics,
        policy=PolicyDefaults(tolerance=cfg.tolerance),
    )
    written = save_artifact(cfg.out, meta, transform, ensemble)
    console.print(f"router artifact written to {cfg.out}: blocks {blocks}, {len(kept)} members, "
                  f"val mean AUC {metrics['val_mean_auc']:.3f}")
    return written.model_dump(mode="json")


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router fit", argv, config_command(
        FitConfig, run_fit, "Fit SharedTrunkNet on Ray Train and write a router artifact."))
