"""OpenAI-compatible request and response bodies, plus the router's own ``/v1/route``.

Requests are validated here so a malformed one becomes a 4xx with a reason before any
model runs. No field that changes the answer is accepted and dropped: ``stop``, ``seed`` and
``n: 1`` are honoured by every backend; a field the router cannot honour (``n`` over 1,
``tools``, ``response_format`` other than text, ``logprobs``, a ``top_p`` under 1, a
penalty, ...) or does not know is refused with a 400 naming it
(:meth:`ChatCompletionRequest.refusal`), as vLLM does. Fields that change nothing in the
answer (:data:`IGNORED_FIELDS`: ``user``, ``store``, ``metadata``, ...) are accepted and
ignored; a field of the wrong type is a 422.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictStr, ValidationError, field_validator,
    model_serializer, model_validator,
)
from pydantic_core import InitErrorDetails

from shared.backends import Sampling
from shared.policy import Policy, policy_names

ROUTER_MODEL = "router"


class UnknownModel(ValueError):
    """The request names a model this app does not serve (404, as OpenAI answers)."""


def lone_surrogate(body: Any, where: str = "body") -> str | None:
    """Where a decoded JSON value holds text that is not valid Unicode (a lone UTF-16 surrogate such
    as ``"\\ud800"``, which JSON can spell but UTF-8 cannot encode), e.g. ``messages.0.content``; None
    when every string and key is valid."""
    if isinstance(body, str):
        try:
            body.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where} (character {exc.start})"
        return None
    items = body.items() if isinstance(body, dict) else enumerate(body) if isinstance(body, list) else ()
    for key, value in items:
        if found := lone_surrogate(key, f"{where} key") or lone_surrogate(value, f"{where}.{key}"):
            return found.removeprefix("body.")
    return None


def valid_unicode(text: str) -> str:
    """``text``, or ValueError when it holds a lone surrogate (the encoder's tokenizer cannot read it)."""
    if where := lone_surrogate(text, "text"):
        raise ValueError(f"{where} has a lone UTF-16 surrogate: not valid Unicode")
    return text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] = Field(description="Text, or OpenAI content parts of type text.")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]]) -> str:
        if isinstance(value, list):
            parts = []
            for part in value:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(part["text"])
            value = "".join(parts)
        return valid_unicode(value)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: StrictBool = Field(False, description="Send a last chunk with the token usage (OpenAI).")


class RuleRequest(BaseModel):
    """A request body that may name a routing rule: a key named after a registered policy
    (shared.policy) with its parameter, e.g. ``"tolerance": 0.1`` or ``"value": 0.02``; at most one
    (:meth:`shared.policy.Policy.pick`, checked against the policy's request bounds). The rule
    is :attr:`rule` (None: the model suffix, the serving default or the artifact's)."""

    _rule: Policy | None = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _routing_rule(cls, data: Any, handler: Any) -> Any:
        if not isinstance(data, dict):
            return handler(data)
        names = set(policy_names())
        errors: list[InitErrorDetails] = []
        rule = None
        try:
            rule = Policy.pick({k: data[k] for k in policy_names() if k in data}, requested=True)
        except ValidationError as exc:  # a parameter out of its policy's bounds: located at its key
            key = next(k for k in data if k in names and data[k] is not None)
            errors = [_detail(e, (key, *e["loc"])) for e in exc.errors()]
        except ValueError as exc:
            errors = [InitErrorDetails(type="value_error", loc=(), input=data, ctx={"error": exc})]
        try:
            req = handler({k: v for k, v in data.items() if k not in names})
        except ValidationError as exc:
            errors = [*(_detail(e, e["loc"]) for e in exc.errors()), *errors]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        req._rule = rule
        return req

    @property
    def rule(self) -> Policy | None:
        return self._rule


def _detail(error: Any, loc: tuple) -> InitErrorDetails:
    return InitErrorDetails(type=error["type"], loc=loc, input=error["input"], ctx=error.get("ctx", {}))


