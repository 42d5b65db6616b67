"""The backend registry (shared/backends.py) and the openai backend over a mock transport (no network)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import httpx
import pytest
from pydantic import ValidationError

from shared import backends
from shared.backends import BackendOptions, Completion, StreamEnd, TargetAnswer, TargetRequestError
from shared.registry import ModelSpec

REMOTE = {"name": "remote", "role": "target", "backend": "openai", "source": "openai", "base_url": "http://up/v1"}


@pytest.fixture
def fresh_registry(monkeypatch):
    """A copy of the registry that a test may add to (the shipped backends already in it)."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._discover()))


def test_the_shipped_backends_are_found_and_vllm_is_not_imported():
    assert {"transformers", "vllm", "openai"} <= set(backends.backend_names())
    assert "vllm" not in sys.modules  # found and registered without importing the GPU library
    assert backends.is_remote("openai") and not backends.is_remote("transformers") and not backends.is_remote("vllm")


def test_an_entry_names_a_registered_backend():
    with pytest.raises(ValidationError, match="unknown backend 'tgi'; the backends are: .*openai.*transformers"):
        ModelSpec(name="m", role="target", source="hf", hf_id="x", backend="tgi")
    with pytest.raises(ValidationError, match="source openai and backend openai go together"):
        ModelSpec(name="m", role="target", source="hf", hf_id="x", backend="openai")
    assert ModelSpec(name="m", role="target", source="hf", hf_id="x").backend == "transformers"


def test_a_new_backend_is_one_registered_class(fresh_registry):
    @backends.register_backend("echo")
    class Echo:
        def __init__(self, spec, options):
            self.spec, self.options = spec, options

        async def generate(self, messages, max_tokens, temperature):
            return TargetAnswer(messages[-1]["content"][:max_tokens], 1, 1, "stop")

    spec = ModelSpec(name="m", role="target", source="hf", hf_id="x", backend="echo")
    built = backends.make_backend(spec, BackendOptions(purpose="labelling", timeout_s=7))
    assert isinstance(built, Echo) and built.options.timeout_s == 7 and Echo.name == "echo"
    assert asyncio.run(built.generate([{"role": "user", "content": "hello"}], 4, 0.0)).text == "hell"
    with pytest.raises(ValueError, match="registered twice"):
        backends.register_backend("echo")(type("Other", (), {}))


def test_a_missing_library_falls_back_with_one_warning(fresh_registry, caplog, monkeypatch):
    vllm = backends.backend_class("vllm")
    spec = ModelSpec(name="q", role="target", source="hf", hf_id="x", backend="vllm")
    monkeypatch.setattr(vllm, "available", classmethod(lambda cls: False))
    with caplog.at_level(logging.WARNING, logger="shared.backends"):
        assert backends.resolve_backend(spec, "serving") == "transformers"
    assert "q: vllm is not installed; serving with transformers instead" in caplog.text
    monkeypatch.setattr(vllm, "available", classmethod(lambda cls: True))
    assert backends.resolve_backend(spec, "serving") == "vllm"


def test_logsumexp_and_answer_budget():
    assert backends.logsumexp([0.0, 0.0]) == pytest.approx(0.6931471805599453)
    assert backends.logsumexp([float("-inf")]) == float("-inf")
    spec = ModelSpec(name="m", role="target", source="hf", hf_id="x", context_limit=100)
    assert backends.answer_budget(spec, 90, 50) == 10 and backends.answer_budget(spec, 10, 50) == 50
    with pytest.raises(TargetRequestError, match="the prompt has 100 tokens for m, whose context limit is 100"):
        backends.answer_budget(spec, 100, 1)


def openai_backend(handler, purpose="serving", **options):
    """The openai backend with its client's transport replaced by ``handler``."""
    backend = backends.make_backend(ModelSpec(**REMOTE), BackendOptions(purpose=purpose, **options))
    kind = httpx.AsyncClient if purpose == "serving" else httpx.Client
    backend.client = kind(base_url="http://up/v1", transport=httpx.MockTransport(handler),
                          timeout=options.get("timeout_s", 120))
    return backend


