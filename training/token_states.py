"""Reading the per-token states a capture keeps (``token_layers``; written by :mod:`training.capture.tokens`),
shared by every stage that trains or scores an ``h{layer}_attn`` block (:mod:`shared.pooling`).

A shard row holds column ``t{layer}`` (fp16 bytes of the prompt's own last token states), ``n_states`` and
``prefix_key``; a prefix-shared row's window continues the states in ``<out>/prefixes/<key>.parquet``.
"""

from __future__ import annotations

import numpy as np

from shared.errors import BadInput

PREFIX_DIR = "prefixes"


def token_column(layer: int) -> str:
    """The shard column of token layer ``layer``: ``t{layer}``."""
    return f"t{int(layer)}"


def read_token_windows(out: str, layer: int, window: int | None = None,
                       query_ids: list[str] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``(query ids, states (n, W, D) fp16, mask (n, W) bool)`` of token layer ``layer`` over the finished
    shards (``query_ids``: those rows, in that order), each row's window reassembled from its own states and
    its prefix's; ``window`` defaults to the capture's ``token_window`` (a smaller one keeps the last tokens).
    Refuses a capture without that layer's token states or with a shorter window: every reader (tune, fit,
    adapt, evaluate) checks here."""
    from shared import storage
    from shared.pooling import assemble_window, pad_windows
    from training.shards import read_shards

    manifest = storage.read_json(storage.join(out, "manifest.json"))["identity"]
    kept, captured = manifest.get("token_layers", []), manifest.get("token_window", 0)
    if layer not in kept or (window or 0) > captured:
        raise BadInput(f"{out} keeps token states of layers {kept} over the last {captured} tokens; asked for layer "
                       f"{layer} over {window or captured} (a longer window would hold states the capture never "
                       f"kept): capture with token_layers=[{layer}] token_window={window or captured} (`capture "
                       "artifact=<uri>` sets both for an artifact)")
    window, hidden = window or captured, manifest["hidden_size"]
    col = token_column(layer)
    table = read_shards(out).select(["query_id", col, "n_states", "prefix_key"])
    ids = table.column("query_id").to_pylist()
    index = {q: i for i, q in enumerate(ids)}
    rows = range(len(ids)) if query_ids is None else [index[q] for q in query_ids]
    blobs, keys = table.column(col).to_pylist(), table.column("prefix_key").to_pylist()
    prefixes: dict[str, np.ndarray] = {}
    windows = []
    for i in rows:
        own = np.frombuffer(blobs[i], dtype=np.float16).reshape(-1, hidden)
        key = keys[i]
        if key and len(own) < window and key not in prefixes:
            p = storage.read_parquet(storage.join(out, PREFIX_DIR, f"{key}.parquet"))
            at = p.column("layer").to_pylist().index(layer)
            prefixes[key] = np.frombuffer(p.column("states")[at].as_py(), dtype=np.float16).reshape(-1, hidden)
        windows.append(assemble_window(own, prefixes.get(key) if key else None, window))
    bad = sum(not np.isfinite(w).all() for w in windows)
    if bad:
        raise BadInput(f"{out}: the layer-{layer} token states of {bad} of {len(windows)} rows hold inf or NaN (float16 "
                       "overflow: the encoder's states passed 65504 in a capture made before they were clipped); "
                       "capture again")
    states, mask = pad_windows(windows, window)
    return [ids[i] for i in rows], states, mask


def adapted_blocks(out: str, artifact_uri: str, meta, query_ids: list[str], n_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """An adapted artifact's blocks (``h{L+k}a{L}_{pooling}``, :mod:`shared.adapter`) for captured rows: its adapter
    over each row's window of layer ``L`` read from the capture at ``out`` (``query_ids`` in that order, prompt
    lengths ``n_tokens``), as the Encoder replica computes them. ``{block: (n, D)}`` float32; {} without an
    adapter. Refuses a capture without layer ``L``'s token states or with a shorter window than the adapter's."""
    from shared.artifact import load_adapter
    from shared.models import load_causal_lm
    from shared.registry import load_registry

    spec = meta.adapter
    if spec is None:
        return {}
    _, states, mask = read_token_windows(out, spec.from_layer, spec.window, list(query_ids))
    adapter = load_adapter(artifact_uri, load_causal_lm(load_registry().encoder(meta.encoder.name), device="cpu").model,
                           meta)
    return adapter.features(states, mask, np.asarray(n_tokens))


def attn_blocks(out: str, artifact_uri: str, meta, query_ids: list[str]) -> dict[str, np.ndarray]:
    """An attn artifact's blocks (``meta.pooled``, :mod:`shared.pooled_artifact`) for captured rows: each block's
    window of its layer read from the capture at ``out`` (``query_ids`` in that order) and reduced by the
    artifact's token transform, as the Encoder replica sends it. ``{block: (n, W, k)}`` float32, NaN-padded;
    {} without attn blocks. Refuses a capture without the layers' token states or with a shorter window."""
    from shared.pooled_artifact import token_reducer
    from shared.pooling import reduce_window

    pooled = getattr(meta, "pooled", None)
    if pooled is None:
        return {}
    transforms = token_reducer(artifact_uri, meta).transforms
    blocks = {}
    for spec, tt in zip(pooled.blocks, transforms):
        _, states, mask = read_token_windows(out, spec.layer, spec.window, list(query_ids))
        blocks[spec.name] = reduce_window(tt, states, mask)
    return blocks


def token_capture(meta, wanted: dict) -> dict:
    """What ``capture artifact=<uri>`` must add to ``wanted`` (the encoder, layers and poolings it takes from the
    artifact) for the blocks the artifact computes from token states: an adapter's layer ``L`` over its window,
    attn blocks' layers over theirs. ``token_layers``: ``wanted``'s plus these; ``token_window``: the longest
    asked for; an artifact without a captured vector block still names one (``last`` at the first such layer:
    capture writes vector columns). ``{}`` when the artifact reads no token states."""
    adapter, pooled = getattr(meta, "adapter", None), getattr(meta, "pooled", None)
    needs = ([(adapter.from_layer, adapter.window)] if adapter else []) + \
        ([(layer, pooled.window) for layer in pooled.layers] if pooled else [])
    if not needs:
        return {}
    add = {"token_layers": sorted(set(wanted.get("token_layers", [])) | {layer for layer, _ in needs}),
           "token_window": max([int(wanted.get("token_window", 0))] + [w for _, w in needs])}
    if not wanted.get("layers"):
        add.update(layers=[needs[0][0]], poolings=["last"])
    return add
