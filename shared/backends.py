"""Target backends: the one contract and the one registry that labelling and serving both use.

A backend is one class in one module of ``shared/targets/``, registered by name with
:func:`register_backend`; the registry's ``backend:`` field of an entry
(``configs/models.yaml``) names it. :func:`backend_names` finds every module of that folder
(importing them: their module level must stay light, with heavy libraries imported inside
methods), so adding a backend edits no other file. A backend answers two callers:

- serving (:class:`TargetBackend`): ``generate`` / ``stream`` one chat request (its
  :class:`Sampling`: stop strings and seed, which every backend honours; :class:`StopCutter`
  cuts text at a stop string; the answer reports the backend's own ``work_s``), ``cancel`` what
  runs, ``count_tokens``, ``reconfigure`` the call bound in place, ``close``. A cancelled call
  stops the backend's work; a fault of the request (over the context limit, refused upstream
  as invalid) is a :class:`TargetRequestError`.
- labelling (:class:`LabelBackend`): greedy ``complete`` of a batch of chats, and
  ``option_scores`` of multiple-choice options by likelihood where the backend can read
  log-probabilities (``None`` where it cannot: those answers are generated and scored as text).

:func:`make_backend` builds the backend that runs an entry (:func:`resolve_backend`: one whose
library is missing falls back to its ``fallback``, as ``vllm`` does to ``transformers``).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import pkgutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Protocol, Sequence

log = logging.getLogger(__name__)
TARGETS_DIR = Path(__file__).resolve().parent / "targets"
Purpose = Literal["serving", "labelling"]
_REGISTRY: dict[str, type] = {}
_DISCOVERED = False


@dataclass(frozen=True)
class TargetAnswer:
    """A whole answer of one target."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    # the target's own time on it, from starting work (None: not measured); a measurement, not compared
    work_s: float | None = field(default=None, compare=False)


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a target's stream: why it ended and the token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    work_s: float | None = field(default=None, compare=False)  # as TargetAnswer.work_s


@dataclass(frozen=True)
class Sampling:
    """What a chat request asks of the generation beyond its length and temperature: ``stop``
    strings (the answer ends before the first one it would contain) and the sampling ``seed``."""

    stop: tuple[str, ...] = ()
    seed: int | None = None


class StopCutter:
    """Cuts a text that arrives in pieces before the first stop string: :meth:`feed` returns the
    part that is surely before any stop string (a tail that could begin one is held back) and
    sets :attr:`stopped` once one is found; :meth:`flush` returns what was held back at the end."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending, self.stopped = tuple(stops), "", False
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        keep = min(self.hold, len(text))
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def cut(self, text: str) -> str:
        """The whole of ``text`` before the first stop string."""
        return self.feed(text) + self.flush()


class TargetRequestError(ValueError):
    """A fault of the request, not of the target (the same request fails on any target)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason

    def __reduce__(self):  # Ray re-raises it in the caller: keep both fields through pickling
        return (TargetRequestError, (self.status, self.reason))


def answer_budget(spec: Any, n_in: int, max_tokens: int) -> int:
    """``max_tokens`` capped at what the context has left after an ``n_in``-token prompt; a
    prompt that fills the context is a fault of the request (413), refused before any compute."""
    if n_in >= spec.context_limit:
        raise TargetRequestError(413, f"the prompt has {n_in} tokens for {spec.name}, whose context "
                                      f"limit is {spec.context_limit}: shorten it")
    return min(max_tokens, spec.context_limit - n_in)


def logsumexp(values: Sequence[float]) -> float:
    """``log(sum(exp(v)))``, stable (the log-probability of an option spelled several ways)."""
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass(frozen=True)
class Completion:
    """One greedy answer for labelling: its text and token counts, or the ``error`` that stopped it.
    ``latency_s`` is the request's own time (None: a batched backend, the batch's time is shared)."""

    text: str | None
    input_tokens: int | None
    output_tokens: int | None
    latency_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class OptionScores:
    """Multiple choice by likelihood: the log-probability of each option label and the prompt's tokens."""

    logprobs: dict[str, float]
    input_tokens: int


@dataclass(frozen=True)
class BackendOptions:
    """What a caller sets on a backend (each backend reads the fields it has a use for)."""

    purpose: Purpose = "serving"
    timeout_s: float = 120.0  # bound on one endpoint call (connect and read)
    max_retries: int = 0  # endpoint: retries after a transport error or a 408/429/5xx (labelling)
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    requests_per_s: float | None = None  # endpoint: most requests per second (None: no limit)
    device: str | None = None  # local weights: "cpu", "cuda" (None: the default device)
    torch_threads: int | None = None
    loaded: Any = None  # local weights already loaded (shared.models.LoadedModel), reused as is


