"""Writing and reading the files of an artifact with learned token pooling (``meta.pooled``; schema 4).

Besides :mod:`shared.artifact`'s ``meta.json``, such an artifact holds::

    transform.safetensors   the vector blocks' FeatureTransform (no arrays when every block is attn)
    weights.safetensors     the PooledTrunkNet members, "m{i}.{state_dict key}" (pools and trunk)
    tokens.safetensors      each attn block's TokenTransform, "a{j}.{mean,scale,components}" (meta.pooled order)

all three sha256-checked against ``meta.files`` on load (:func:`shared.artifact.load_artifact`, which builds the
router from them with :func:`shared.pooled_head.pooled_parts`); ``meta.trunk`` describes the members' trunk
(``d_in``: the dense features plus the pooled vectors). The numeric side is :mod:`shared.pooled_head`.
"""

from __future__ import annotations

from typing import Sequence

import safetensors.numpy
import safetensors.torch

from shared import storage
from shared.artifact import (
    SCHEMA_VERSION, TRANSFORM_FILE, WEIGHTS_FILE, ArtifactError, ArtifactMeta, BlockSpec, TransformSpec, TrunkSpec,
    load_artifact, meta_path, _sha256,
)
from shared.pooled_head import TOKENS_FILE, TokenReducer
from shared.pooling import AttnBlockSpec, PooledSpec, PooledTrunkNet, TokenTransform
from shared.trunk import FeatureTransform


def pooled_spec(members: Sequence[PooledTrunkNet], transform: FeatureTransform, tokens: Sequence[TokenTransform],
                windows: Sequence[int], names: Sequence[str], n_targets: int) -> PooledSpec:
    """``meta.pooled`` of ``members`` (one architecture, checked against the transforms and ``n_targets``)."""
    spec = members[0].spec()
    if any(m.spec() != spec for m in members):
        raise ArtifactError("ensemble members differ in architecture")
    if spec["n_targets"] != n_targets or spec["d_dense"] != transform.d_out or spec["token_dims"] != [t.k for t in tokens]:
        raise ArtifactError(f"members read {spec['d_dense']} dense features and {spec['token_dims']} token components "
                            f"for {spec['n_targets']} targets; the transforms give {transform.d_out} and "
                            f"{[t.k for t in tokens]}, meta lists {n_targets} targets")
    return PooledSpec(blocks=[AttnBlockSpec(name=n, window=int(w), d_in=int(t.mean.shape[0]), d_out=t.k)
                              for n, w, t in zip(names, windows, tokens)],
                      n_queries=spec["n_queries"], position_window=spec["window"], pool_lr_scale=spec["pool_lr_scale"])


def save_pooled_artifact(uri: str, meta: ArtifactMeta, transform: FeatureTransform, members: Sequence[PooledTrunkNet],
                         tokens: Sequence[TokenTransform], windows: Sequence[int], names: Sequence[str]) -> ArtifactMeta:
    """Write an attn artifact at ``uri`` (``meta.json`` last, as :func:`shared.artifact.save_artifact` does):
    ``members`` share one architecture; ``tokens``/``windows``/``names`` per attn block, in the members' input
    order. Returns the meta as written."""
    pooled = pooled_spec(members, transform, tokens, windows, names, len(meta.targets))
    blobs = {TRANSFORM_FILE: safetensors.numpy.save(transform.to_arrays()),
             WEIGHTS_FILE: safetensors.torch.save({f"m{i}.{k}": v.detach().cpu().contiguous()
                                                   for i, m in enumerate(members) for k, v in m.state_dict().items()}),
             TOKENS_FILE: safetensors.numpy.save({k: v for j, t in enumerate(tokens)
                                                  for k, v in t.to_arrays(f"a{j}").items()})}
    final = ArtifactMeta.model_validate(meta.model_copy(update={
        "schema_version": SCHEMA_VERSION, "adapter": None, "pooled": pooled,
        "transform": TransformSpec(blocks=[BlockSpec(**b) for b in transform.spec()]),
        "trunk": TrunkSpec(**members[0].trunk.spec(), n_members=len(members)),
        "files": {name: _sha256(data) for name, data in blobs.items()}}).model_dump())
    for name, data in blobs.items():
        storage.write_bytes(storage.join(uri, name), data)
    storage.write_bytes(meta_path(uri), (final.model_dump_json(indent=2) + "\n").encode())
    return final


def token_reducer(uri: str, meta: ArtifactMeta | None = None) -> TokenReducer | None:
    """The Encoder's :class:`shared.pooled_head.TokenReducer` of the artifact at ``uri`` (its token transforms,
    every file checked by :func:`shared.artifact.load_artifact`); None without attn blocks."""
    if meta is not None and meta.pooled is None:
        return None
    router = load_artifact(uri)
    pooled = router.meta.pooled
    return TokenReducer(pooled, router.transform.tokens) if pooled is not None else None
