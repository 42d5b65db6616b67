"""Labelling: answer a batch of queries with one target and score each answer.

:class:`Scorer` has ``label(rows) -> list[dict]``; a row is a query-table row (``messages``,
``answer_type``, ``reference``, ``choices``, ``meta``) and a result holds ``correct``,
``answer``, ``input_tokens``, ``output_tokens``, ``latency_s``, ``status`` and ``error``.
A result with ``status="failed"`` has ``correct=None``: a failure is never a wrong
answer. It is a plain class, usable without Ray (the Ray Data UDF in
:mod:`training.label.run` only wraps it).

The answers come from the registry entry's backend (``shared/targets/``, the same classes
serving uses; :class:`shared.backends.LabelBackend`): multiple choice by the likelihood of
the options where the backend reads log-probabilities (transformers: prefill only; vLLM: the
top log-probabilities of one token), else by generating text; other types by greedy
generation. An endpoint (``openai``) is called with retries, exponential backoff and a
requests-per-second limit (:class:`OpenAIOptions`).

``latency_s`` of a batched backend is the batch's wall time divided by its rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Sequence

from pydantic import Field

from shared.backends import BackendOptions, Completion, make_backend
from shared.config import StrictConfig
from shared.registry import ModelSpec
from training.label.scoring import parse_meta, pick_option, score_choice, score_text

log = logging.getLogger(__name__)


class ScoringOptions(StrictConfig):
    """How answers are produced and scored (part of the labels' identity)."""

    max_new_tokens: int = Field(24, gt=0, description="Greedy tokens generated for exact/numeric answers.")
    max_new_tokens_code: int = Field(384, gt=0, description="Greedy tokens generated for code answers.")
    code_timeout_s: float = Field(5.0, gt=0, description="Time limit of one HumanEval test run.")
    mc_scoring: Literal["option_text", "letter"] = Field(
        "option_text", description="Multiple choice: mean token log-likelihood of each option's text after the "
        "prompt (robust to tiny models' letter bias), or the next-token log-prob of the option letter.")


class OpenAIOptions(StrictConfig):
    """HTTP behaviour of the openai backend."""

    timeout_s: float = Field(60.0, gt=0, description="Timeout of one HTTP request.")
    max_retries: int = Field(4, ge=0, description="Retries of a request after a transport error or a 408/429/5xx.")
    backoff_s: float = Field(1.0, ge=0, description="First retry delay; doubles on each retry.")
    backoff_max_s: float = Field(30.0, ge=0, description="Longest retry delay.")
    requests_per_s: float = Field(5.0, gt=0, description="Most requests per second per actor.")


def ok_result(correct: float, answer: str, n_in: int, n_out: int, latency_s: float) -> dict[str, Any]:
    return {"correct": float(correct), "answer": answer, "input_tokens": int(n_in), "output_tokens": int(n_out),
            "latency_s": float(latency_s), "status": "ok", "error": None}


def failed_result(error: str, latency_s: float = 0.0) -> dict[str, Any]:
    return {"correct": None, "answer": None, "input_tokens": None, "output_tokens": None,
            "latency_s": float(latency_s), "status": "failed", "error": error[:2000]}


def option_request(row: dict[str, Any]) -> dict[str, Any]:
    """What a backend's ``option_scores`` reads of a multiple-choice row: the chat, the option
    labels and, where the query has them, the options' texts."""
    return {"messages": list(row["messages"]), "choices": row["choices"],
            "options": parse_meta(row.get("meta")).get("options")}


class Scorer:
    """One target's backend answering batches of query rows, each answer scored.

    The rows of a batch are answered in groups (multiple choice, code, the other types);
    a group that fails becomes failed rows, never a dead job."""

    def __init__(self, backend: Any, options: ScoringOptions | None = None):
        self.backend, self.options = backend, options or ScoringOptions()
        self.spec: ModelSpec = backend.spec

    def label(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        results: list[dict[str, Any] | None] = [None] * len(rows)
        groups: dict[str, list[int]] = {}
        kinds = {"multiple_choice": "mc", "code": "code"}
        for i, row in enumerate(rows):
            groups.setdefault(kinds.get(row["answer_type"], "gen"), []).append(i)
        for kind, idx in groups.items():
            batch = [rows[i] for i in idx]
            start = time.perf_counter()
            try:
                out = self._label_group(kind, batch, start)
            except Exception as exc:  # noqa: BLE001 - one bad batch must become failed rows, not a dead job
                log.exception("%s: batch of %d failed", self.spec.name, len(batch))
                error, spent = f"{type(exc).__name__}: {exc}", time.perf_counter() - start
                out = [failed_result(error, spent / len(batch)) for _ in batch]
            for i, res in zip(idx, out):
                results[i] = res
        return results  # type: ignore[return-value]

    def _label_group(self, kind: str, rows: Sequence[dict[str, Any]], start: float) -> list[dict[str, Any]]:
        if kind == "mc":
            scored = self.backend.option_scores([option_request(r) for r in rows], self.options.mc_scoring)
            if scored is not None:  # else: a text-only backend, its answers scored as text
                per_row = (time.perf_counter() - start) / len(rows)
                choices = [pick_option(s.logprobs) for s in scored]
                return [ok_result(score_choice(choice, row["reference"]), choice, s.input_tokens, 1, per_row)
                        for row, choice, s in zip(rows, choices, scored)]
        budget = self.options.max_new_tokens_code if kind == "code" else self.options.max_new_tokens
        answers = self.backend.complete([list(r["messages"]) for r in rows], budget)
        per_row = (time.perf_counter() - start) / len(rows)
        return [self._scored(row, answer, per_row) for row, answer in zip(rows, answers)]

    def _scored(self, row: dict[str, Any], answer: Completion, per_row: float) -> dict[str, Any]:
        """An answer's result: scored text, or the request's failure."""
        if answer.error is not None:
            return failed_result(answer.error, answer.latency_s or 0.0)
        latency = per_row if answer.latency_s is None else answer.latency_s
        return ok_result(score_text(row, answer.text, self.options.code_timeout_s), answer.text,
                         answer.input_tokens, answer.output_tokens, latency)


def make_scorer(spec: ModelSpec, options: ScoringOptions, http: OpenAIOptions | None = None,
                torch_threads: int | None = None, device: str | None = None) -> Scorer:
    """The scorer for a registry entry (vllm falls back to transformers where vLLM is not installed)."""
    return Scorer(label_backend(spec, http, torch_threads, device), options)


def label_backend(spec: ModelSpec, http: OpenAIOptions | None = None, torch_threads: int | None = None,
                  device: str | None = None) -> Any:
    """The labelling backend of a registry entry (``complete``, ``option_scores``), with ``http``'s retries."""
    http = http or OpenAIOptions()
    settings = BackendOptions(purpose="labelling", timeout_s=http.timeout_s, max_retries=http.max_retries,
                              backoff_s=http.backoff_s, backoff_max_s=http.backoff_max_s,
                              requests_per_s=http.requests_per_s, device=device, torch_threads=torch_threads)
    return make_backend(spec, settings)
