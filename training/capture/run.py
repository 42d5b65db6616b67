"""``prefill-router capture``: the encoder's pooled prefill activations for every query (Ray Data).

The query table streams through a pool of encoder actors (:class:`CaptureUDF`, a thin shell over
:class:`shared.encoder.Encoder`); the driver collects the rows and writes each shard of ``shard_size``
consecutive queries once it is complete (:mod:`training.shards`): re-running skips finished shards, redoes
partial ones and ends with exactly one row per query.

Output under ``out`` (local path or ``s3://bucket/prefix``): ``shard-NNNNN.parquet`` with
columns ``query_id``, ``split``, ``n_tokens``, ``truncated`` and one fixed-shape tensor
column per (layer, pooling) named ``h{layer}_{pooling}`` (Arrow's native
``arrow.fixed_shape_tensor``, shape ``[hidden_size]``, or ``[3]`` for ``h{L}_next``; readable
by plain pyarrow), rows in query-table order; and ``manifest.json`` (encoder, chat template,
layer convention, pooling, dtype, hidden size, query table hash, run summary with
``prompt_tokens`` and ``computed_tokens``).

Prefix sharing (``min_shared_prefix``): within each Ray Data batch, prompts sharing that
many leading tokens or more run the prefix once, then only their suffixes
(:mod:`shared.prefix`; the features equal the full forward's within fp32 noise, so the
setting is not part of the shards' identity). Pending rows are sorted by prompt within
each shard so that such prompts share a batch.

Token states (``token_layers``, :mod:`training.capture.tokens`): the fp16 states of each prompt's last
``token_window`` tokens at one or two layers, a shared prefix's stored once; the size estimate is printed
before any actor starts and a capture above ``token_limit_gb`` is refused.

Layer indices: 0 is the embedding output, ``i`` the output of block ``i``; the last
block ``L`` has the final norm applied (HF ``hidden_states`` convention).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from shared.batching import FP16_MAX
from shared.cli_utils import ConfigOption, Overrides
from shared.config import StrictConfig
from shared.errors import BadInput
from shared.features import NEXT_TOKEN_DIMS
from shared.ray_boot import ensure_ray
from training.capture.output import TensorShardWriter, read_features, rows_to_table
from training.capture.plan import EncoderPlan, encoder_plan
from training.capture.tokens import plan_tokens, write_prefixes

log = logging.getLogger(__name__)

__all__ = ["CaptureConfig", "CaptureUDF", "TensorShardWriter", "read_features", "rows_to_table", "run_capture"]

COUNTS = ("rows", "tokens", "computed", "padded", "truncated")  # run totals summed over result batches


class CaptureConfig(StrictConfig):
    """Config of ``prefill-router capture``."""

    queries: str = Field("runs/queries.parquet", description="Query table (Parquet, local or s3://).")
    out: str = Field("runs/activations", description="Output directory of shards + manifest (local or s3://).")
    encoder: str = Field("smollm2-135m", description="Registry name of the encoder model.")
    registry: str | None = Field(None, description="Model registry YAML (default configs/models.yaml).")
    layers: list[int] | Literal["all"] = Field(
        default_factory=lambda: [8, 16, 24],
        description="Layer indices to save (0 = embedding output, i = block i, L = last block with final norm) "
                    "or 'all'. Only blocks up to the deepest index are computed.")
    poolings: list[Literal["last", "mean", "next"]] = Field(
        default_factory=lambda: ["last", "mean"],
        description="Poolings: last real token and/or mean over the prompt; 'next' (needs the last layer in "
                    "layers) adds h<L>_next, the encoder's next-token confidence (shared.features).")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage dtype of the saved vectors.")
    shard_size: int = Field(256, gt=0, description="Queries per output shard (the unit of resume).")
    batch_size: int = Field(8, gt=0, description="Most prompts per forward pass (one length bucket).")
    max_batch_tokens: int | None = Field(
        4096, gt=0, description="Most padded tokens (rows x longest) per forward pass; None: no cap.")
    bucket_window: int = Field(
        64, gt=0, description="Queries per Ray Data batch given to an actor; sorted by length within it.")
    padding_side: Literal["left", "right"] = Field("right", description="Pad side in a forward batch.")
    min_actors: int = Field(1, ge=1, description="Smallest encoder actor pool.")
    max_actors: int = Field(2, ge=1, description="Largest encoder actor pool.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per encoder actor (also its torch threads on CPU).")
    memory_gb: float | None = Field(
        None, gt=0, description="RAM reserved per encoder actor (GiB) so Ray places no more actors on a node than "
        "fit (SmolLM2-135M ~1.5, the 1.5B Qwen ~9 on CPU); None: no reservation.")
    num_gpus: float | Literal["auto"] = Field(
        "auto", description="GPUs per encoder actor; 'auto': 1 when the cluster has GPUs, else 0 (CPU).")
    max_tokens: int = Field(2048, gt=0, description="Longer prompts keep their last max_tokens tokens (reported).")
    min_shared_prefix: int | None = Field(
        64, ge=0, description="Prompts of one Ray Data batch sharing at least this many leading tokens (after the "
                              "chat template) run that prefix once, then only their suffixes; pending rows are "
                              "sorted by prompt within each shard so such prompts meet. 0 or None: off.")
    ray_address: str | None = Field(None, description="Ray cluster address; None: RAY_ADDRESS or a local cluster.")
    progress: bool = Field(True, description="Show a progress bar.")
    token_layers: list[int] = Field(
        default_factory=list, max_length=2, description="Layers (at most 2) whose per-token states are kept for "
        "h<layer>_attn blocks: the last token_window tokens of each prompt, fp16. Empty: none.")
    token_window: int = Field(256, gt=0, description="Prompt tokens (the last ones) whose states token_layers keep.")
    token_limit_gb: float = Field(8.0, gt=0, description="Refuse a capture whose token states would exceed this "
                                  "many GiB (estimated on the driver before it starts).")
    reuse: list[str] = Field(default_factory=list, description="Earlier capture outputs (local or s3://) whose "
                             "rows of the same prompts are copied instead of encoded again, where they were "
                             "made the same way (training/capture/reuse.py); not with token_layers.")
    artifact: str | None = Field(None, description="A router artifact: capture exactly its encoder, layers and "
                                 "poolings (a held-out check of a shipped router); they replace the config's, "
                                 "with a warning naming what was replaced.")

    @model_validator(mode="after")
    def _pool_order(self) -> "CaptureConfig":
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


# --------------------------------------------------------------------------- actor
class CaptureUDF:
    """Ray Data actor: loads the encoder once, encodes a batch of queries (a thin shell)."""

    def __init__(self, encoder: str, registry: str | None, layers: list[int], poolings: list[str], dtype: str,
                 max_tokens: int, batch_size: int, max_batch_tokens: int | None, padding_side: str,
                 num_cpus: float, use_gpu: bool, min_shared_prefix: int | None = None,
                 token_layers: list[int] | None = None, token_window: int = 256):
        import torch

        from shared.encoder import Encoder

        device = "cuda" if use_gpu else "cpu"
        if not use_gpu:
            torch.set_num_threads(max(1, int(num_cpus)))
        self.encoder = Encoder.from_registry(encoder, layers, registry_path=registry, device=device,
                                             poolings=poolings, max_tokens=max_tokens, batch_size=batch_size,
                                             max_batch_tokens=max_batch_tokens, padding_side=padding_side,
                                             min_shared_prefix=min_shared_prefix,
                                             token_layers=token_layers or [], token_window=token_window)
        self.dtype, self.token_layers = np.dtype(dtype), token_layers or []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        conversations = [json.loads(m) for m in batch["messages_json"]]
        result = self.encoder.encode(conversations)
        out = {k: batch[k] for k in ("query_id", "split", "_shard", "_row")}
        out.update(n_tokens=result.n_tokens, truncated=result.truncated, _padded=result.padded,
                   _computed=result.computed)
        clip = FP16_MAX if self.dtype == np.float16 else np.inf  # float16 blocks: finite, as shared.batching.to_fp16
        out.update({col: np.clip(arr, -clip, clip).astype(self.dtype) for col, arr in result.features.items()})
        if self.token_layers:
            from training.capture.tokens import udf_columns

            out.update(udf_columns(result, self.token_layers))
        return out


# --------------------------------------------------------------------------- pending rows
def pending_table(table: pa.Table, shard_size: int, done: set[int], by_prompt: bool = False) -> pa.Table:
    """The rows still to capture, with their shard and row index, messages as JSON text.

    Rows come in query-table order; ``by_prompt``: sorted by messages text *within* each
    shard (shards stay in order, so each still completes early and resume is unchanged),
    which puts prompts with a common prefix into the same Ray Data batch. The writer
    restores query-table order inside each shard from ``_row``.
    """
    from training.shards import pending_rows, shard_ids

    rows = pending_rows(table.num_rows, shard_size, done)
    shards = shard_ids(table.num_rows, shard_size)[rows]
    messages = [json.dumps(m, ensure_ascii=False) for m in table.column("messages").take(pa.array(rows)).to_pylist()]
    if by_prompt:
        order = np.array(sorted(range(len(rows)), key=lambda i: (shards[i], messages[i])), dtype=np.int64)
        rows, shards, messages = rows[order], shards[order], [messages[i] for i in order]
    sub = table.take(pa.array(rows, pa.int64()))
    return pa.table({
        "query_id": sub.column("query_id"), "split": sub.column("split"),
        "messages_json": pa.array(messages, pa.string()),
        "_shard": pa.array(shards, pa.int64()), "_row": pa.array(rows, pa.int64()),
    })


# --------------------------------------------------------------------------- Ray wiring
def build_pipeline(pending: pa.Table, cfg: CaptureConfig, plan: EncoderPlan, use_gpu: bool) -> Any:
    """The Ray Data pipeline: pending queries (one block per bucket window) -> encoder actor pool."""
    import ray.data
    from ray.data.context import DataContext

    ctx = DataContext.get_current()
    ctx.arrow_fixed_shape_tensor_format = native_tensor_format()
    ctx.enable_progress_bars = False  # the driver shows one bar over queries instead
    quiet_memory_detector(ctx, cfg)
    blocks = [pending.slice(i, cfg.bucket_window) for i in range(0, pending.num_rows, cfg.bucket_window)]
    return ray.data.from_arrow(blocks).map_batches(
        CaptureUDF,
        fn_constructor_kwargs=dict(
            encoder=cfg.encoder, registry=cfg.registry, layers=plan.layers, poolings=list(cfg.poolings),
            dtype=cfg.dtype, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
            max_batch_tokens=cfg.max_batch_tokens, padding_side=cfg.padding_side, num_cpus=cfg.num_cpus,
            use_gpu=use_gpu, min_shared_prefix=cfg.min_shared_prefix, token_layers=cfg.token_layers,
            token_window=cfg.token_window),
        compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=cfg.max_actors),
        batch_size=cfg.bucket_window,
        batch_format="numpy",
        **actor_resources(cfg, use_gpu),
    )


def quiet_memory_detector(ctx: Any, cfg: CaptureConfig) -> None:
    """With ``memory_gb`` unset, say once what Ray Data's high-memory detector would repeat every 30 s for the
    whole capture (its advice is ``memory_gb``), then turn that detector off."""
    if cfg.memory_gb is not None:
        return
    log.info("capture.memory_gb is unset: encoder actors reserve no RAM in Ray. Fine when this capture has its "
             "nodes to itself; on a shared cluster set capture.memory_gb (about 1.5 for SmolLM2-135M, 9 for the "
             "1.5B Qwen) so Ray places no more actors on a node than fit. Ray Data's high-memory warning is off.")
    ctx.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1


def actor_resources(cfg: CaptureConfig, use_gpu: bool) -> dict[str, float]:
    """What each encoder actor asks Ray for: a GPU or ``num_cpus`` CPUs, plus ``memory_gb`` (bytes) if set."""
    out = {"num_gpus": 1.0 if cfg.num_gpus == "auto" else cfg.num_gpus} if use_gpu else {"num_cpus": cfg.num_cpus}
    if cfg.memory_gb is not None:
        out["memory"] = int(cfg.memory_gb * 2**30)
    return out


def native_tensor_format() -> Any:
    """Ray Data's setting for Arrow's native ``arrow.fixed_shape_tensor`` type."""
    from ray.data._internal.tensor_extensions.arrow import FixedShapeTensorFormat

    return FixedShapeTensorFormat.ARROW_NATIVE


def _use_gpu(cfg: CaptureConfig) -> bool:
    from shared.ray_boot import cluster_gpus

    if cfg.num_gpus == "auto":
        return cluster_gpus() > 0
    return cfg.num_gpus > 0


# --------------------------------------------------------------------------- run
def _prepare_output(cfg: CaptureConfig, identity: dict[str, Any]) -> set[int]:
    """Create ``out``, check its manifest and return the finished shards; bad paths fail clearly."""
    from shared import storage
    from training.shards import check_manifest, finished_shards

    try:
        storage.makedirs(cfg.out)
        check_manifest(cfg.out, identity)
        return finished_shards(cfg.out)
    except OSError as exc:
        raise BadInput(f"cannot write capture output to {cfg.out!r}: {exc}") from exc


def _stream(ds: Any, writer: TensorShardWriter, total: int, show: bool, on_batch: Any = None) -> dict[str, int]:
    """Drive the pipeline: feed result batches to the writer, with progress over queries."""
    from shared.progress import Progress

    counts = dict.fromkeys(COUNTS, 0)
    with Progress(total, "capture", "queries", bar=show) as progress:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            n = len(batch["query_id"])
            counts["rows"] += n
            counts["tokens"] += int(batch["n_tokens"].sum())
            counts["computed"] += int(batch["_computed"].sum())
            counts["padded"] += int(batch["_padded"].sum())
            counts["truncated"] += int(batch["truncated"].sum())
            if on_batch:
                on_batch(batch)  # token states: the prefixes' files, before the shard that refers to them
            writer.add(batch)
            progress.update(n, f"{counts['tokens']} prompt tokens, "
                               f"{100 * counts['computed'] / max(1, counts['tokens']):.0f}% of them computed")
    return counts


def for_artifact(cfg: CaptureConfig) -> CaptureConfig:
    """``cfg`` with the encoder, layers and poolings of ``cfg.artifact`` (unchanged without one), and the token
    states its adapter or attn blocks read. The artifact wins: what it reads is what a check of it needs; a
    config value it replaces is named in a warning, never dropped silently."""
    from shared.artifact import read_meta
    from training.token_states import token_capture

    if not cfg.artifact:
        return cfg
    meta = read_meta(cfg.artifact)
    wanted = {"encoder": meta.encoder.name, "layers": sorted(meta.layers), "poolings": meta.poolings}
    wanted.update(token_capture(meta, wanted))  # an adapter's or attn blocks' token layers and window
    replaced = {k: getattr(cfg, k) for k in wanted if getattr(cfg, k) != wanted[k]}
    if replaced:
        log.warning("capture: artifact %s reads %s; replacing the config's %s", cfg.artifact, wanted, replaced)
    return cfg.model_copy(update=wanted)


def copy_reused(cfg: CaptureConfig, identity: dict[str, Any], columns: list[str], pending: Any,
                writer: TensorShardWriter, token_states: bool) -> tuple[int, Any]:
    """Write the pending rows that ``cfg.reuse`` already holds; ``(rows reused, rows still pending)``."""
    from training.capture.reuse import reuse_rows, usable_sources

    if not cfg.reuse or not pending.num_rows:
        return 0, pending
    if token_states:
        log.warning("capture.reuse is ignored with token_layers: token states are always encoded")
        return 0, pending
    batch, rest = reuse_rows(pending, usable_sources(cfg.reuse, identity, columns), columns)
    if batch is not None:
        writer.add(batch)
        log.info("capture: %d of %d pending prompts copied from %s", pending.num_rows - rest.num_rows,
                 pending.num_rows, cfg.reuse)
    return pending.num_rows - rest.num_rows, rest


def run_capture(cfg: CaptureConfig) -> dict[str, Any]:
    """Capture every pending shard; returns (and stores in the manifest) the run summary."""
    from shared import storage
    from training.queries import table_hash
    from training.shards import finished_shards, shard_ids, update_manifest

    start = time.perf_counter()
    cfg = for_artifact(cfg)
    table = storage.read_parquet(cfg.queries)
    plan = encoder_plan(cfg)
    tokens = plan_tokens(cfg, plan, table)
    identity = plan.identity(cfg, table_hash(table), table.num_rows)
    if tokens:
        identity.update(token_layers=tokens["layers"], token_window=cfg.token_window, token_dtype="float16")
    done_before = _prepare_output(cfg, identity)
    pending = pending_table(table, cfg.shard_size, done_before, by_prompt=bool(cfg.min_shared_prefix))
    expected = {int(s): int(c) for s, c in zip(*np.unique(shard_ids(table.num_rows, cfg.shard_size),
                                                          return_counts=True)) if int(s) not in done_before}
    counts = dict.fromkeys(COUNTS, 0)
    writer = TensorShardWriter(cfg.out, expected, plan.columns, tokens.get("layers", []))
    reused, pending = copy_reused(cfg, identity, plan.columns, pending, writer, bool(tokens))
    written: set[str] = set()
    on_batch = (lambda b: write_prefixes(cfg.out, b, tokens["layers"], plan.hidden_size, written)) if tokens else None
    use_gpu = False
    if pending.num_rows:
        started = ensure_ray(cfg.ray_address, log_to_driver=False)
        try:
            use_gpu = _use_gpu(cfg)
            counts = _stream(build_pipeline(pending, cfg, plan, use_gpu), writer, pending.num_rows, cfg.progress,
                             on_batch)
        finally:
            if started:
                import ray

                ray.shutdown()
    if writer.incomplete or len(finished_shards(cfg.out)) != len(expected) + len(done_before):
        raise RuntimeError(f"capture ended with incomplete shards {writer.incomplete}; re-run to finish them")
    seconds = time.perf_counter() - start
    summary = {
        "rows": table.num_rows, "captured_rows": counts["rows"], "reused_rows": reused,
        "shards_skipped": len(done_before),
        "shards_written": len(writer.written), "prompt_tokens": counts["tokens"],
        "computed_tokens": counts["computed"], "min_shared_prefix": cfg.min_shared_prefix or 0,
        "computed_share": round(counts["computed"] / counts["tokens"], 4) if counts["tokens"] else 0.0,
        "truncated_prompts": counts["truncated"], "max_tokens": cfg.max_tokens,
        "padding_waste": 1 - counts["tokens"] / counts["padded"] if counts["padded"] else 0.0,
        "seconds": round(seconds, 3), "tokens_per_s": round(counts["tokens"] / seconds, 1) if seconds else 0.0,
        "device": "gpu" if use_gpu else "cpu", "columns": plan.columns,
        **({"token_states_gb_estimate": round(tokens["gb"], 3), "prefix_files": len(written)} if tokens else {}),
    }
    update_manifest(cfg.out, chat_template=plan.chat_template, columns=plan.columns,
                    column_format=f"arrow.fixed_shape_tensor, shape [hidden_size] (h<L>_next: [{NEXT_TOKEN_DIMS}]), "
                                  "one row per query",
                    summary=summary, config=cfg.model_dump(mode="json"))
    return summary


def print_summary(summary: dict[str, Any], out: str) -> None:
    from rich.table import Table

    from shared.cli_utils import console

    view = Table(title=f"capture -> {out}")
    view.add_column("item")
    view.add_column("value", justify="right")
    for key in ("rows", "captured_rows", "shards_skipped", "shards_written", "prompt_tokens", "computed_tokens",
                "computed_share", "truncated_prompts", "padding_waste", "seconds", "tokens_per_s", "device"):
        value = summary[key]
        view.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(view)
    if summary["truncated_prompts"]:
        console.print(f"[yellow]{summary['truncated_prompts']} prompts were longer than max_tokens="
                      f"{summary['max_tokens']} and kept only their last tokens[/]")


# --------------------------------------------------------------------------- CLI
def _capture_command(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Capture the encoder's prefill activations for a query table (Ray Data)."""
    from shared.config import load_config

    cfg = load_config(CaptureConfig, config, overrides or [])
    print_summary(run_capture(cfg), cfg.out)


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli

    return run_cli("prefill-router capture", argv, _capture_command)


if __name__ == "__main__":
    raise SystemExit(main())
