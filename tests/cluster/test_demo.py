"""``prefill-router demo``: its pure pieces in the default suite; the whole demo opt-in.

The full quick demo (local Ray head, pipeline, Serve, chat requests) takes 3 to 6 minutes
on 2 CPUs, so it runs only with ``PREFILL_ROUTER_DEMO_TEST=1``; its pieces (the
pipeline, the Serve app, the local head) are each tested end to end elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cluster.demo import REFERENCE, labelled_targets, pipeline_config, reference_sample
from cluster.demo_chat import pick_prompts


def query_table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2])
    return pa.table({"query_id": [f"q{i:04d}" for i in range(n)], "split": split.tolist(),
                     "source": [["mmlu", "mmlu", "reasoning_gym", "reasoning_gym"][i % 4] for i in range(n)],
                     "task": [["law", "physics", "arith", "gcd"][i % 4] for i in range(n)],
                     "messages": [[{"role": "user", "content": f"question {i}"}] for i in range(n)]})


def test_reference_sample_is_stable_and_keeps_split_shares(tmp_path):
    import pyarrow.parquet as pq

    table = query_table(1000)
    pq.write_table(table, tmp_path / "q.parquet")
    a, b = reference_sample(tmp_path / "q.parquet", 200), reference_sample(tmp_path / "q.parquet", 200)
    assert a.column("query_id").to_pylist() == b.column("query_id").to_pylist()
    assert abs(a.num_rows - 200) <= 3
    for s in ("train", "val", "test"):
        share = table.column("split").to_pylist().count(s) / 1000
        assert abs(a.column("split").to_pylist().count(s) / a.num_rows - share) < 0.02
    smaller = set(reference_sample(tmp_path / "q.parquet", 100).column("query_id").to_pylist())
    assert smaller <= set(a.column("query_id").to_pylist())  # nested: a bigger sample keeps the smaller one


def test_pick_prompts_takes_test_rows_one_task_first():
    picked = pick_prompts(query_table(60), 4)
    assert len(picked) == 4
    assert len({p["task"] for p in picked[:3]} & {"law", "physics"}) == 1  # MMLU subjects: one family
    assert {"arith", "gcd"} <= {p["task"] for p in picked[:3]}
    test_ids = {r["query_id"] for r in query_table(60).to_pylist() if r["split"] == "test"}
    assert {p["query_id"] for p in picked} <= test_ids and len({p["query_id"] for p in picked}) == 4


@pytest.mark.skipif(not (REFERENCE["labels"] / "summary.json").is_file(), reason="reference labels not committed")
def test_reference_labels_config_and_reuse(tmp_path):
    from cluster.pipeline.run import reuse_labels
    from cluster.pipeline.state import check_pipeline

    cfg = pipeline_config(tmp_path, quick=True, reference_labels=REFERENCE["labels"])
    check_pipeline(cfg)
    assert cfg.data is None and cfg.queries == str(tmp_path / "queries.parquet")
    assert cfg.label.out == cfg.probe.labels == cfg.fit.labels == cfg.evaluate.labels == str(REFERENCE["labels"])
    assert cfg.targets == labelled_targets(REFERENCE["labels"])  # every labelled target, registry order
    assert cfg.targets[:2] == ["smollm2-135m", "gemma3-270m"]
    result = reuse_labels(cfg)
    assert result["skipped"] and result["queries"] > 200 and set(result["accuracy"]) == set(cfg.targets)
    with pytest.raises(RuntimeError, match="have no"):
        reuse_labels(cfg.model_copy(update={"targets": [*cfg.targets, "qwen2.5-coder-0.5b"]}))
    picked = pipeline_config(tmp_path, quick=True, reference_labels=REFERENCE["labels"], targets=["gemma3-270m"])
    assert picked.targets == ["gemma3-270m"]


def test_fresh_labelling_config_keeps_the_configs_table_and_targets(tmp_path):
    cfg = pipeline_config(tmp_path, quick=True, reference_labels=None)
    assert cfg.data is not None and cfg.labels is None and cfg.targets == ["smollm2-135m", "gemma3-270m"]
    assert pipeline_config(tmp_path, True, None, ["smollm2-135m"]).targets == ["smollm2-135m"]


def test_labelled_targets_follow_the_registry_order(tmp_path):
    for name in ("zeta-model", "gemma3-270m", "smollm2-135m", "unfinished"):
        (tmp_path / name).mkdir()
    for name in ("zeta-model", "gemma3-270m", "smollm2-135m"):
        (tmp_path / name / "manifest.json").write_text("{}")
    assert labelled_targets(tmp_path) == ["smollm2-135m", "gemma3-270m", "zeta-model"]


def test_serve_overrides_share_the_cpus_among_the_targets():
    from shared.config import load_config
    from serving.config import ServeConfig
    from cluster.demo_chat import CONFIG_DIR, serve_overrides

    three = serve_overrides("/a", 8123, {"CPU": 2.0}, ["a", "b", "c"])
    cfg = load_config(ServeConfig, CONFIG_DIR / "serve-local.yaml", three)
    assert cfg.targets == ["a", "b", "c"] and cfg.http_port == 8123
    asked = cfg.ingress.num_cpus + cfg.encoder.num_cpus + cfg.head.num_cpus + 3 * cfg.target_defaults.num_cpus
    assert asked <= 2.0  # every replica fits on the 2-CPU machine
    two = load_config(ServeConfig, CONFIG_DIR / "serve-local.yaml", serve_overrides("/a", 1, {"CPU": 2.0}, ["a", "b"]))
    assert two.target_defaults.num_cpus == 0.5 and two.target_defaults.num_gpus == 0
    gpu = load_config(ServeConfig, CONFIG_DIR / "serve-local.yaml",
                      serve_overrides("/a", 1, {"CPU": 8.0, "GPU": 1.0}, ["a", "b"]))
    assert gpu.encoder.num_gpus + 2 * gpu.target_defaults.num_gpus <= 1.0


def test_demo_rejects_missing_reference_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="reference labels"):
        pipeline_config(tmp_path, quick=True, reference_labels=tmp_path / "nowhere")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PREFILL_ROUTER_DEMO_TEST") != "1", reason="opt-in: PREFILL_ROUTER_DEMO_TEST=1")
@pytest.mark.timeout(1800)
def test_quick_demo_end_to_end(tmp_path, capsys):
    from cluster.cli import main

    assert main(["demo", "--quick", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    work = tmp_path / "quick"
    summary = json.loads((work / "demo-summary.json").read_text())
    report = json.loads((work / "eval" / "report.json").read_text())
    assert summary["test_metrics"]["accuracy"] == pytest.approx(
        report["subsets"]["test"]["routers"]["prefill-router"]["accuracy"])
    assert (work / "eval" / "cost_accuracy.png").stat().st_size > 0 and list((work / "probe").glob("*.png"))
    chats = summary["serve"]["chats"]
    assert chats and all(c["target"] in report["targets"] for c in chats)
    assert "demo summary" in out and "stopped the demo's Ray cluster" in out
    assert not Path(work / "cluster.json").exists()  # the demo's head was stopped (stop_head removes it)


def test_why_explains_the_policy_and_a_fallback():
    from cluster.demo_chat import why

    r = {"probabilities": {"small": 0.41, "big": 0.55}, "tolerance": 0.2, "eligible": ["small", "big"],
         "target": "small", "fallback_from": None}
    assert why(r).endswith("within 0.20 of the best (0.55): small, big -> cheapest small")
    assert "failed (small), answered by big" in why({**r, "target": "big", "fallback_from": "small"})
    v = {**r, "policy": "value", "value": 0.01, "tolerance": None, "costs": {"small": 0.001, "big": 0.004}}
    assert why(v).endswith("net value at 0.01 USD per correct answer: small 0.0031, big 0.0015 -> highest small")


def test_sigterm_becomes_system_exit_while_the_demo_runs():
    import signal

    from shared.cli_utils import exit_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, exit_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) == before  # restored afterwards


def _served() -> dict:
    chat = {"query_id": "q1", "task": "gcd", "messages": [{"role": "user", "content": "gcd(4, 6)?"}],
            "target": "small", "answer": "2", "probabilities": {"small": 0.6, "big": 0.7}, "eligible": ["small", "big"],
            "policy": "tolerance", "tolerance": 0.2, "value": None, "costs": {}, "overhead_ms": 12.5, "seconds": 1.25,
            "fallback_from": None, "degraded": None}
    return {"url": "http://127.0.0.1:8123", "targets": ["small", "big"], "not_served": {"huge": "no weights"},
            "startup_s": 9.5, "chats": [chat], "median_overhead_ms": 12.5}


def test_demo_summary_is_written_as_the_dict_it_replaced(tmp_path):
    from cluster.demo_results import DemoSummary, ServeResult
    from shared import storage

    stages = {"data": {"queries": "q.parquet", "built": False}, "evaluate": {"metrics": {"accuracy": 0.75}}}
    fields = {"workdir": str(tmp_path), "quick": True, "reference_labels": "", "seconds": {"pipeline": 12.3},
              "files": {"summary": str(tmp_path / "demo-summary.json")}, "stages": stages, "serve": _served(),
              "test_metrics": {"accuracy": 0.75, "gap_closed": 0.25}}
    summary = DemoSummary(**{**fields, "serve": ServeResult(**_served())})
    storage.write_json(str(tmp_path / "old.json"), fields)
    storage.write_json(str(tmp_path / "new.json"), summary.model_dump(exclude={"shipped"}))  # a field added since
    assert (tmp_path / "new.json").read_bytes() == (tmp_path / "old.json").read_bytes()
    with pytest.raises(ValueError, match="extra"):
        DemoSummary(**fields, surprise=1)


def test_summary_table_reads_the_report_model():
    from rich.console import Console

    from cluster.demo import summary_table
    from cluster.demo_results import DemoSummary
    from training.evaluate.results import EvalReport

    path = Path(__file__).resolve().parents[2] / "data" / "eval" / "report.json"
    report = EvalReport.read(str(path))
    summary = DemoSummary(workdir="w", quick=True, reference_labels="", seconds={"pipeline": 61.0},
                          files={"summary": "w/demo-summary.json"}, stages={}, serve=_served(), test_metrics={})
    console = Console(width=200, record=True)
    console.print(summary_table(summary, report))
    text = console.export_text()
    ours, refs = report.router("prefill-router"), report.subsets["test"].references
    assert f"{ours.accuracy:.1%} / {refs.best_single.accuracy:.1%} ({refs.best_single.target})" in text
    assert str(report.n.test) in text and "time: pipeline" in text and "61 s" in text


def test_demo_summary_quotes_the_shipped_routers_on_real_targets(tmp_path):
    """The summary's lines for RouterBench (cost routing) and RouterDC (equal prices: task-averaged
    accuracy) are read from the committed reports; a missing report is named, not invented."""
    from cluster.demo_results import SHIPPED, shipped_results
    from training.evaluate.results import EvalReport
    from tests.procs import ROOT

    lines = shipped_results(ROOT)
    bench, dc = (EvalReport.read(str(ROOT / p)) for p in SHIPPED.values())
    rb_line, dc_line = lines.values()
    ours = bench.router("prefill-router")
    assert f"{ours.accuracy:.2%}" in rb_line and f"{ours.cost_savings:.1%} lower cost than gpt-4" in rb_line
    test = dc.subsets["test"]
    assert test.references.equal_costs and "cost" not in dc_line
    assert f"router {test.routers['prefill-router'].task_averaged_accuracy:.2%} task-averaged" in dc_line
    assert f"task-aware {test.routers['task-best'].task_averaged_accuracy:.2%}" in dc_line and "52.70%" in dc_line
    assert set(shipped_results(tmp_path).values()) == {f"no report at {p}" for p in SHIPPED.values()}
