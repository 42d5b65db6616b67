"""The numeric side of an artifact with learned token pooling (``h{layer}_attn`` blocks, :mod:`shared.pooling`):
what :class:`shared.artifact.Router` runs for it, and the encoder-side reduction of the token windows.

:func:`shared.artifact.load_artifact` builds, for an artifact with ``meta.pooled`` (a
:class:`shared.pooling.PooledSpec`), a ``Router`` whose ``transform`` is a :class:`PooledTransform` and whose
``ensemble`` is a :class:`PooledEnsemble` (:func:`pooled_parts`), so the router's interface is unchanged:
``predict_proba({block: features})`` takes the vector blocks' raw activations ``(n, d_b)`` and each attn
block's reduced window ``(n, W, k)``. The files are :mod:`shared.pooled_artifact`'s.

Where the pooling runs. The Encoder replica keeps the last ``window`` states of each attn layer (a prefix-cache
hit assembles them from the prefix's and the suffix's, :func:`shared.pooling.assemble_window`) and applies the
block's frozen :class:`shared.pooling.TokenTransform` itself (:class:`TokenReducer`): what travels to the
router head is ``(W, k)`` float32 per block (k = 64 by default, against the ``(W, D)`` states, D = 576 to 4096+),
with NaN on padded rows (:func:`shared.pooling.reduce_window`). That is 4.5 to 32 times fewer bytes than the
fp16 states (D / k times fewer values, 4 bytes each against 2), and bit-identical to what training fed the
network (training applies the same transform to the same fp16 states), where fp16 of the reduced values would
not be. The head runs the learned attention and the trunk.
Evaluate (:func:`training.token_states.attn_blocks`) reduces a capture's windows the same way.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch

from shared.errors import MissingArtifact
from shared.pooling import PooledSpec, PooledTrunkNet, TokenTransform, assemble_window, pad_windows, reduce_window, \
    split_reduced
from shared.trunk import FeatureTransform

TOKENS_FILE = "tokens.safetensors"  # the attn blocks' TokenTransforms, "a{j}.{mean,scale,components}"


class PooledTransform:
    """The vector blocks' :class:`shared.trunk.FeatureTransform` (``dense``, possibly of no blocks) and the attn
    blocks' token transforms (``tokens``, ``spec.blocks`` order): features -> a :class:`PooledTrunkNet`'s inputs."""

    def __init__(self, dense: FeatureTransform, spec: PooledSpec, tokens: Sequence[TokenTransform]):
        self.dense, self.spec, self.tokens = dense, spec, list(tokens)

    @property
    def names(self) -> list[str]:
        """Every block the router reads: the vector ones, then the attn ones."""
        return list(self.dense.names) + self.spec.names

    def transform(self, blocks: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        """``{vector block: (n, d_b)}`` and ``{attn block: (n, W, k)}`` reduced windows ->
        ``(X (n, d_dense), z_1 (n, W, k), m_1 (n, W) bool, ...)``; ``ValueError`` on a missing block or shape."""
        missing = [b for b in self.spec.names if b not in blocks]
        if missing:
            raise ValueError(f"attn blocks missing: {missing}; expected {self.names}")
        tokens = []
        for b in self.spec.blocks:
            z = np.asarray(blocks[b.name])
            if z.ndim != 3 or z.shape[1:] != (b.window, b.d_out):
                raise ValueError(f"block {b.name!r}: expected (n, {b.window}, {b.d_out}), got {z.shape}")
            tokens += split_reduced(z)
        n = len(tokens[0])
        X = self.dense.transform(blocks) if self.dense.names else np.zeros((n, 0), dtype=np.float32)
        return (X, *tokens)


class PooledEnsemble(torch.nn.Module):
    """:class:`PooledTrunkNet` members; ``predict_proba`` is the mean of their sigmoids (eval mode)."""

    def __init__(self, members: Sequence[PooledTrunkNet]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    @torch.no_grad()
    def predict_proba(self, inputs: tuple[np.ndarray, ...], chunk: int = 512) -> np.ndarray:
        """:meth:`PooledTransform.transform`'s inputs -> ``(n, T)`` float64."""
        self.eval()
        out = []
        for i in range(0, len(inputs[0]), chunk):
            x = [torch.as_tensor(a[i:i + chunk]) for a in inputs]
            out.append(torch.stack([torch.sigmoid(m(*x)) for m in self.members]).mean(dim=0).double().numpy())
        return np.concatenate(out, axis=0)


def pooled_parts(meta: Any, arrays: Mapping[str, bytes], transform_file: str,
                 weights_file: str) -> tuple[PooledTransform, PooledEnsemble]:
    """A :class:`PooledTransform` and :class:`PooledEnsemble` from an attn artifact's ``meta`` and its files'
    bytes (``arrays``: checksums already checked; ``transform_file``/``weights_file``: their names)."""
    p, t = meta.pooled, meta.trunk
    dense = FeatureTransform.from_arrays([b.name for b in meta.transform.blocks],
                                         safetensors.numpy.load(arrays[transform_file]))
    token_arrays = safetensors.numpy.load(arrays[TOKENS_FILE])
    tokens = [TokenTransform.from_arrays(f"a{j}", token_arrays) for j in range(len(p.blocks))]
    weights = safetensors.torch.load(arrays[weights_file])
    members = []
    for i in range(t.n_members):
        net = PooledTrunkNet(dense.d_out, [b.d_out for b in p.blocks], t.n_targets, p.n_queries, t.hidden,
                             t.dropout, p.position_window, p.pool_lr_scale)
        prefix = f"m{i}."
        try:
            net.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
        except RuntimeError as exc:
            raise MissingArtifact(f"{weights_file} does not fit the artifact's meta.pooled/trunk: {exc}") from exc
        members.append(net.eval())
    return PooledTransform(dense, p, tokens), PooledEnsemble(members).eval()


class TokenReducer:
    """The Encoder's side of an attn artifact: from each prompt's kept token states (its own last ones and,
    when prefix-shared, its prefix's tail) to every attn block's reduced window ``(W, k)`` (NaN-padded)."""

    def __init__(self, spec: PooledSpec, transforms: Sequence[TokenTransform]):
        self.spec, self.transforms = spec, list(transforms)

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
