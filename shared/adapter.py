"""A lightly adapted encoder: the top ``k`` decoder blocks, fine-tuned on the routing labels.

The frozen encoder (:mod:`shared.encoder`) runs the prompt's prefill up to layer ``L`` (``from_layer``, a
``hidden_states`` index: the output of decoder block ``L``). :class:`AdaptedTop` then runs ``k``
(``n_blocks``) decoder blocks of the encoder's own architecture over the last ``W`` (``window``) states of
layer ``L`` and pools them: block names ``h{L+k}a{L}_{pooling}`` (:func:`shared.features.adapted_block_name`).
Training (``prefill-router adapt``, :mod:`training.adapt`) and serving (the Encoder replica) run exactly this
class, so their features are identical for the same window.

The forward, for a prompt of ``n`` tokens whose window holds its last ``t <= W`` states ``x`` ``(t, D)``
(right-padded to ``W``; ``mask`` True on the ``t`` real rows):

- positions ``n - t, ..., n - 1`` (the tokens' original positions; padded rows continue them and are never
  read), turned into rotary ``(cos, sin)`` by the model's own rotary module (rotary attention reads only
  relative positions, so the offset matters to rounding only; the original ones give the full forward's);
- a causal mask over the window: row ``i`` attends to the real rows ``j <= i`` (additive ``0`` / ``-inf``
  mask ``(B, 1, W, W)``); tokens before the window are not seen, so with ``t = n`` the output equals the
  full model's;
- blocks ``L + 1 .. L + k`` (initialised from the pretrained ``model.model.layers[L:L + k]``), then the
  final norm only when ``L + k`` is the model's last layer (the encoder's convention);
- ``last``: the state of the last real row; ``mean``: the mean over the real rows (the window, not the
  whole prompt) (:func:`shared.features.pool`).

So, untrained and with the window covering the whole prompt, ``h{L+k}a{L}_last`` equals the frozen
encoder's ``h{L+k}_last`` (up to float reassociation); a test checks it on SmolLM2.

Supported: decoder layers that take ``position_embeddings`` from one rotary module and attend to the whole
context (Llama, Qwen, SmolLM). Models whose adapted layers use sliding-window attention are refused.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from shared.config import StrictConfig
from shared.errors import BadInput
from shared.features import adapted_block_name, pool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class AdapterSpec(StrictConfig):
    """What an artifact's adapter is (``meta.adapter``); its weights are ``adapter.safetensors``."""

    from_layer: int = Field(ge=0, description="Frozen layer L (a hidden_states index) whose last states the "
                                              "adapted blocks read.")
    n_blocks: int = Field(gt=0, description="Adapted decoder blocks k: blocks L+1..L+k of the encoder.")
    window: int = Field(gt=0, description="Last prompt tokens W whose layer-L states the blocks run over.")
    poolings: list[Literal["last", "mean"]] = Field(min_length=1, description="Poolings over the window, one "
                                                                              "feature block each.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="The blocks' weights dtype.")

    @field_validator("poolings")
    @classmethod
    def _distinct(cls, poolings: list[str]) -> list[str]:
        if len(set(poolings)) != len(poolings):
            raise ValueError(f"poolings repeat: {poolings}")
        return poolings

    @model_validator(mode="after")
    def _names(self) -> "AdapterSpec":
        self.block_names()
        return self

    @property
    def to_layer(self) -> int:
        return self.from_layer + self.n_blocks

    def block_names(self) -> list[str]:
        """``[h{L+k}a{L}_{pooling}, ...]`` in ``poolings`` order."""
        return [adapted_block_name(self.to_layer, self.from_layer, p) for p in self.poolings]


def window_positions(n_tokens: torch.Tensor, n_real: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, W)`` long: row ``b``'s positions ``n_b - t_b + j`` for ``j < W`` (``n_tokens`` ``(B,)`` the
    prompt lengths, ``n_real`` ``(B,)`` the real states in each window, ``t_b <= min(n_b, W)``)."""
    start = (n_tokens.long() - n_real.long()).unsqueeze(1)
    return start + torch.arange(window, device=n_tokens.device).unsqueeze(0)


def causal_window_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(B, 1, W, W)`` additive mask: 0 where query row ``i`` may read key row ``j`` (``j <= i`` and
    ``mask[b, j]``), the dtype's most negative value elsewhere. With the real rows first, every query row
    has at least one key (row 0), so no softmax row is empty."""
    w = mask.shape[1]
    causal = torch.ones((w, w), dtype=torch.bool, device=mask.device).tril()
    allowed = causal.unsqueeze(0) & mask.bool().unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


