import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shared.config import load_config
from tests.procs import ROOT as REPO_ROOT
from training.data.build import (
    DataConfig, MMLUConfig, RGTaskConfig, BuildReport, assign_split, build_queries, main, mmlu_records, run_build,
)

QUICK = REPO_ROOT / "configs" / "data-quick.yaml"


def mmlu_line(q="What is x?", answer="B", topic="algebra", **extra):
    rec = {"question": q, "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4",
           "correct_answer": answer, "topic": topic, **extra}
    return json.dumps(rec)


def test_same_seed_same_bytes(tmp_path: Path):
    cfg = load_config(DataConfig, QUICK)
    paths = []
    for i in range(2):
        out = tmp_path / f"q{i}.parquet"
        run_build(cfg.model_copy(update={"output": str(out)}))
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    table = pq.read_table(paths[0])
    assert table.num_rows == 200
    assert set(table.column("split").to_pylist()) == {"train", "val", "test"}
    assert table.column("query_id").to_pylist() == sorted(set(table.column("query_id").to_pylist()), key=table.column("query_id").to_pylist().index)


def test_different_seed_different_sample(tmp_path: Path):
    a, _ = build_queries(load_config(DataConfig, QUICK))
    b, _ = build_queries(load_config(DataConfig, QUICK, ["seed=1"]))
    assert a.column("query_id").to_pylist() != b.column("query_id").to_pylist()


def test_rows_have_prompt_reference_and_types():
    table, report = build_queries(load_config(DataConfig, QUICK))
    rows = table.to_pylist()
    assert report.kept == {"mmlu": 120, "reasoning_gym": 80}
    for row in rows:
        assert row["messages"][0]["role"] == "user" and row["messages"][0]["content"].strip()
        assert row["reference"].strip()
    mc = [r for r in rows if r["answer_type"] == "multiple_choice"]
    assert mc and all(r["reference"] in r["choices"] for r in mc)
    assert {r["answer_type"] for r in rows} >= {"multiple_choice", "exact", "numeric"}
    rg = [r for r in rows if r["source"] == "reasoning_gym"]
    assert all(json.loads(r["meta"])["rg_task"] for r in rg)


def test_splits_are_grouped_and_independent_of_other_rows(tmp_path: Path):
    # The same question twice (different topic labels -> different query ids) must share a split.
    lines = [mmlu_line(q=f"Question {i}?", topic=f"t{i % 3}") for i in range(200)]
    lines += [mmlu_line(q="Question 7?", topic="other topic")]
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(lines))
    cfg = DataConfig(mmlu=MMLUConfig(n=201), reasoning_gym=[])
    table, _ = build_queries(cfg, mmlu_file=path)
    by_group: dict[str, set] = {}
    for row in table.to_pylist():
        by_group.setdefault(row["group_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in by_group.values())
    assert table.num_rows == 201 and len(by_group) == 200
    # A group's split is a function of (seed, group) alone.
    assert assign_split("g1", 0, cfg.splits) == assign_split("g1", 0, cfg.splits)
    counts = {s: sum(assign_split(f"g{i}", 0, cfg.splits) == s for i in range(5000)) for s in ("train", "val", "test")}
    assert 3300 < counts["train"] < 3700 and 350 < counts["val"] < 650 and 850 < counts["test"] < 1150


def test_bad_records_are_reported_and_skipped(tmp_path: Path):
    lines = [mmlu_line(q=f"Good {i}?") for i in range(5)]
    lines += ["{not json", mmlu_line(q="   "), mmlu_line(answer="E"), mmlu_line(q="No options", answer_c=""),
              mmlu_line(q="Good 0?")]  # an exact duplicate of a kept question
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(lines))
    report = BuildReport()
    kept = list(mmlu_records(MMLUConfig(n=100), 0, report, path))
    assert len(kept) == 6  # 5 good + the duplicate line (dropped later by build_queries)
    assert sum(report.skipped.values()) == 4
    reasons = " ".join(report.skipped)
    assert "JSONDecodeError" in reasons and "empty question" in reasons
    assert "not in A-D" in reasons and "missing answer option" in reasons
    table, rep = build_queries(DataConfig(mmlu=MMLUConfig(n=100), reasoning_gym=[]), mmlu_file=path)
    assert table.num_rows == 5 and rep.skipped["mmlu: duplicate query"] == 1


def test_bad_config_and_unknown_task_fail_clearly(tmp_path: Path, capsys):
    assert main(["build", f"output={tmp_path / 'x.parquet'}", "splits.train=0.9"]) == 2
    assert "sum to 1" in capsys.readouterr().err
    cfg = DataConfig(mmlu=MMLUConfig(n=0), reasoning_gym=[RGTaskConfig(task="no_such_task", n=2)])
    with pytest.raises(ValueError, match="no_such_task"):
        build_queries(cfg)
    with pytest.raises(ValueError, match="empty"):
        build_queries(DataConfig(mmlu=MMLUConfig(n=0), reasoning_gym=[]))
