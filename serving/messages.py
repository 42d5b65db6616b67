"""Typed messages between the deployments (Ray pickles them; nothing is matched by substring).

- Encoder -> Ingress/RouterHead: :class:`EncodedPrompt` (with its :class:`PrefixUse`), or :class:`PromptTooLong` when the
  prompt is over ``max_prompt_tokens`` (a refusal is a value, not an exception string),
  :class:`PromptRejected` when its tokenizer cannot read the text, :class:`EncodeFailed` when the
  forward pass failed on this prompt alone: one prompt's fault never fails its batch-mates;
  ``count_tokens`` answers :class:`TokenCount`; :func:`surely_within` spares that call for a short
  prompt.
- Ingress -> RouterHead: the request's routing rule, a ``shared.policy.Policy`` (None: the artifact's).
- Target -> Ingress: :class:`TargetAnswer`; a stream yields text pieces and ends with a
  :class:`StreamEnd`. A fault of the request itself (longer than the target's context,
  refused by an upstream endpoint as invalid) is a :class:`TargetRequestError`: the
  ingress answers it with its status and never retries it on another target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared import backends

# Target -> Ingress: the backends' own answer types (every backend returns them; shared/backends.py)
TargetAnswer, StreamEnd, TargetRequestError = backends.TargetAnswer, backends.StreamEnd, backends.TargetRequestError

TEMPLATE_TOKENS = 128  # chat-template tokens a prompt can gain beyond its text (roles, markers, default system)


@dataclass(frozen=True)
class PromptTooLong:
    """The prompt has more encoder tokens than the router accepts (the ingress answers 413)."""

    n_tokens: int
    limit: int

    @property
    def reason(self) -> str:
        return (f"the prompt has {self.n_tokens} tokens, more than this router's limit of {self.limit} "
                "(max_prompt_tokens): shorten it")


@dataclass(frozen=True)
class PromptRejected:
    """The encoder's tokenizer cannot read the prompt (a fault of the request: the ingress answers 400)."""

    reason: str


@dataclass(frozen=True)
class EncodeFailed:
    """The encoder's forward pass failed on this prompt alone (retried by itself, outside its batch):
    the router is unavailable for this request only (``kind``: the exception's type name)."""

    kind: str
    message: str


@dataclass(frozen=True)
class TokenCount:
    """Encoder tokens of a prompt (chat template applied) and the router's limit."""

    n_tokens: int
    limit: int

    def refusal(self) -> PromptTooLong | None:
        return PromptTooLong(self.n_tokens, self.limit) if self.n_tokens > self.limit else None


@dataclass(frozen=True)
class PrefixUse:
    """What the Encoder's prefix cache did for one prompt (the ingress counts these in Prometheus):
    a hit saved ``tokens_saved`` prefix tokens; a miss may have admitted a prefix, evicting
    ``evicted`` older entries."""

    hit: bool
    tokens_saved: int = 0
    evicted: int = 0
    admitted: bool = False


@dataclass
class EncodedPrompt:
    """Pooled prefill features of one prompt: ``features[column] -> (width,)`` float32 (the hidden
    size; 3 for a ``next`` block), or for an ``h{layer}_attn`` block ``(W, k)`` float32: the prompt's last
    ``W`` token states of that layer already reduced by the block's token transform, NaN on padded rows (the
    compact form, k of D dims per token: :mod:`shared.pooled_head`).
    ``prefix``: what the prefix cache did (None when the cache is off)."""

    features: dict[str, Any]
    n_tokens: int
    encoder: str
    artifact: str
    prefix: PrefixUse | None = None


def request_fault(exc: BaseException) -> TargetRequestError | None:
    """The :class:`TargetRequestError` behind ``exc`` (Ray wraps a replica's exception), if any."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, TargetRequestError) and hasattr(candidate, "status"):
            return candidate
    return None


def surely_within(messages: list[dict[str, str]], limit: int) -> bool:
    """True when the prompt cannot exceed ``limit`` tokens, without a tokenizer: a token of a
    byte-level BPE or byte-fallback tokenizer spans at least one UTF-8 byte, so tokens <= bytes +
    the template's own tokens. Never raises on text that is not valid Unicode (a lone surrogate
    counts as its 3 bytes): the bound is only a size."""
    size = sum(len(m["content"].encode("utf-8", "surrogatepass")) + 8 for m in messages) + TEMPLATE_TOKENS
    return size <= limit


def error_line(exc: BaseException) -> str:
    """The last line of an exception's text (Ray prefixes a replica's traceback), or its type name."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__
