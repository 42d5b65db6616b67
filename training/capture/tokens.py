"""Per-token states in a capture: the input of ``h{layer}_attn`` blocks (:mod:`shared.pooling`).

With ``token_layers`` set, each shard row also holds, per token layer ``l``, column ``t{l}``: the fp16
bytes of the states of the prompt's own last tokens, ``n_states`` rows of ``hidden_size`` (at most
``token_window``), and ``prefix_key``: "" or the key of the shared prefix the row's suffix continues
(:func:`shared.prefix.prefix_key`), whose last ``token_window`` states are written once per prefix to
``<out>/prefixes/<key>.parquet`` (columns ``layer``, ``n``, ``states``, fp16 bytes). A prompt's window
is its prefix's tail followed by its own states (:func:`shared.pooling.assemble_window`), the same
states a full forward gives (causal attention). The window is the prompt's last ``token_window``
tokens whether or not a prefix was shared, so the block's definition does not depend on the cache.

Before any actor starts, :func:`plan_tokens` tokenizes the table on the driver, prints the size
estimate (without prefix dedup: an upper bound) and refuses when it exceeds ``token_limit_gb``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from shared.errors import BadInput

log = logging.getLogger(__name__)

from training.token_states import PREFIX_DIR, token_column

__all__ = ["PREFIX_DIR", "plan_tokens", "token_column", "token_table_columns", "udf_columns", "write_prefixes"]


def plan_tokens(cfg: Any, plan: Any, table: pa.Table) -> dict[str, Any]:
    """Check ``cfg``'s token settings against the encoder ``plan``; tokenize ``table``'s prompts on the driver
    and estimate the token states' size. Returns ``{layers, window, prompts, states, gb}`` ({} when off);
    raises :class:`BadInput` above ``token_limit_gb``."""
    from shared.encoder import resolve_layers
    from shared.models import load_tokenizer

    if not cfg.token_layers:
        return {}
    layers = resolve_layers(cfg.token_layers, plan.num_layers, plan.spec.name)
    if len(layers) > 2:
        raise BadInput(f"token_layers {layers}: at most 2 layers keep their per-token states (each costs "
                       "token_window x hidden_size fp16 values per prompt); name one or two")
    tok = load_tokenizer(plan.spec)
    texts = [tok.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False)
             for m in table.column("messages").to_pylist()]
    lengths = np.array([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]])
    states = int(np.minimum(lengths, min(cfg.max_tokens, cfg.token_window)).sum())
    gb = states * plan.hidden_size * 2 * len(layers) / 2**30
    message = (f"token states: {len(layers)} layer(s) {layers} x {states:,} tokens (the last {cfg.token_window} "
               f"of each of {len(lengths):,} prompts) x {plan.hidden_size} x fp16 = {gb:.2f} GiB at most "
               f"(a shared prefix's states are stored once); limit token_limit_gb={cfg.token_limit_gb}")
    log.info(message)
    print(message, flush=True)
    if gb > cfg.token_limit_gb:
        raise BadInput(f"{message}: too large. Lower token_window, keep fewer token_layers, capture fewer "
                       "queries, or raise token_limit_gb")
    return {"layers": layers, "window": cfg.token_window, "prompts": len(lengths), "states": states, "gb": gb}


def udf_columns(result: Any, layers: list[int]) -> dict[str, np.ndarray]:
    """A capture batch's token columns from an :class:`shared.encoder.Encoded`: ``t{l}`` (fp16 bytes),
    ``n_states``, ``prefix_key``, and ``_prefix_t{l}`` carrying each prefix's states once per batch
    (on the first row that refers to it; ``b""`` elsewhere)."""
    n = len(result.tokens)
    out = {token_column(layer): np.array([result.tokens[i][layer].astype(np.float16).tobytes() for i in range(n)],
                                         dtype=object) for layer in layers}
    out["n_states"] = np.array([len(result.tokens[i][layers[0]]) for i in range(n)], dtype=np.int32)
    out["prefix_key"] = np.array(result.prefix_keys, dtype=object)
    seen: set[str] = set()
    for layer in layers:
        out[f"_prefix_{token_column(layer)}"] = np.array([b""] * n, dtype=object)
    for i, key in enumerate(result.prefix_keys):
        if key and key not in seen:
            seen.add(key)
            for layer in layers:
                out[f"_prefix_{token_column(layer)}"][i] = result.prefixes[key][layer].astype(np.float16).tobytes()
    return out


def write_prefixes(out: str, batch: dict[str, np.ndarray], layers: list[int], hidden: int,
                   written: set[str]) -> None:
    """Write ``<out>/prefixes/<key>.parquet`` for every prefix payload of ``batch`` not yet in ``written``."""
    from shared import storage

    for i, key in enumerate(batch["prefix_key"]):
        payloads = [batch[f"_prefix_{token_column(layer)}"][i] for layer in layers]
        if not key or key in written or not payloads[0]:
            continue
        table = pa.table({"layer": pa.array(layers, pa.int32()),
                          "n": pa.array([len(p) // (2 * hidden) for p in payloads], pa.int32()),
                          "states": pa.array(payloads, pa.binary())})
        storage.write_parquet(table, storage.join(out, PREFIX_DIR, f"{key}.parquet"))
        written.add(str(key))


def token_table_columns(rows: list[dict[str, Any]], layers: list[int]) -> dict[str, pa.Array]:
    """The shard's token columns from its rows (see the module docstring)."""
    cols = {token_column(layer): pa.array([bytes(r[token_column(layer)]) for r in rows], pa.binary())
            for layer in layers}
    cols["n_states"] = pa.array([int(r["n_states"]) for r in rows], pa.int32())
    cols["prefix_key"] = pa.array([str(r["prefix_key"]) for r in rows], pa.string())
    return cols
