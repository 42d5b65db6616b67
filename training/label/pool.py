"""The actor pool of one labelling or judging model (shared by ``label run`` and ``label judge``)."""

from __future__ import annotations

from pydantic import Field

from shared.config import StrictConfig


class PoolConfig(StrictConfig):
    """One target's actor pool."""

    min_actors: int = Field(1, ge=1, description="Actors started up front.")
    max_actors: int = Field(1, ge=1, description="Most actors the pool scales to.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per actor when it runs on CPU.")
    num_gpus: float = Field(1.0, gt=0, description="GPUs per actor when the cluster has GPUs.")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per CPU actor (None: num_cpus).")