class AdaptedTop(torch.nn.Module):
    """``k`` decoder blocks (+ the final norm at the model's top) over a window of layer-``L`` states.

    Build it with :meth:`from_model` (weights copied from the pretrained blocks ``L+1..L+k``; the loaded
    model is not modified), then ``load_state_dict`` an artifact's trained weights when serving."""

    def __init__(self, spec: AdapterSpec, blocks: Sequence[torch.nn.Module], rotary: torch.nn.Module,
                 norm: torch.nn.Module | None):
        super().__init__()
        self.spec = spec
        self.blocks = torch.nn.ModuleList(blocks)
        self.rotary = rotary
        self.norm = norm if norm is not None else torch.nn.Identity()

    @classmethod
    def from_model(cls, model: Any, spec: AdapterSpec) -> "AdaptedTop":
        """Copies of ``model.model.layers[L:L+k]`` (a causal LM of transformers), its rotary module and,
        when ``L + k`` is the model's last layer, its final norm, as ``spec.dtype``."""
        base, config = model.model, model.config
        total = int(config.num_hidden_layers)
        if spec.to_layer > total:
            raise BadInput(f"adapter from layer {spec.from_layer} with {spec.n_blocks} blocks needs layer "
                           f"{spec.to_layer}; the model has {total} blocks")
        types = getattr(config, "layer_types", None) or []
        sliding = [i for i in range(spec.from_layer, spec.to_layer) if i < len(types) and types[i] != "full_attention"]
        if sliding or not hasattr(base, "rotary_emb"):
            raise BadInput(f"adapted blocks need full attention and one rotary module; {config.model_type} blocks "
                           f"{[i + 1 for i in sliding]} use {'sliding-window attention' if sliding else 'another'}")
        blocks = [copy.deepcopy(base.layers[i]) for i in range(spec.from_layer, spec.to_layer)]
        norm = copy.deepcopy(base.norm) if spec.to_layer == total else None
        top = cls(spec, blocks, copy.deepcopy(base.rotary_emb), norm)
        return top.to(device=next(base.parameters()).device, dtype=DTYPES[spec.dtype]).train(False)

    @property
    def block_names(self) -> list[str]:
        return self.spec.block_names()

    def hidden(self, states: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """``(B, W, D)`` states at layer ``L + k`` (normed at the model's top) from ``states`` ``(B, W, D)``
        (layer ``L``, real rows first), ``mask`` ``(B, W)`` bool and ``n_tokens`` ``(B,)`` prompt lengths."""
        dtype = DTYPES[self.spec.dtype]
        mask = mask.bool()
        if not bool(mask[:, 0].all()):
            raise BadInput("every window needs at least one real state, the real ones first (right padding)")
        x = states.to(dtype).masked_fill(~mask.unsqueeze(-1), 0.0)  # padded rows: never NaN into a value product
        positions = window_positions(n_tokens, mask.sum(dim=1), x.shape[1])
        cos_sin = self.rotary(x, positions)
        attn = causal_window_mask(mask, dtype)
        for block in self.blocks:
            out = block(x, attention_mask=attn, position_ids=positions, position_embeddings=cos_sin,
                        use_cache=False)
            x = out[0] if isinstance(out, tuple) else out
        return self.norm(x)

    def forward(self, states: torch.Tensor, mask: torch.Tensor, n_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{h{L+k}a{L}_{pooling}: (B, D)}``, pooled over each window's real rows (see :meth:`hidden`)."""
        h = self.hidden(states, mask, n_tokens)
        return {name: pool(h, mask, p) for name, p in zip(self.block_names, self.spec.poolings)}

    @torch.no_grad()
    def features(self, states: np.ndarray, mask: np.ndarray, n_tokens: np.ndarray,
                 chunk: int = 32) -> dict[str, np.ndarray]:
        """:meth:`forward` in eval mode over numpy arrays, ``chunk`` rows of similar length at a time, each
        chunk's windows cut to its longest real one (the cut columns are padding: nothing changes):
        ``{name: (n, D)}`` float32 in input order (the training side's and the serving side's features alike)."""
        was, device = self.training, next(self.parameters()).device
        mask = np.asarray(mask, dtype=bool)
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = {name: np.empty((len(mask), states.shape[2]), dtype=np.float32) for name in self.block_names}
        self.eval()
        try:
            for i in range(0, len(order), chunk):
                rows = order[i:i + chunk]
                t = max(int(lengths[rows].max()), 1)
                got = self(torch.as_tensor(np.asarray(states[rows][:, :t], dtype=np.float32)).to(device),
                           torch.as_tensor(mask[rows][:, :t]).to(device),
                           torch.as_tensor(np.asarray(n_tokens, dtype=np.int64)[rows]).to(device))
                for name, value in got.items():
                    out[name][rows] = value.float().cpu().numpy()
        finally:
            self.train(was)
        return out

    def block_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable weights: the blocks' (and the final norm's, when adapted); rotary has none."""
        return [p for p in self.parameters() if p.requires_grad]

