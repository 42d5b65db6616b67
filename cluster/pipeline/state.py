"""Bookkeeping of ``prefill-router pipeline run``: what can be checked before any work
starts, and the stage records that let a re-run skip what is already done.

A stage's record is ``work_dir/stages/<stage>.json`` = ``{"key": ..., "result": ...}``; the
key is a hash of the stage's config and of what the stages before it wrote, so a stage is
skipped only when neither changed and its output is still there. :class:`Stage` is one row
of the pipeline's stage table (``cluster.pipeline.run.STAGES``) and :func:`run_stage` the
"key, then skip if done, else run and record" every recorded stage shares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from shared import storage
from shared.errors import BadInput, MissingInput, UnknownName

if TYPE_CHECKING:
    from cluster.pipeline.config import PipelineConfig


# --------------------------------------------------------------------------- checks
def _local(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def check_pipeline(cfg: PipelineConfig, base: str | Path | None = None) -> None:
    """What can be checked before any work starts (paths relative to ``base``); raises with the reason."""
    from shared.registry import load_registry

    base = Path(base or ".")
    if cfg.registry and not _local(cfg.registry, base).is_file():
        raise MissingInput(f"registry {cfg.registry} not found")
    registry = load_registry(_local(cfg.registry, base) if cfg.registry else None)
    if len(set(cfg.targets)) != len(cfg.targets):
        raise BadInput(f"targets listed twice: {cfg.targets}")
    for field, name, lookup in [*(("targets", n, registry.target) for n in cfg.targets),
                                ("capture.encoder", cfg.capture.encoder, registry.encoder)]:
        try:
            lookup(name)
        except KeyError as exc:
            raise UnknownName(f"{field}: {exc.args[0]}") from exc
        except ValueError as exc:
            raise BadInput(f"{field}: {exc}") from exc
    if cfg.queries and not storage.is_s3(cfg.queries) and not _local(cfg.queries, base).is_file():
        raise MissingInput(f"queries: no query table at {cfg.queries} (looked at {_local(cfg.queries, base)}); "
                                "build one with `prefill-router data build` or give `data:` to build it here")
    if cfg.labels and not storage.is_s3(cfg.labels) and not _local(cfg.labels, base).is_dir():
        raise MissingInput(f"labels: no labels directory at {cfg.labels} (looked at {_local(cfg.labels, base)})")
    reload = cfg.publish.reload_serve_app
    if reload:
        from serving.config import ServeConfig
        from shared.config import load_config

        load_config(ServeConfig, _local(reload.serve_config, base), reload.overrides)


# --------------------------------------------------------------------------- resume bookkeeping
def stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def outputs_fingerprint(*dirs: str) -> str:
    """Name, size and mtime of every finished shard under ``dirs`` (what label and capture wrote)."""
    files = []
    for d in dirs:
        root = Path(d)
        for p in sorted(root.rglob("shard-*.parquet")) if root.is_dir() else []:
            if "failed" not in p.relative_to(root).parts:
                st = p.stat()
                files.append((str(p.relative_to(root.parent)), st.st_size, st.st_mtime_ns))
    return stage_key(files)


def _stamp(work: str, stage: str) -> Path:
    return Path(work) / "stages" / f"{stage}.json"


def done_before(work: str, stage: str, key: str, output: str) -> dict[str, Any] | None:
    """The recorded result of ``stage`` when it ran with ``key`` and its output is still there."""
    path = _stamp(work, stage)
    if not path.is_file() or not storage.exists(output):
        return None
    record = json.loads(path.read_text())
    return record["result"] if record.get("key") == key else None


def record(work: str, stage: str, key: str, result: dict[str, Any]) -> dict[str, Any]:
    storage.write_json(str(_stamp(work, stage)), {"key": key, "result": result})
    return result


# --------------------------------------------------------------------------- the stage table's rows
StageRun = Callable[["PipelineConfig", dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: its name, what it does and how a re-run skips it.

    ``run(cfg, results)`` does the work (``results``: what the stages before it returned) and
    returns the stage's result. ``key(cfg, keys)`` hashes the stage's inputs (``keys``: the
    keys of the stages before it); ``output(cfg)`` is the file that shows it finished
    (None: nothing is recorded, the stage is run every time). A stage without ``output``
    that resumes by itself (label, capture: finished shards) leaves both None. ``when(cfg)``:
    whether the config asks for the stage at all.
    """

    name: str
    run: StageRun
    key: Callable[["PipelineConfig", dict[str, str]], str] | None = None
    output: Callable[["PipelineConfig"], str | None] | None = None
    when: Callable[["PipelineConfig"], bool] = lambda cfg: True


def run_stage(stage: Stage, cfg: PipelineConfig, keys: dict[str, str], results: dict[str, Any]) -> dict[str, Any]:
    """Key the stage (into ``keys``), then its recorded result (``skipped``) when it ran with that key and its
    output is still there; else run it and record the result under ``work_dir/stages``."""
    key = stage.key(cfg, keys) if stage.key else None
    if key is not None:
        keys[stage.name] = key
    output = stage.output(cfg) if stage.output else None
    if output is None:
        return stage.run(cfg, results)
    if (old := done_before(cfg.work_dir, stage.name, key, output)) is not None:
        return {**old, "skipped": True}
    return record(cfg.work_dir, stage.name, key, stage.run(cfg, results))