def chat_answer(text, usage=(3, 2)):
    return {"choices": [{"message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}


def test_openai_serving_generate_stream_and_request_faults():
    def handler(request):
        body = json.loads(request.content)
        if body["max_tokens"] == 999:
            return httpx.Response(413, json={"error": {"message": "too long"}})
        if body.get("stream"):
            chunks = [{"choices": [{"delta": {"content": "he"}}]},
                      {"choices": [{"delta": {"content": "llo"}, "finish_reason": "length"}]},
                      {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}]
            text = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, text=text)
        return httpx.Response(200, json=chat_answer("hi"))

    backend = openai_backend(handler)
    msgs = [{"role": "user", "content": "x"}]

    async def run():
        answer = await backend.generate(msgs, 5, 0.0)
        pieces = [p async for p in backend.stream(msgs, 5, 0.0)]
        with pytest.raises(TargetRequestError, match="remote refused the request: too long") as err:
            await backend.generate(msgs, 999, 0.0)
        await backend.close()
        return answer, pieces, err.value.status

    answer, pieces, status = asyncio.run(run())
    assert answer == TargetAnswer("hi", 3, 2, "stop") and status == 413
    assert pieces == ["he", "llo", StreamEnd("length", 4, 2)]
    assert backend.client.is_closed and backend.count_tokens(msgs) is None


def test_openai_cancel_stops_calls_in_flight_and_reconfigure_sets_the_bound():
    async def handler(request):
        await asyncio.sleep(60)  # an endpoint that never answers in time

    backend = openai_backend(handler)
    backend.reconfigure(3)
    assert backend.client.timeout.read == backend.client.timeout.connect == 3

    async def run():
        call = asyncio.ensure_future(backend.generate([{"role": "user", "content": "x"}], 5, 0.0))
        await asyncio.sleep(0.05)
        stopped = backend.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        return stopped, len(backend.inflight.tasks)

    assert asyncio.run(run()) == (1, 0)


def test_openai_labelling_retries_then_answers_or_reports_the_error():
    calls = []

    def handler(request):
        calls.append(json.loads(request.content))
        if calls[-1]["messages"][0]["content"] == "bad":
            return httpx.Response(400, text="no such model")
        return httpx.Response(503) if len(calls) < 3 else httpx.Response(200, json=chat_answer("B", (7, 1)))

    backend = openai_backend(handler, purpose="labelling", max_retries=2, backoff_s=0.0)
    got = backend.complete([[{"role": "user", "content": "q"}], [{"role": "user", "content": "bad"}]], 24)
    assert got[0].text == "B" and (got[0].input_tokens, got[0].output_tokens) == (7, 1) and got[0].error is None
    assert got[1].text is None and got[1].error.startswith("EndpointError: remote at http://up/v1: HTTP 400")
    assert "(after 1 attempts)" in got[1].error and len(calls) == 4
    assert calls[0] == {"model": "remote", "messages": [{"role": "user", "content": "q"}], "max_tokens": 24,
                        "temperature": 0.0}
    assert backend.option_scores([], "option_text") is None and isinstance(got[0], Completion)


@pytest.mark.slow
def test_transformers_counts_cancels_and_closes(smollm):
    """count_tokens is the prompt that generate reads; a stream says what generate says; cancel stops a
    generation within a step."""
    backend = backends.make_backend(smollm.spec, BackendOptions(loaded=smollm))
    msgs = [{"role": "user", "content": "Count from one to one hundred."}]

    async def run():
        short = await backend.generate(msgs, 2, 0.0)
        pieces = [p async for p in backend.stream(msgs, 2, 0.0)]
        assert pieces[-1] == StreamEnd("length", short.prompt_tokens, 2)
        assert "".join(pieces[:-1]).strip() == short.text
        call = asyncio.ensure_future(backend.generate(msgs, 400, 0.0))
        while not backend.stats["active"]:
            await asyncio.sleep(0.01)
        stopped = backend.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await backend.close()
        return short, stopped

    short, stopped = asyncio.run(run())
    assert short.prompt_tokens == backend.count_tokens(msgs) and short.completion_tokens == 2
    assert stopped == 1 and backend.stats["cancelled"] == 1 and backend.stats["active"] == 0
    assert backend.loaded is None