class InFlight:
    """The asyncio tasks running a backend's requests now: :meth:`cancel` stops them exactly as a
    caller going away does (the task is cancelled; the backend's own cleanup stops its work)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    @contextmanager
    def track(self) -> Iterator[None]:
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            yield
        finally:
            self.tasks.discard(task)

    def cancel(self) -> int:
        tasks = [t for t in self.tasks if not t.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)


class TargetBackend(Protocol):
    """What serving needs of a target: one chat request at a time, cancellable."""

    spec: Any  # the registry entry (shared.registry.ModelSpec)

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       sampling: Sampling = Sampling()) -> TargetAnswer:
        """The whole answer (``sampling``: its stop strings and seed, honoured)."""

    def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
               sampling: Sampling = Sampling()) -> AsyncIterator[str | StreamEnd]:
        """Text pieces as they come, then one :class:`StreamEnd`; closing it stops the work."""

    def cancel(self) -> int:
        """Stop every request running now, each as if its caller had gone (its call raises
        ``CancelledError``); how many there were."""

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        """Prompt tokens after the chat template (None: only the endpoint knows)."""

    def reconfigure(self, timeout_s: float) -> None:
        """In place: the bound on one call (local backends have none: the ingress cancels them)."""

    async def close(self) -> None:
        """Stop what runs and release connections and engines; the backend answers no more."""


class LabelBackend(Protocol):
    """What labelling needs of a target: greedy answers of a batch, and option likelihoods."""

    spec: Any

    def complete(self, chats: Sequence[list[dict[str, str]]], max_tokens: int) -> list[Completion]:
        """Greedy answers, one per chat (an endpoint's failure is that row's ``error``)."""

    def option_scores(self, rows: Sequence[dict[str, Any]], mode: str) -> list[OptionScores] | None:
        """Per multiple-choice row (``messages``, ``choices``: the option labels, ``options``: their texts
        or None), each label's log-probability. ``mode``: ``option_text`` (the mean token log-probability
        of the option's text after the prompt) or ``letter`` (the label's next-token log-probability).
        None: the backend reads no log-probabilities."""


def register_backend(name: str) -> Callable[[type], type]:
    """Class decorator: ``@register_backend("name")`` makes the class the backend ``name``.

    The class is built as ``cls(spec, options: BackendOptions)`` and may set ``remote = True``
    (an endpoint: registry entries with ``source: openai``), ``fallback`` (the backend used where
    ``available()`` says its library is missing) and ``available`` (a classmethod)."""
    def add(cls: type) -> type:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"backend {name!r} is registered twice: {_REGISTRY[name].__name__} and {cls.__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def _discover() -> dict[str, type]:
    """The registry, after every module of ``shared/targets/`` is imported once (each registers its backend)."""
    global _DISCOVERED
    if not _DISCOVERED:
        for module in pkgutil.iter_modules([str(TARGETS_DIR)]):
            if not module.name.startswith("_"):
                importlib.import_module(f"shared.targets.{module.name}")
        _DISCOVERED = True
    return _REGISTRY


def backend_names() -> list[str]:
    """The registered backends, in registration order."""
    return list(_discover())


def backend_class(name: str) -> type:
    """The class of backend ``name`` (``ValueError`` naming the known ones)."""
    found = _discover().get(name)
    if found is None:
        raise ValueError(f"unknown backend {name!r}; the backends are: {', '.join(_REGISTRY)}")
    return found


def is_remote(name: str) -> bool:
    """Whether backend ``name`` calls an endpoint (no local weights, no GPU)."""
    return bool(getattr(backend_class(name), "remote", False))


def resolve_backend(spec: Any, purpose: Purpose = "labelling") -> str:
    """The backend that runs ``spec``: its own, or, where its library is missing, its ``fallback``
    (``vllm`` without vLLM installed becomes ``transformers``, with one warning naming ``purpose``)."""
    cls = backend_class(spec.backend)
    available = getattr(cls, "available", None)
    if available is None or available():
        return spec.backend
    log.warning("%s: %s is not installed; %s with %s instead", spec.name, spec.backend, purpose, cls.fallback)
    return cls.fallback


def make_backend(spec: Any, options: BackendOptions | None = None) -> Any:
    """The backend object that runs ``spec`` for ``options.purpose``."""
    options = options or BackendOptions()
    return backend_class(resolve_backend(spec, options.purpose))(spec, options)
