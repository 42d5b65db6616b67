"""Seed-ensemble training of SharedTrunkNet on Ray Train.

The ensemble's members are independent, so the natural parallelism is one seed per
worker: ``TorchTrainer`` starts ``num_workers`` workers, round ``r`` gives worker ``k``
the seed ``pending[r * world + k]``, results are gathered to rank 0
(``all_gather_object`` over the process group TorchTrainer sets up: gloo on CPU, NCCL on
GPU), and rank 0 checkpoints every finished member after each round. Every worker
calls ``ray.train.report`` once per round (Train V2 requires the same number of calls
from each worker).

Resume: a trainer re-created with the same ``storage_path`` and ``name`` starts from the
latest checkpoint, and seeds found in it are not trained again. ``storage_path`` may be
local or ``s3://`` (shared storage is required for multi-node runs).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from typing import Any

import numpy as np
from pydantic import Field

from shared.config import StrictConfig
from training.loop import PropensityWeighting, TrainResult, TrunkConfig, train_one

MEMBERS_FILE = "members.pt"


class TrainRunConfig(StrictConfig):
    """How the ensemble is trained on Ray Train."""

    seeds: int = Field(10, gt=0, description="Ensemble members trained (seeds 0..seeds-1).")
    keep: int = Field(5, gt=0, description="Members kept: the lowest validation losses.")
    num_workers: int = Field(2, gt=0, description="Ray Train workers (one seed each per round).")
    use_gpu: bool | None = Field(None, description="Train on GPUs; None: when the cluster has any.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    storage_path: str = Field("runs/ray-train", description="Checkpoint storage: local path or s3:// URI.")
    name: str = Field("shared-trunk", description="Run name; the same name resumes from the last checkpoint.")
    max_failures: int = Field(1, ge=-1, description="Worker failures to recover from (-1: unlimited).")
    trunk: TrunkConfig = Field(default_factory=TrunkConfig, description="Network and optimiser settings.")
    propensity_weighting: PropensityWeighting = Field(
        "none", description="Labels from a decision log (with propensities): weigh each labelled cell's BCE by "
        "1/propensity, so the rarely explored targets' cells count as much as the router's usual choices. none: "
        "unweighted; ips: 1/p; clipped: min(1/p, propensity_clip). Cells without a propensity (pinned requests) "
        "weigh 1; the validation loss (early stopping, member choice) is weighted alike. Refused on labels "
        "without propensities.")
    propensity_clip: float = Field(10.0, ge=1, description="clipped: the largest weight a cell gets (bounds the "
                                   "variance a rare exploration adds).")


def _load_members(checkpoint: Any) -> dict[int, dict]:
    import torch

    if checkpoint is None:
        return {}
    with checkpoint.as_directory() as path:
        return torch.load(os.path.join(path, MEMBERS_FILE), weights_only=False)


def _gather(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _report(done: dict[int, dict], rank: int, round_: int) -> None:
    import ray.train
    import torch

    metrics = {"round": round_, "members": len(done),
               "best_val_loss": min((m["val_loss"] for m in done.values()), default=float("nan"))}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(done, os.path.join(tmp, MEMBERS_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def ensemble_loop(config: dict[str, Any]) -> None:
    """The per-worker training function (runs inside a Ray Train worker)."""
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    done = _load_members(ray.train.get_checkpoint())
    pending = [s for s in config["seeds"] if s not in done]
    arrays = config["arrays"]
    trunk = TrunkConfig.model_validate(config["trunk"])
    for round_ in range(math.ceil(len(pending) / world)):
        idx = round_ * world + rank
        mine = None
        if idx < len(pending):
            mine = dataclasses.asdict(train_member(arrays, pending[idx], trunk, config.get("pool")))
        for member in _gather(mine):
            if member is not None:
                done[member["seed"]] = member
        _report(done, rank, round_)


def train_member(arrays: dict[str, Any], seed: int, trunk: TrunkConfig, pool: dict | None) -> TrainResult:
    """One member on a worker: a SharedTrunkNet on ``Xtr``/``Xva`` (:func:`training.loop.train_one`), or with
    ``pool`` a :class:`shared.pooling.PooledTrunkNet` on the inputs ``Itr``/``Iva`` ``(X, z_1, m_1, ...)``
    (:func:`training.pooled.train_pooled_one`)."""
    if pool is None:
        return train_one(arrays["Xtr"], arrays["Ytr"], arrays.get("Wtr"), arrays["Xva"], arrays["Yva"],
                         arrays.get("Wva"), seed=seed, cfg=trunk)
    from training.pooled import PoolConfig, train_pooled_one

    return train_pooled_one((tuple(arrays["Itr"]), arrays["Ytr"]), (tuple(arrays["Iva"]), arrays["Yva"]), seed,
                            trunk, PoolConfig.model_validate(pool))


def run_name(train: TrainRunConfig, Xtr: np.ndarray | tuple, Ytr: np.ndarray, Wtr: np.ndarray | None = None,
             pool: Any = None) -> str:
    """``<train.name>-<hash of the features, labels, loss weights and training settings>`` (``train``:
    the settings as run, the objective included; the propensity settings enter through the weights
    ``Wtr``, so an unweighted run keeps its name; ``Xtr`` a tuple for attn members' inputs, hashed with their
    ``pool`` settings): Ray Train resumes a run of the same name, so only a run on identical inputs may share
    its checkpoint."""
    import hashlib

    h = hashlib.sha256()
    for x in (Xtr if isinstance(Xtr, tuple) else (Xtr,)):
        h.update(np.ascontiguousarray(x, np.float32).tobytes())
    h.update(np.nan_to_num(np.asarray(Ytr, np.float32), nan=-1).tobytes())
    if Wtr is not None:
        h.update(np.ascontiguousarray(Wtr, np.float32).tobytes())
    h.update(train.model_dump_json(exclude={"name", "storage_path", "num_workers", "max_failures",
                                            "propensity_weighting", "propensity_clip"}).encode())
    if pool is not None:
        h.update(pool.model_dump_json().encode())
    return f"{train.name}-{h.hexdigest()[:10]}"


def _storage(path: str) -> tuple[str, Any]:
    from shared import storage

    if storage.is_s3(path):
        fs, inner = storage.filesystem(path)
        return inner, fs
    return os.path.abspath(path), None


def train_ensemble(Xtr: np.ndarray, Ytr: np.ndarray, Xva: np.ndarray, Yva: np.ndarray,
                   cfg: TrainRunConfig, Wtr: np.ndarray | None = None,
                   Wva: np.ndarray | None = None) -> tuple[list[TrainResult], dict[str, Any]]:
    """Train ``cfg.seeds`` members on Ray Train.

    Returns every member (best validation loss first) and the last reported metrics
    (``round``: rounds run by this call minus one, ``members``, ``best_val_loss``).

    ``X*`` are ``(n, d)`` float32 features, ``Y*`` ``(n, T)`` labels with NaN for missing, ``W*``
    ``(n, T)`` loss weights per cell (0 = missing; :func:`training.loop.propensity_weights`) or None.
    Needs ``ray.init`` to have been called (or a cluster address in ``RAY_ADDRESS``).
    """
    arrays = {"Xtr": np.array(Xtr, np.float32), "Ytr": np.asarray(Ytr, np.float32),
              "Xva": np.asarray(Xva, np.float32), "Yva": np.asarray(Yva, np.float32),
              **{k: np.asarray(w, np.float32) for k, w in (("Wtr", Wtr), ("Wva", Wva)) if w is not None}}
    return run_trainer(arrays, cfg)


def train_pooled_ensemble(Itr: tuple, Ytr: np.ndarray, Iva: tuple, Yva: np.ndarray, cfg: TrainRunConfig,
                          pool: Any) -> tuple[list[TrainResult], dict[str, Any]]:
    """As :func:`train_ensemble`, for attn members (:class:`shared.pooling.PooledTrunkNet`, ``pool`` a
    :class:`training.pooled.PoolConfig`): ``I*`` are their inputs ``(X (n, d), z_1 (n, W, k), m_1 (n, W), ...)``
    as :func:`training.pooled.apply_transforms` gives them; no loss weights."""
    arrays = {"Itr": list(Itr), "Ytr": np.asarray(Ytr, np.float32), "Iva": list(Iva),
              "Yva": np.asarray(Yva, np.float32)}
    return run_trainer(arrays, cfg, pool.model_dump())


def run_trainer(arrays: dict[str, Any], cfg: TrainRunConfig,
                pool: dict | None = None) -> tuple[list[TrainResult], dict[str, Any]]:
    """The TorchTrainer run behind :func:`train_ensemble` and :func:`train_pooled_ensemble`."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from shared.ray_boot import cluster_gpus

    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else cluster_gpus() > 0
    storage_path, storage_fs = _storage(cfg.storage_path)
    trainer = TorchTrainer(
        ensemble_loop,
        train_loop_config={"seeds": list(range(cfg.seeds)), "arrays": arrays, "pool": pool,
                           "trunk": cfg.trunk.model_dump(), "threads": max(1, int(cfg.cpus_per_worker))},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    result = trainer.fit()
    members = _load_members(result.checkpoint)
    missing = sorted(set(range(cfg.seeds)) - set(members))
    if missing:
        raise RuntimeError(f"Ray Train finished without members for seeds {missing}")
    ranked = sorted((TrainResult(**m) for m in members.values()), key=lambda r: (r.val_loss, r.seed))
    return ranked, dict(result.metrics or {})
