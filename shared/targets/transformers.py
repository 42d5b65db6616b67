"""The ``transformers`` backend: a registry model on CPU or GPU via transformers."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any, AsyncIterator, Sequence

from shared.backends import (BackendOptions, Completion, InFlight, OptionScores, Sampling, StopCutter, StreamEnd,
                             TargetAnswer, answer_budget, logsumexp, register_backend)
from shared.registry import ModelSpec


class _Stop:
    """A transformers ``StoppingCriteria`` that ends ``generate`` once its event is set (cancellation)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
        return self.event.is_set()


@register_backend("transformers")
class TransformersBackend:
    """A registry model's weights loaded with transformers.

    Serving: greedy or sampled generation, one request at a time. A request whose caller
    gives up (timeout, client gone: Serve cancels the call) or that :meth:`cancel` stops sets
    a stop event that the generation loop checks after every token, so the replica stops
    computing within one decoding step; the next request waits until it has. Stop strings end
    the generation (transformers' ``stop_strings``) and the answer is cut before the first one;
    a seed seeds torch's generator before a sampled generation. A prompt over
    the model's context limit is refused before any compute, and ``max_tokens`` is capped at
    what the context has left, so memory is bounded for any input.

    Labelling: batches (left padding, greedy; a prompt cut to its last tokens that fit), and
    multiple choice by prefill only (:meth:`option_scores`).
    """

    def __init__(self, spec: ModelSpec, options: BackendOptions | None = None):
        options = options or BackendOptions()
        if options.torch_threads:
            import torch

            torch.set_num_threads(int(options.torch_threads))
        from shared.models import load_causal_lm

        self.spec = spec
        self.loaded = options.loaded or load_causal_lm(spec, device=options.device)
        self.tok = self.loaded.tokenizer
        self.lock = asyncio.Lock()
        self.stats = {"active": 0, "finished": 0, "cancelled": 0, "tokens": 0}
        self.inflight = InFlight()
        self._option_ids: dict[str, list[int]] = {}

    # ------------------------------------------------------------------ serving
    def _inputs(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[dict[str, Any], int]:
        """Model inputs and the answer budget; a prompt over the context limit is a request fault."""
        batch = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
        budget = answer_budget(self.spec, int(batch["input_ids"].shape[1]), max_tokens)
        return {k: v.to(self.loaded.device) for k, v in batch.items()}, budget

    def _gen_kwargs(self, max_tokens: int, temperature: float, stop: threading.Event,
                    sampling: Sampling) -> dict[str, Any]:
        from transformers import StoppingCriteriaList

        kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": self.tok.pad_token_id,
                                  "stopping_criteria": StoppingCriteriaList([_Stop(stop)])}
        kwargs.update({"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False})
        if sampling.stop:
            kwargs.update(stop_strings=list(sampling.stop), tokenizer=self.tok)
        return kwargs

    def _generate_sync(self, inputs: dict[str, Any], kwargs: dict[str, Any], stop: threading.Event,
                       seed: int | None = None) -> tuple[StreamEnd, Any]:
        """Run ``generate`` (in a worker thread); why it ended with the token counts, and the new tokens."""
        import torch

        self.stats["active"] += 1
        start = time.perf_counter()
        try:
            n_in = int(inputs["input_ids"].shape[1])
            if seed is not None and kwargs["do_sample"]:
                torch.manual_seed(seed)  # under the model's lock: no other generation draws in between
            with torch.no_grad():
                out = self.loaded.model.generate(**inputs, **kwargs)
            n_new = int(out.shape[1]) - n_in
            self.stats["tokens"] += n_new
            finish = "length" if n_new >= kwargs["max_new_tokens"] else "stop"
            return StreamEnd(finish, n_in, n_new, time.perf_counter() - start), out[0, n_in:]
        finally:
            self.stats["active"] -= 1
            self.stats["cancelled" if stop.is_set() else "finished"] += 1

    async def _until_done(self, thread_call: Any, stop: threading.Event) -> Any:
        """Await a generation thread; on cancellation stop it and wait for it to end, then re-raise."""
        task = asyncio.ensure_future(thread_call)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([task])  # the model is free again before the next request takes the lock
            raise

    async def generate(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                       sampling: Sampling = Sampling()) -> TargetAnswer:
        with self.inflight.track():
            async with self.lock:
                stop = threading.Event()
                inputs, budget = self._inputs(messages, max_tokens)
                kwargs = self._gen_kwargs(budget, temperature, stop, sampling)
                call = asyncio.to_thread(self._generate_sync, inputs, kwargs, stop, sampling.seed)
                end, new = await self._until_done(call, stop)
                text = self.tok.decode(new, skip_special_tokens=True)
        cutter = StopCutter(sampling.stop)
        text = cutter.cut(text)
        finish = "stop" if cutter.stopped else end.finish_reason
        return TargetAnswer(text.strip(), end.prompt_tokens, end.completion_tokens, finish, end.work_s)

    async def stream(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                     sampling: Sampling = Sampling()) -> AsyncIterator[str | StreamEnd]:
        from transformers import TextIteratorStreamer

        with self.inflight.track():
            async with self.lock:
                stop = threading.Event()
                inputs, budget = self._inputs(messages, max_tokens)
                streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=120)
                kwargs = {**self._gen_kwargs(budget, temperature, stop, sampling), "streamer": streamer}
                task = asyncio.ensure_future(
                    asyncio.to_thread(self._generate_sync, inputs, kwargs, stop, sampling.seed))
                sentinel, cutter = object(), StopCutter(sampling.stop)
                try:
                    while (piece := await asyncio.to_thread(next, streamer, sentinel)) is not sentinel:
                        if piece := cutter.feed(piece):
                            yield piece
                    if rest := cutter.flush():
                        yield rest
                    end = (await asyncio.shield(task))[0]
                    yield dataclasses.replace(end, finish_reason="stop") if cutter.stopped else end
                finally:  # the consumer went away (or failed): stop generating before releasing the model
                    stop.set()
                    await asyncio.wait([task])

    def cancel(self) -> int:
        return self.inflight.cancel()

    def count_tokens(self, messages: list[dict[str, str]]) -> int | None:
        batch = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)
        return int(batch["input_ids"].shape[1])

    def reconfigure(self, timeout_s: float) -> None:
        """Nothing to bound here: a local model has no call timeout of its own."""

    async def close(self) -> None:
        self.cancel()
        async with self.lock:  # the running generation has ended
            self.loaded = None

    # ------------------------------------------------------------------ labelling
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

        options = row.get("options")
        if not options or len(options) != len(row["choices"]):
            return self.option_logprobs([row])[0]  # no option texts: letter scoring
        prompt = self._encode([row], 32)
        opt = [self.tok.encode(" " + o, add_special_tokens=False)[:32] or [self.tok.eos_token_id] for o in options]
        k, longest = len(opt), max(map(len, opt))
        ids = torch.full((k, longest), self.tok.pad_token_id or 0, dtype=torch.long)
        for i, o in enumerate(opt):
            ids[i, :len(o)] = torch.tensor(o)
        n, device = prompt["input_ids"].shape[1], self.loaded.device
        lengths = torch.tensor([len(o) for o in opt])
        with torch.no_grad():
            first = self.loaded.model(**prompt, use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            cache.batch_repeat_interleave(k)
            mask = torch.cat([torch.ones(k, n, dtype=torch.long),
                              (torch.arange(longest)[None, :] < lengths[:, None]).long()], 1)
            rest = self.loaded.model(input_ids=ids.to(device), past_key_values=cache, attention_mask=mask.to(device),
                                     position_ids=(n + torch.arange(longest))[None, :].expand(k, -1).to(device))
        logits = torch.cat([first.logits[:, -1:, :].expand(k, -1, -1), rest.logits[:, :-1, :]], 1).float()
        logp = torch.log_softmax(logits, -1).gather(-1, ids.to(logits.device)[..., None])[..., 0].cpu()
        return {c: float(logp[i, :len(o)].mean()) for i, (c, o) in enumerate(zip(row["choices"], opt))}

    def option_scores(self, rows: Sequence[dict[str, Any]], mode: str) -> list[OptionScores]:
        """``option_text``: :meth:`option_text_logprobs` per row; ``letter``: :meth:`option_logprobs`."""
        scores = [self.option_text_logprobs(r) for r in rows] if mode == "option_text" else self.option_logprobs(rows)
        n_in = self._encode(rows, 1)["attention_mask"].sum(-1).tolist()
        return [OptionScores(lp, int(n)) for lp, n in zip(scores, n_in)]

    def complete(self, chats: Sequence[list[dict[str, str]]], max_tokens: int) -> list[Completion]:
        """Greedy answers of the batch, each cut at its first end-of-sequence token."""
        import torch

        enc = self._encode([{"messages": m} for m in chats], max_tokens)
        with torch.no_grad():
            out = self.loaded.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                             pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        gen_eos = getattr(self.loaded.model.generation_config, "eos_token_id", None)
        stops = {self.tok.eos_token_id, self.tok.pad_token_id}
        stops |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        answers = []
        for seq, n_in in zip(new.tolist(), enc["attention_mask"].sum(-1).tolist()):
            n_out = next((i + 1 for i, t in enumerate(seq) if t in stops), len(seq))
            answers.append(Completion(self.tok.decode(seq[:n_out], skip_special_tokens=True).strip(), int(n_in), n_out))
        return answers
