"""An artifact with learned token pooling (``h{layer}_attn`` blocks, :mod:`shared.pooling`): its files, its
router and the encoder-side reduction of the token windows.

Besides :mod:`shared.artifact`'s files, such an artifact (``meta.pooled``, a :class:`shared.pooling.PooledSpec`)
holds::

    transform.safetensors   the vector blocks' FeatureTransform (no arrays when every block is attn)
    weights.safetensors     the PooledTrunkNet members, "m{i}.{state_dict key}" (pools and trunk)
    tokens.safetensors      each attn block's TokenTransform, "a{j}.{mean,scale,components}" (j: meta.pooled order)

all three sha256-checked against ``meta.files`` on load; ``meta.trunk`` describes the members' trunk
(``d_in``: the dense features plus the pooled vectors).

Where the pooling runs. The Encoder replica keeps the last ``window`` states of each attn layer (a prefix-cache
hit assembles them from the prefix's and the suffix's, :func:`shared.pooling.assemble_window`) and applies the
block's frozen :class:`shared.pooling.TokenTransform` itself (:class:`TokenReducer`): what travels to the
router head is ``(W, k)`` float32 per block (k = 64 by default, against the ``(W, D)`` states, D = 576 to 4096+),
with NaN on padded rows (:func:`shared.pooling.reduce_window`). That is 9 to 64 times smaller than the fp16
states, and bit-identical to what training fed the network (training applies the same transform to the same
fp16 states), where fp16 of the reduced values would not be. The head (:class:`PooledRouter`) runs the
learned attention and the trunk. Evaluate (:func:`training.token_states.attn_blocks`) reduces a capture's
windows the same way, so the three agree.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from shared import storage
from shared.artifact import (
    META_FILE, SCHEMA_VERSION, TRANSFORM_FILE, WEIGHTS_FILE, ArtifactError, ArtifactMeta, BlockSpec, Router,
    TransformSpec, TrunkSpec, _read, _sha256, meta_path,
)
from shared.pooling import PooledSpec, PooledTrunkNet, TokenTransform, assemble_window, pad_windows, reduce_window, \
    split_reduced
from shared.trunk import FeatureTransform

TOKENS_FILE = "tokens.safetensors"


def _checked(uri: str, meta: ArtifactMeta, name: str) -> bytes:
    data = _read(uri, name)
    if meta.files.get(name) != _sha256(data):
        raise ArtifactError(f"router artifact at {uri}: {name} does not match its sha256 in {META_FILE}")
    return data


def save_pooled_artifact(uri: str, meta: ArtifactMeta, transform: FeatureTransform, members: Sequence[PooledTrunkNet],
                         tokens: Sequence[TokenTransform], windows: Sequence[int], names: Sequence[str]) -> ArtifactMeta:
    """Write an attn artifact at ``uri`` (``meta.json`` last, as :func:`shared.artifact.save_artifact` does):
    ``members`` share one architecture; ``tokens``/``windows``/``names`` per attn block, in the members' input
    order. Returns the meta as written."""
    from shared.pooling import AttnBlockSpec

    first = members[0]
    spec = first.spec()
    if any(m.spec() != spec for m in members):
        raise ArtifactError("ensemble members differ in architecture")
    if spec["n_targets"] != len(meta.targets) or spec["d_dense"] != transform.d_out:
        raise ArtifactError(f"members read {spec['d_dense']} dense features for {spec['n_targets']} targets; the "
                            f"transform gives {transform.d_out}, meta lists {len(meta.targets)} targets")
    if spec["token_dims"] != [t.k for t in tokens]:
        raise ArtifactError(f"members pool {spec['token_dims']} components, the token transforms give "
                            f"{[t.k for t in tokens]}")
    pooled = PooledSpec(blocks=[AttnBlockSpec(name=n, window=int(w), d_in=int(t.mean.shape[0]), d_out=t.k)
                                for n, w, t in zip(names, windows, tokens)],
                        n_queries=spec["n_queries"], position_window=spec["window"],
                        pool_lr_scale=spec["pool_lr_scale"])
    blobs = {TRANSFORM_FILE: safetensors.numpy.save(transform.to_arrays()),
             WEIGHTS_FILE: safetensors.torch.save({f"m{i}.{k}": v.detach().cpu().contiguous()
                                                   for i, m in enumerate(members) for k, v in m.state_dict().items()}),
             TOKENS_FILE: safetensors.numpy.save({k: v for j, t in enumerate(tokens)
                                                  for k, v in t.to_arrays(f"a{j}").items()})}
    trunk = first.trunk.spec()
    final = ArtifactMeta.model_validate(meta.model_copy(update={
        "schema_version": SCHEMA_VERSION, "adapter": None, "pooled": pooled,
        "transform": TransformSpec(blocks=[BlockSpec(**b) for b in transform.spec()]),
        "trunk": TrunkSpec(**trunk, n_members=len(members)),
        "files": {name: _sha256(data) for name, data in blobs.items()}}).model_dump())
    for name, data in blobs.items():
        storage.write_bytes(storage.join(uri, name), data)
    storage.write_bytes(meta_path(uri), (final.model_dump_json(indent=2) + "\n").encode())
    return final


def load_token_transforms(uri: str, meta: ArtifactMeta) -> list[TokenTransform]:
    """The attn blocks' :class:`TokenTransform` (``meta.pooled`` order) from ``tokens.safetensors``."""
    arrays = safetensors.numpy.load(_checked(uri, meta, TOKENS_FILE))
    return [TokenTransform.from_arrays(f"a{j}", arrays) for j in range(len(meta.pooled.blocks))]


