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
    its prefix's; ``window`` defaults to the capture's ``token_window`` (a smaller one keeps the last tokens)."""
    from shared import storage
    from shared.pooling import assemble_window, pad_windows
    from training.shards import read_shards

    manifest = storage.read_json(storage.join(out, "manifest.json"))["identity"]
    if layer not in manifest.get("token_layers", []):
        raise BadInput(f"{out} has no token states of layer {layer} (token_layers: "
                       f"{manifest.get('token_layers', [])}); capture with token_layers=[{layer}]")
    window, hidden = window or manifest["token_window"], manifest["hidden_size"]
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
    states, mask = pad_windows(windows, window)
    return [ids[i] for i in rows], states, mask


def adapted_blocks(out: str, artifact_uri: str, meta, query_ids: list[str], n_tokens: np.ndarray) -> dict[str, np.ndarray]:
    """An adapted artifact's blocks (``h{L+k}a{L}_{pooling}``, :mod:`shared.adapter`) for captured rows: its adapter
    over each row's window of layer ``L`` read from the capture at ``out`` (``query_ids`` in that order, prompt
    lengths ``n_tokens``), as the Encoder replica computes them. ``{block: (n, D)}`` float32; {} without an
    adapter. Refuses a capture without layer ``L``'s token states or with a shorter window than the adapter's."""
    from shared import storage
    from shared.artifact import load_adapter
    from shared.models import load_causal_lm
    from shared.registry import load_registry

    spec = meta.adapter
    if spec is None:
        return {}
    identity = storage.read_json(storage.join(out, "manifest.json"))["identity"]
    if spec.from_layer not in identity.get("token_layers", []) or identity.get("token_window", 0) < spec.window:
        raise BadInput(f"the artifact's adapter reads the last {spec.window} states of layer {spec.from_layer}; {out} "
                       f"keeps token_layers {identity.get('token_layers', [])}, token_window "
                       f"{identity.get('token_window')}: capture with token_layers=[{spec.from_layer}] "
                       f"token_window={spec.window}")
    _, states, mask = read_token_windows(out, spec.from_layer, spec.window, list(query_ids))
    adapter = load_adapter(artifact_uri, load_causal_lm(load_registry().encoder(meta.encoder.name), device="cpu").model,
                           meta)
    return adapter.features(states, mask, np.asarray(n_tokens))


def attn_blocks(out: str, artifact_uri: str, meta, query_ids: list[str]) -> dict[str, np.ndarray]:
    """An attn artifact's blocks (``meta.pooled``, :mod:`shared.pooled_artifact`) for captured rows: each block's
    window of its layer read from the capture at ``out`` (``query_ids`` in that order) and reduced by the
    artifact's token transform, as the Encoder replica sends it. ``{block: (n, W, k)}`` float32, NaN-padded;
    {} without attn blocks. Refuses a capture without the layers' token states or with a shorter window."""
    from shared import storage
    from shared.pooled_artifact import token_reducer
    from shared.pooling import reduce_window

    pooled = getattr(meta, "pooled", None)
    if pooled is None:
        return {}
    identity = storage.read_json(storage.join(out, "manifest.json"))["identity"]
    kept, window = identity.get("token_layers", []), identity.get("token_window", 0)
    if any(layer not in kept for layer in pooled.layers) or window < pooled.window:
        raise BadInput(f"the artifact's attn blocks {pooled.names} read the last {pooled.window} states of layers "
                       f"{pooled.layers}; {out} keeps token_layers {kept}, token_window {window}: capture with "
                       f"token_layers={pooled.layers} token_window={pooled.window} (capture artifact=<uri> sets both)")
    transforms = token_reducer(artifact_uri, meta).transforms
    blocks = {}
    for spec, tt in zip(pooled.blocks, transforms):
        _, states, mask = read_token_windows(out, spec.layer, spec.window, list(query_ids))
        blocks[spec.name] = reduce_window(tt, states, mask)
    return blocks


def attn_capture(meta, wanted: dict) -> dict:
    """What a capture for an attn artifact must add to ``wanted`` (the encoder, layers and poolings
    ``capture artifact=<uri>`` takes from it): ``token_layers`` (``wanted``'s, plus the attn layers) and
    ``token_window`` (at least the attn blocks'); an attn-only artifact still names one pooled column (``last``
    at its first attn layer: capture writes vector columns). ``{}`` without attn blocks."""
    pooled = getattr(meta, "pooled", None)
    if pooled is None:
        return {}
    add = {"token_layers": sorted(set(wanted.get("token_layers", [])) | set(pooled.layers)),
           "token_window": max(int(wanted.get("token_window", 0)), pooled.window)}
    if not wanted.get("layers"):
        add.update(layers=pooled.layers[:1], poolings=["last"])
    return add
