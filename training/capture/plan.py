"""The capture plan: what ``prefill-router capture`` settles about its encoder on the driver before
any actor starts (:func:`encoder_plan`: the model converted once, its layers checked, the columns
it will write), and the identity the shards' manifest records (:meth:`EncoderPlan.identity`): a
re-run with another identity is refused."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.registry import ModelSpec

LAYER_CONVENTION = ("index 0 = embedding output; index i = output of decoder block i (HF hidden_states[i]); "
                    "index L (last block) has the final norm applied")


@dataclass(frozen=True)
class EncoderPlan:
    """The encoder a capture runs, resolved on the driver."""

    spec: ModelSpec  # the registry entry
    num_layers: int  # decoder blocks (L)
    hidden_size: int
    layers: list[int]  # the layer indices saved (0 = embedding output, L = last block with the final norm)
    columns: list[str]  # the tensor columns written, h{layer}_{pooling}
    fingerprint: dict[str, str | None]  # name, sha256, revision (shared.models.model_fingerprint)
    chat_template: str
    chat_template_sha256: str

    def identity(self, cfg: Any, table_hash: str, n_rows: int) -> dict[str, Any]:
        """What the shards are made from (the manifest's ``identity``; ``cfg``: the ``CaptureConfig``); a re-run
        with a different one is refused."""
        return {
            "encoder": self.fingerprint, "chat_template_sha256": self.chat_template_sha256,
            "layers": self.layers, "layer_convention": LAYER_CONVENTION, "embedding_layer_index": 0,
            "last_layer_final_norm": True, "num_layers": self.num_layers, "poolings": list(cfg.poolings),
            "dtype": cfg.dtype, "hidden_size": self.hidden_size, "query_table_hash": table_hash,
            "n_rows": n_rows, "shard_size": cfg.shard_size, "max_tokens": cfg.max_tokens,
            "truncation": "keep the last max_tokens tokens",
        }


def encoder_plan(cfg: Any) -> EncoderPlan:
    """Resolve the encoder of ``cfg`` (a ``CaptureConfig``) on the driver (converting GGUF once), check the
    layers, fix the identity bits."""
    from transformers import AutoConfig

    from shared.encoder import resolve_layers
    from shared.features import encoder_columns
    from shared.models import ensure_local, load_tokenizer, model_fingerprint
    from shared.registry import load_registry

    spec = load_registry(cfg.registry).encoder(cfg.encoder)
    local = ensure_local(spec)
    model_cfg = AutoConfig.from_pretrained(local)
    model_cfg = getattr(model_cfg, "text_config", None) or model_cfg
    num_layers, hidden = int(model_cfg.num_hidden_layers), int(model_cfg.hidden_size)
    layers = resolve_layers(cfg.layers, num_layers, spec.name)
    template = load_tokenizer(spec).chat_template or ""
    return EncoderPlan(spec=spec, num_layers=num_layers, hidden_size=hidden, layers=layers,
                       columns=encoder_columns(layers, cfg.poolings, num_layers), fingerprint=model_fingerprint(spec),
                       chat_template=template, chat_template_sha256=hashlib.sha256(template.encode()).hexdigest())
