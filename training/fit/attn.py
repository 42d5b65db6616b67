"""``fit`` with ``h{layer}_attn`` blocks (learned token pooling, :mod:`shared.pooling`): a seed ensemble of
:class:`shared.pooling.PooledTrunkNet` -> an attn artifact (:mod:`shared.pooled_artifact`).

The same recipe as tune's cross-validation (:mod:`training.pooled`) on fit's split: the frozen transforms
(the vector blocks' standardise->PCA, each attn block's token standardise->PCA) fitted on the **train** rows
only, ``train.seeds`` members on the masked soft-label objective with early stopping on **val**, the ``keep``
lowest validation losses kept. The token windows are read from the capture (its ``token_layers`` must hold
every attn layer: :func:`training.token_states.read_token_windows`).

The members train on **Ray Train** as the vector-only fit's do (:func:`training.fit.train_ray.train_pooled_ensemble`:
one seed per worker, checkpoints after every round under ``train.storage_path``, a re-run resumes the run of
the same inputs). Their inputs, the transformed ``(n, W, k)`` token windows per attn block (``k`` = the token
PCA size, 64 by default: RouterDC's 4,823 train + val rows at ``W`` = 128 are 158 MB in float32), travel to
every worker with the run's config. Propensity weighting is refused (not implemented for attn members).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from shared.cli_utils import console
from shared.errors import BadInput
from shared.features import is_attn, parse_block
from training.dataset import RoutingData, load_routing_data
from training.pooled import PoolConfig, apply_transforms, build_pooled, ensemble_proba, fit_transforms, take
from training.router_meta import best_single_record, encoder_info, target_table, val_metrics

log = logging.getLogger(__name__)


def attn_data(cfg: Any, blocks: list[str], data: RoutingData | None, pool: PoolConfig) -> tuple[RoutingData, dict]:
    """``(data, tokens)``: the train and val rows of the routing data with only the vector blocks among
    ``blocks``, and ``{attn block: (states (n, W, D) fp16, mask (n, W))}`` of those rows from the capture."""
    from training.token_states import read_token_windows

    if cfg.train.propensity_weighting != "none":
        raise BadInput("propensity weighting is not implemented for h<layer>_attn blocks (training/pooled.py); set "
                       "train.propensity_weighting=none")
    vector = [b for b in blocks if not is_attn(b)]
    data = data or load_routing_data(cfg.activations, cfg.labels, cfg.targets, vector or None)
    data = replace(data, blocks={b: data.blocks[b] for b in vector}).where("train", "val")
    tokens = {}
    for b in blocks:
        if is_attn(b):
            tokens[b] = read_token_windows(cfg.activations, parse_block(b)[0], pool.window, list(data.query_ids))[1:]
    return data, tokens


def train_members(inputs: tuple, Y: np.ndarray, tr: np.ndarray, va: np.ndarray, cfg: Any, trunk: Any,
                  pool: PoolConfig) -> tuple[list, list]:
    """``(every member, the kept ones)``: seeds ``0..train.seeds-1`` of :func:`training.pooled.train_pooled_one`
    on rows ``tr`` with early stopping on ``va``, on Ray Train; kept: the ``train.keep`` lowest validation losses."""
    from shared.ray_boot import ensure_ray
    from shared.reach import require_reachable
    from training.fit.train_ray import run_name, train_pooled_ensemble
    from training.loop import select_ensemble

    ensure_ray(cfg.ray_address, log_to_driver=False)
    require_reachable(cfg.train.storage_path, "train.storage_path")  # Ray Train workers write checkpoints there
    run = cfg.train.model_copy(update={"trunk": trunk})
    Itr, Iva = take(inputs, tr), take(inputs, va)
    run = run.model_copy(update={"name": run_name(run, Itr, Y[tr], None, pool)})
    members, _ = train_pooled_ensemble(Itr, Y[tr], Iva, Y[va], run, pool)
    return members, select_ensemble(members, min(cfg.train.keep, len(members)))


@dataclass
class AttnFit:
    """A fitted attn router before it is written: the train+val rows, the token windows, the transforms, the
    kept members, every row's network inputs (:func:`training.pooled.apply_transforms`) and the metrics."""

    data: RoutingData
    tokens: dict[str, tuple[np.ndarray, np.ndarray]]
    transform: Any
    token_transforms: list
    kept: list
    inputs: tuple
    metrics: dict[str, Any]


def fit_attn(cfg: Any, blocks: list[str], n_components: int, source: str, objective: Any, pool: PoolConfig,
             data: RoutingData | None = None) -> AttnFit:
    """Fit an attn router on ``blocks`` (:class:`training.fit.run.FitConfig` ``cfg``; the chosen features,
    objective and pooling as :mod:`training.fit.run` resolved them)."""
    data, tokens = attn_data(cfg, blocks, data, pool)
    tr, va = np.flatnonzero(data.split == "train"), np.flatnonzero(data.split == "val")
    if len(tr) == 0 or len(va) == 0:
        raise BadInput("fit needs rows in both the train and the val split")
    ft, tts = fit_transforms(data.blocks, tokens, tr, n_components, pool)
    inputs = apply_transforms(ft, tts, data.blocks, tokens)
    trunk = cfg.train.trunk.model_copy(update={"objective": objective})
    members, kept = train_members(inputs, data.Y, tr, va, cfg, trunk, pool)
    metrics = {**val_metrics(ensemble_proba(kept, take(inputs, va)), data.Y[va], data.targets),
               "members_val_loss": {str(m.seed): m.val_loss for m in members},
               "kept_seeds": [m.seed for m in kept], "n_train": int(len(tr)), "n_val": int(len(va)),
               "features": {"n_components": n_components, "chosen_by": source},
               "pool": pool.model_dump(), "trained": "Ray Train (training.fit.train_ray.train_pooled_ensemble)",
               "objective": objective.model_dump(), "best_single": best_single_record(data.where("train"))}
    return AttnFit(data, tokens, ft, tts, kept, inputs, metrics)


def write_attn(cfg: Any, fit: AttnFit) -> dict[str, Any]:
    """Write ``fit`` to ``cfg.out`` (:func:`shared.pooled_artifact.save_pooled_artifact`); the meta as written."""
    from shared.artifact import ArtifactMeta, PolicyDefaults
    from shared.pooled_artifact import save_pooled_artifact

    vector, names = list(fit.transform.names), list(fit.tokens)
    meta = ArtifactMeta(encoder=encoder_info(cfg.activations),
                        layers=sorted({parse_block(b)[0] for b in vector}),
                        pooling={b: parse_block(b)[1] for b in vector}, targets=target_table(fit.data, cfg.registry),
                        training_metrics=fit.metrics, policy=PolicyDefaults(tolerance=cfg.tolerance))
    written = save_pooled_artifact(cfg.out, meta, fit.transform, [build_pooled(m) for m in fit.kept],
                                   fit.token_transforms, [fit.tokens[b][1].shape[1] for b in names], names)
    console.print(f"router artifact written to {cfg.out}: blocks {vector + names} (attn: {names}), "
                  f"{len(fit.kept)} members, val mean AUC {fit.metrics['val_mean_auc']:.3f}")
    return written.model_dump(mode="json")


def run_attn_fit(cfg: Any, blocks: list[str], n_components: int, source: str, objective: Any, pool: PoolConfig,
                 data: RoutingData | None = None) -> dict[str, Any]:
    """:func:`fit_attn` then :func:`write_attn`; the artifact's meta."""
    return write_attn(cfg, fit_attn(cfg, blocks, n_components, source, objective, pool, data))