def load_pooled(uri: str, meta: ArtifactMeta) -> "PooledRouter":
    """The :class:`PooledRouter` of the attn artifact at ``uri`` (every file's sha256 checked: the head does not
    apply the token transforms, the encoder does, but a corrupt artifact is refused as a whole)."""
    _checked(uri, meta, TOKENS_FILE)
    transform = FeatureTransform.from_arrays([b.name for b in meta.transform.blocks],
                                             safetensors.numpy.load(_checked(uri, meta, TRANSFORM_FILE)))
    weights = safetensors.torch.load(_checked(uri, meta, WEIGHTS_FILE))
    p, t = meta.pooled, meta.trunk
    members = []
    for i in range(t.n_members):
        net = PooledTrunkNet(transform.d_out, [b.d_out for b in p.blocks], t.n_targets, p.n_queries, t.hidden,
                             t.dropout, p.position_window, p.pool_lr_scale)
        prefix = f"m{i}."
        try:
            net.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        except RuntimeError as exc:
            raise ArtifactError(f"router artifact at {uri}: {WEIGHTS_FILE} does not fit meta.pooled: {exc}") from exc
        members.append(net.eval())
    return PooledRouter(meta, transform, members)


class PooledRouter(Router):
    """A loaded attn artifact: the vector blocks' raw activations and the attn blocks' reduced windows
    (:func:`shared.pooling.reduce_window`, ``(n, W, k)``) -> P(correct), the mean of the members' sigmoids."""

    def __init__(self, meta: ArtifactMeta, transform: FeatureTransform, members: Sequence[PooledTrunkNet]):
        super().__init__(meta, transform, torch.nn.ModuleList(members))

    @property
    def block_names(self) -> list[str]:
        return list(self.transform.names) + self.meta.pooled.names

    @torch.no_grad()
    def predict_proba(self, features_by_block: Mapping[str, np.ndarray], chunk: int = 512) -> np.ndarray:
        """``{vector block: (n, d_b)}`` and ``{attn block: (n, W, k)}`` -> ``(n, T)`` float64."""
        missing = [b for b in self.meta.pooled.names if b not in features_by_block]
        if missing:
            raise ArtifactError(f"features do not match the artifact: attn blocks missing: {missing}")
        tokens = [split_reduced(features_by_block[b]) for b in self.meta.pooled.names]
        n = len(tokens[0][1])
        try:
            X = self.transform.transform(features_by_block) if self.transform.names else np.zeros((n, 0), np.float32)
        except ValueError as exc:
            raise ArtifactError(f"features do not match the artifact: {exc}") from exc
        for spec, (z, _) in zip(self.meta.pooled.blocks, tokens):
            if z.shape[1:] != (spec.window, spec.d_out):
                raise ArtifactError(f"block {spec.name}: expected (n, {spec.window}, {spec.d_out}), got {z.shape}")
        out = []
        for i in range(0, n, chunk):
            x = [torch.as_tensor(X[i:i + chunk])]
            for z, m in tokens:
                x += [torch.as_tensor(z[i:i + chunk]), torch.as_tensor(m[i:i + chunk])]
            out.append(torch.stack([torch.sigmoid(net(*x)) for net in self.ensemble]).mean(dim=0).double().numpy())
        return np.concatenate(out, axis=0)


class TokenReducer:
    """The Encoder's side of an attn artifact: from each prompt's kept token states (its own last ones and,
    when prefix-shared, its prefix's tail) to every attn block's reduced window ``(W, k)`` (NaN-padded)."""

    def __init__(self, spec: PooledSpec, transforms: Sequence[TokenTransform]):
        self.spec, self.transforms = spec, list(transforms)

    @classmethod
    def from_artifact(cls, uri: str, meta: ArtifactMeta) -> "TokenReducer | None":
        return cls(meta.pooled, load_token_transforms(uri, meta)) if meta.pooled is not None else None

    @property
    def layers(self) -> list[int]:
        return self.spec.layers

    @property
    def window(self) -> int:
        return self.spec.window

    @property
    def block_names(self) -> list[str]:
        return self.spec.names

    def shape(self, name: str) -> tuple[int, int]:
        b = self.spec.blocks[self.spec.names.index(name)]
        return b.window, b.d_out

    def features(self, own: Sequence[Mapping[int, Any]], prefix: Mapping[int, Any] | None) -> dict[str, np.ndarray]:
        """``own``: per prompt ``{layer: (t, D)}`` fp16 (numpy or torch); ``prefix``: the prompts' common prefix's
        ``{layer: (p, D)}`` or None -> ``{attn block: (B, W, k)}`` float32 (:func:`shared.pooling.reduce_window`)."""
        def arr(x: Any) -> np.ndarray:
            return x.numpy() if hasattr(x, "numpy") else np.asarray(x)

        out = {}
        for spec, tt in zip(self.spec.blocks, self.transforms):
            before = arr(prefix[spec.layer]) if prefix is not None else None
            states, mask = pad_windows([assemble_window(arr(row[spec.layer]), before, spec.window) for row in own],
                                       spec.window)
            out[spec.name] = reduce_window(tt, states, mask)
        return out