#: OpenAI fields that change nothing in the answer: accepted and ignored.
IGNORED_FIELDS = frozenset({"user", "store", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier",
                            "prompt_cache_key"})
#: OpenAI fields accepted at their no-op value only (any other value changes the answer: 400).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "top_p": (1, 1.0), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logprobs": (False,),
    "response_format": ({"type": "text"},), "logit_bias": ({},), "tool_choice": ("none",), "tools": ([],),
    "functions": ([],), "function_call": ("none",),
}
MAX_STOP = 4  # OpenAI's limit on stop sequences
#: Fields of a message that are ignored (``name``: the chat templates have no place for it); any
#: other field of a message (``tool_calls``, ``audio``, ...) is refused unless null or empty, as
#: an SDK echoes them back in an assistant message.
MESSAGE_IGNORED = frozenset({"name"})


class ChatCompletionRequest(RuleRequest):
    model_config = ConfigDict(extra="allow")

    model: StrictStr = Field(ROUTER_MODEL, description="'router', 'router:<tolerance>' or a target name.")
    messages: list[ChatMessage] = Field(description="The conversation; at least one non-empty message.")
    max_tokens: int | None = Field(None, gt=0, le=8192, description="Answer length cap (tokens).")
    max_completion_tokens: int | None = Field(None, gt=0, le=8192, description="Alias of max_tokens.")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False,
                                      description="0 or absent: greedy decoding.")
    n: int = Field(1, ge=1, description="Choices to return: 1 (more is refused with a 400 naming the field).")
    stop: StrictStr | list[StrictStr] | None = Field(None, description="Up to 4 strings; the answer ends before "
                                                     "the first one it would contain (finish_reason stop).")
    seed: int | None = Field(None, description="Seed of the sampling (temperature > 0): the same seed, the same "
                             "answer from a local target; passed on to an OpenAI-compatible one.")
    stream: StrictBool = Field(False, description="Server-sent events when true (a JSON boolean).")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        if not any(isinstance(m.content, str) and m.content.strip() for m in value):
            raise ValueError("messages contain no text")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOP or not all(stops)):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops or None

    def refusal(self) -> str | None:
        """Why the router cannot honour this request (the ingress answers 400), or None: ``n`` over 1,
        a field that changes the answer at a value other than its no-op one, or an unknown field."""
        if self.n > 1:
            return f"n: {self.n} choices were asked for; this router returns one choice (n: 1)"
        for i, message in enumerate(self.messages):
            for key, value in (message.model_extra or {}).items():
                if key not in MESSAGE_IGNORED and value not in (None, [], ""):
                    return f"messages.{i}.{key}: is not supported (the models get the text of each message only)"
        for key, value in (self.model_extra or {}).items():
            if key in IGNORED_FIELDS or value is None or value in NEUTRAL_VALUES.get(key, ()):
                continue
            what = "is not supported" if key in NEUTRAL_VALUES else "is not a field this router knows"
            return f"{key}: {what}; the router would have to ignore it, which changes the answer: leave it out"
        return None

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role if m.role != "developer" else "system", "content": m.content} for m in self.messages]

    @property
    def answer_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def sampling(self) -> Sampling:
        """The stop strings and seed every backend honours."""
        return Sampling(tuple(self.stop or ()), self.seed)


class RouteRequest(RuleRequest):
    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(ROUTER_MODEL, description="'router' or 'router:<tolerance>', as in chat completions.")
    messages: list[ChatMessage] = Field(description="The conversation to route.")

    _non_empty = field_validator("messages")(ChatCompletionRequest._non_empty.__func__)

    def plain_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role if m.role != "developer" else "system", "content": m.content} for m in self.messages]


class RouteDecision(BaseModel):
    """What the router decided for one prompt. The rule's parameter is under the policy's name,
    every registered policy's key present (the others null): ``"policy": "tolerance",
    "tolerance": 0.1, "value": null``."""

    model_config = ConfigDict(extra="allow")  # the policies' parameters (shared.policy.Policy.fields)

    target: str = Field(description="The chosen target.")
    probabilities: dict[str, float] = Field(description="Predicted P(correct) per target.")
    expected_cost: dict[str, float] = Field(description="Expected USD cost per target for this prompt.")
    eligible: list[str] = Field(description="Fallback order, the chosen target first: the targets within the "
                                "tolerance of the best, cheapest first (tolerance policy), or every target by "
                                "expected net value (value policy).")
    policy: str = Field("tolerance", description="Routing policy used (shared.policy); its parameter follows under "
                        "its name.")
    prompt_tokens: int = Field(description="Prompt length in encoder tokens.")
    overhead_ms: float = Field(0.0, description="Encoder + head time (ms).")
    artifact: str | None = Field(None, description="The router artifact that made the decision.")
    novel: bool = Field(False, description="The prompt is unlike the router's training prompts: it was routed by "
                        "the targets' mean scores, not by its own prediction (the artifact's novelty gate, "
                        "shared.novelty).")

    @model_serializer(mode="wrap")
    def _params_after_policy(self, handler: Any) -> dict[str, Any]:
        """Every registered policy's parameter right after ``policy`` (null but the one used)."""
        out = handler(self)
        params = {n: out.pop(n, None) for n in dict.fromkeys([*policy_names(), *(self.model_extra or {})])}
        at = list(out).index("policy") + 1
        items = list(out.items())
        return dict([*items[:at], *params.items(), *items[at:]])


class FeedbackRequest(BaseModel):
    """``POST /v1/feedback``: a client's score of one answer, by its id."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(min_length=1, max_length=200, description="The answer's `id` (or its "
                                  "`x-prefill-router-request-id` header).")
    score: float | None = Field(None, ge=0, le=1, allow_inf_nan=False, description="1 right or helpful, 0 wrong.")
    thumbs: Literal["up", "down"] | None = Field(None, description="Instead of a score: up is 1, down is 0.")
    comment: StrictStr | None = Field(None, max_length=4000, description="Free text, kept as sent.")

    @model_validator(mode="after")
    def _one_score(self) -> "FeedbackRequest":
        if (self.score is None) == (self.thumbs is None):
            raise ValueError("give exactly one of score (a number in [0, 1]) and thumbs ('up' or 'down')")
        return self

    def value(self) -> float:
        return self.score if self.score is not None else float(self.thumbs == "up")


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatChoice(BaseModel):
    index: int = 0
    message: dict[str, str]
    finish_reason: str | None = "stop"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage = Field(default_factory=Usage)
    route: RouteDecision | None = Field(None, description="The routing decision (router requests only).")


def chunk(completion_id: str, model: str, delta: dict[str, str], finish_reason: str | None = None,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk`` object of a streamed answer."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    if extra:
        body.update(extra)
    return body


def usage_chunk(completion_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  total_tokens=prompt_tokens + completion_tokens)
    return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [], "usage": usage.model_dump()}


def parse_model_field(model: str, targets: list[str]) -> tuple[str | None, float | None]:
    """``'router'`` -> (None, None), ``'router:0.1'`` -> (None, 0.1: a tolerance), ``'<target>'`` -> (target, None).

    Raises :class:`UnknownModel` for a model not served, ValueError for a bad tolerance suffix.
    """
    if model == ROUTER_MODEL:
        return None, None
    if model.startswith(ROUTER_MODEL + ":"):
        raw = model[len(ROUTER_MODEL) + 1:]
        try:
            tol = float(raw)
        except ValueError:
            raise ValueError(f"bad tolerance in model {model!r}: {raw!r} is not a number") from None
        if not 0.0 <= tol <= 1.0:
            raise ValueError(f"tolerance in model {model!r} must be within [0, 1]")
        return None, tol
    if model in targets:
        return model, None
    raise UnknownModel(f"unknown model {model!r}; use 'router', 'router:<tolerance>' or one of {targets}")
