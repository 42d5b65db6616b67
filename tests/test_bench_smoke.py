"""Every bench/*.py runs end to end on a tiny input and writes the JSON fields its bench/README.md table reads.

A refactor that breaks a bench (a renamed function, a typed object the bench still indexes as
a dict) fails here instead of at the next published run. Each bench names what its table reads
of its JSON in one constant, ``TABLE_FIELDS`` (``{key: sub-keys}``; a sub-key is dotted for a
nested dict and ``*`` stands for every value of a dict; a list's items are checked one by one),
which its table code reads too; each test also renders the table from the JSON read back.

The three RouterBench benches read a capture, labels and a query table: a tiny synthetic one
(``routerbench_work``) stands in for ``runs/pipeline-routerbench``. ``capture_throughput
--routerbench`` reads ``../shared/data/routerbench`` and skips where it is absent. The benches
that load models or start Ray are ``slow`` and share one module-scoped Ray.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ROOT = Path(__file__).resolve().parents[1]
ROUTERBENCH = ROOT.parent / "shared" / "data" / "routerbench"  # bench/README.md: ../shared/data/routerbench
RB_ARTIFACT = ROOT / "data" / "routerbench" / "router"
TASKS = ("arc-challenge", "winogrande", "mbpp")


def bench(name: str):
    return importlib.import_module(f"bench.{name}")


def missing_fields(doc: dict, spec: dict[str, tuple[str, ...]]) -> list[str]:
    """The fields of ``spec`` (a bench's ``TABLE_FIELDS``) that ``doc`` lacks, as dotted paths."""
    def walk(value, parts: list[str], where: str) -> list[str]:
        if isinstance(value, list):
            return [m for i, item in enumerate(value) for m in walk(item, parts, f"{where}[{i}]")]
        if not parts:
            return []
        head, rest = parts[0], parts[1:]
        if head == "*":
            return [m for k, v in value.items() for m in walk(v, rest, f"{where}.{k}")] if value else [where + ".*"]
        if not isinstance(value, dict) or head not in value:
            return [f"{where}.{head}".lstrip(".")]
        return walk(value[head], rest, f"{where}.{head}")

    return [m for key, subs in spec.items() for sub in (subs or ("",))
            for m in walk(doc, [key, *filter(None, sub.split("."))], "")]


def read_checked(module, path: Path) -> dict:
    doc = json.loads(Path(path).read_text())
    assert missing_fields(doc, module.TABLE_FIELDS) == []
    return doc


def test_missing_fields_names_what_a_table_would_miss():
    spec = {"off": ("p50_ms",), "load": ("rps",), "by_task": ("*.n", "*.top1"), "n": ()}
    doc = {"off": {"p50_ms": 1.0}, "load": [{"rps": 1}, {"rps": 2}], "by_task": {"a": {"n": 1, "top1": {}}}, "n": 3}
    assert missing_fields(doc, spec) == []
    doc = {"off": {}, "load": [{"rps": 1}, {}], "by_task": {"a": {"n": 1}, "b": {"top1": {}}}}
    assert missing_fields(doc, spec) == ["off.p50_ms", "load[1].rps", "by_task.b.n", "by_task.a.top1", "n"]


RESULTS = {"adapt": ["adapt_routerdc.json", "adapt_routerdc_lr1e-5.json", "adapt_routerbench.json"],
           "decision_latency": ["decision_latency.json"],
           "capture_throughput": ["capture_throughput.json", "capture_throughput_routerbench.json"],
           "encoder_combination": ["encoder_combination.json", "encoder_combination_routerdc.json",
                                   "encoder_combination_routerdc_unseen.json"],
           "novelty_gate": ["novelty_gate_routerdc.json", "novelty_gate_routerdc_attn.json"], "fit_workers": ["fit_workers.json"],
           "objectives": ["objectives_routerdc.json", "objectives_routerbench.json"],
           "pooling": ["pooling_routerdc.json", "pooling_routerbench.json", "pooling_routerbench_q4.json",
                       "pooling_routerbench_v2.json", "pooling_routerdc_v2.json", "pooling_routerbench_h12.json",
                       "pooling_routerdc_h12.json"],
           "next_token_signal": ["next_token_smollm2.json", "next_token_qwen_sample600.json"],
           "prefix_cache": ["prefix_cache_latency.json", "prefix_cache_latency_2026-12-02.json"],
           "routing_headroom": ["routing_headroom.json"], "serve_load": ["serve_load.json", "serve_load_64tok.json"],
           "learning_loop": ["learning_loop.json", "learning_loop_routerdc.json"]}  # run: tests/test_bench_learning_loop.py (system)


@pytest.mark.parametrize("name", sorted(RESULTS))
def test_published_results_hold_what_their_tables_read(name):
    """The committed bench/results/*.json behind bench/README.md's tables hold each bench's TABLE_FIELDS."""
    for file in RESULTS[name]:
        read_checked(bench(name), ROOT / "bench" / "results" / file)
    assert {p.stem for p in (ROOT / "bench").glob("*.py")} == set(RESULTS)  # every bench is listed (and run below)


# ----------------------------------------------------------------------------- RouterBench-like capture
def write_routerbench_work(root: Path, n: int = 150, seed: int = 0) -> dict:
    """A tiny stand-in for ``runs/pipeline-routerbench``: activations (the RouterBench router's
    blocks ``h18_last``, ``h21_last`` and a ``h30_next`` block), labels of the router's 11 targets
    and the query table (task, group, split, messages)."""
    from shared import storage
    from shared.artifact import load_artifact
    from training.shards import check_manifest, shard_path, update_manifest

    rng = np.random.default_rng(seed)
    qids = [f"rb{i:04d}" for i in range(n)]
    tasks = [TASKS[i % 3] for i in range(n)]
    split = rng.choice(["train", "val", "test"], size=n, p=[0.6, 0.2, 0.2]).tolist()
    hard = rng.normal(size=n)
    acts = str(root / "activations")
    cols = {"query_id": qids, "split": split, "n_tokens": rng.integers(50, 400, size=n).tolist()}
    for block in ("h18_last", "h21_last"):
        x = rng.normal(size=(n, 16)).astype(np.float32)
        x[:, 0] += hard
        cols[block] = pa.FixedShapeTensorArray.from_numpy_ndarray(x)
    sure = 1 / (1 + np.exp(hard))
    nxt = np.stack([sure, sure / 2, 1 - sure], 1).astype(np.float32)
    cols["h30_next"] = pa.FixedShapeTensorArray.from_numpy_ndarray(nxt)
    check_manifest(acts, {"encoder": {"name": "smollm2-135m", "sha256": None}, "synthetic": True})
    update_manifest(acts, columns=["h18_last", "h21_last", "h30_next"])
    storage.write_parquet(pa.table(cols), shard_path(acts, 0))
    targets = load_artifact(str(RB_ARTIFACT)).target_names
    for t, target in enumerate(targets):
        correct = (rng.random(n) < 1 / (1 + np.exp(hard - 1 + 0.1 * t))).astype(float)
        storage.write_parquet(pa.table({
            "query_id": qids, "status": ["ok"] * n, "correct": correct.tolist(), "input_tokens": cols["n_tokens"],
            "output_tokens": [8] * n, "cost": (np.asarray(cols["n_tokens"]) * 1e-6 / (t + 1)).tolist()}),
            shard_path(str(root / "labels" / target), 0))
    queries = str(root / "queries.parquet")
    storage.write_parquet(pa.table({
        "query_id": qids, "split": split, "task": tasks, "source": ["routerbench"] * n,
        "group_id": [f"g{i // 2}" for i in range(n)],
        "messages": [[{"role": "user", "content": f"{task} question {i}"}] for i, task in enumerate(tasks)]}), queries)
    return {"root": str(root), "activations": acts, "labels": str(root / "labels"), "queries": queries}


@pytest.fixture(scope="module")
def routerbench_work(tmp_path_factory):
    return write_routerbench_work(tmp_path_factory.mktemp("routerbench-work"))


def test_routing_headroom_runs_on_a_tiny_capture(routerbench_work, tmp_path):
    headroom = bench("routing_headroom")
    out = tmp_path / "out"
    assert headroom.main(["--work-dir", routerbench_work["root"], "--artifact", str(RB_ARTIFACT), "--draws", "1",
                          "--reports", str(ROOT / "data" / "routerbench" / "eval" / "report.json"),
                          "--out", str(out)]) == 0
    doc = read_checked(headroom, out / "routing_headroom.json")
    assert len(doc["synthetic"]) == len(headroom.SIGMAS) * len(headroom.RHOS) and doc["measured"]
    assert (out / "routing_headroom.png").stat().st_size > 0
    for value_policy in (False, True):
        assert headroom.markdown(doc["synthetic"], value_policy).count("\n") == 1 + len(headroom.SIGMAS)


def test_encoder_combination_runs_on_a_tiny_capture(routerbench_work, tmp_path):
    combination = bench("encoder_combination")
    w, out = routerbench_work, tmp_path / "combination.json"
    assert combination.main(["--capture", f"a={w['activations']}:h18_last", "--capture",
                             f"b={w['activations']}:h21_last", "--labels", w["labels"], "--queries", w["queries"],
                             "--artifact", str(RB_ARTIFACT), "--n-components", "4", "--folds", "2", "--seeds", "1",
                             "--max-epochs", "5", "--decision", "--fold-by", "task", "--out", str(out)]) == 0
    doc = read_checked(combination, out)
    assert [r["sources"] for r in doc["rows"]] == [["a"], ["b"], ["a", "b"]]
    assert all(set(r["decision"]) == set(combination.DECISION_FIELDS) for r in doc["rows"])
    assert combination.markdown(doc["rows"], doc["args"]["targets"][0]).count("\n") == (1 + 3) + 2 + (1 + 3)


def test_novelty_gate_runs_on_a_tiny_capture(routerbench_work, tmp_path):
    gate = bench("novelty_gate")
    w, out = routerbench_work, tmp_path / "novelty.json"
    assert gate.main(["--activations", w["activations"], "--blocks", "h18_last", "--labels", w["labels"],
                      "--queries", w["queries"], "--artifact", str(RB_ARTIFACT), "--n-components", "4", "--folds", "2",
                      "--seeds", "1", "--max-epochs", "5", "--n-boot", "20", "--quantiles", "0.5", "0.9",
                      "--out", str(out)]) == 0
    doc = read_checked(gate, out)
    assert [(r["folds"], r["quantile"]) for r in doc["rows"]] == [("group", 0.5), ("group", 0.9), ("task", 0.5),
                                                                  ("task", 0.9)]
    assert doc["rows"][0]["novel_share"] > doc["rows"][1]["novel_share"]
    assert gate.markdown(doc["rows"]).count("\n") == 1 + 4


def test_objectives_runs_on_a_tiny_capture(routerbench_work, tmp_path):
    objectives = bench("objectives")
    w, out = routerbench_work, tmp_path / "objectives.json"
    assert objectives.main(["--activations", w["activations"], "--labels", w["labels"], "--queries", w["queries"],
                            "--artifact", str(RB_ARTIFACT), "--blocks", "h18_last", "h18_last,h21_last",
                            "--objectives", "bce", "listwise:2:0.1", "--n-components", "4", "--folds", "2",
                            "--seeds", "1", "--max-epochs", "5", "--out", str(out)]) == 0
    doc = read_checked(objectives, out)
    assert [(r["blocks"], r["objective"]) for r in doc["rows"]] == [
        ("h18_last", "bce"), ("h18_last", "listwise x2 t0.1"), ("h18_last+h21_last", "bce"),
        ("h18_last+h21_last", "listwise x2 t0.1")]
    assert all(0 <= r["pairwise_auc"] <= 1 for r in doc["rows"]) and 0 <= doc["reference"]["pairwise_auc"] <= 1
    assert objectives.markdown(doc).count("\n") == 1 + 4 + 1


def test_pooling_runs_on_a_tiny_capture_with_token_states(routerbench_work, tmp_path):
    """The tiny capture plus layer-18 token states (``t18``; the last one is ``h18_last``)."""
    from shared import storage
    from training.capture.output import rows_to_table
    from training.shards import check_manifest, read_shards, shard_path

    pooling, w = bench("pooling"), routerbench_work
    table, rng = read_shards(w["activations"]), np.random.default_rng(1)
    last = table.column("h18_last").combine_chunks().to_numpy_ndarray()
    rows = []
    for i, qid in enumerate(table.column("query_id").to_pylist()):
        t = int(rng.integers(3, 9))
        states = np.concatenate([rng.normal(size=(t - 1, 16)), last[i:i + 1]]).astype(np.float16)
        rows.append({"query_id": qid, "split": table.column("split")[i].as_py(), "n_tokens": t, "truncated": False,
                     "h18_last": last[i], "t18": states.tobytes(), "n_states": t, "prefix_key": ""})
    acts = str(tmp_path / "tokens")
    check_manifest(acts, {"hidden_size": 16, "token_layers": [18], "token_window": 8})
    storage.write_parquet(rows_to_table(rows, ["h18_last"], [18]), shard_path(acts, 0))
    out = tmp_path / "pooling.json"
    assert pooling.main(["--activations", acts, "--labels", w["labels"], "--queries", w["queries"],
                         "--artifact", str(RB_ARTIFACT), "--blocks", "h18_last", "h18_attn", "h18_attn,h18_last",
                         "--objectives", "bce", "pairwise:1", "--n-components", "4", "--token-components", "4",
                         "--folds", "2", "--seeds", "1", "--max-epochs", "5", "--out", str(out)]) == 0
    doc = read_checked(pooling, out)
    assert [(r["blocks"], r["objective"]) for r in doc["rows"]] == [
        (b, o) for b in ("h18_last", "h18_attn", "h18_attn+h18_last") for o in ("bce", "pairwise x1")]
    assert set(doc["rows"][2]["within_task_auc_by_task"]) == set(TASKS) == set(doc["tasks"])
    assert pooling.markdown(doc).count("\n") == 1 + 6 + 1


@pytest.mark.slow  # loads SmolLM2's block 13
def test_adapt_runs_on_a_tiny_capture_with_layer_12_token_states(routerbench_work, tmp_path):
    """The tiny capture's rows with random SmolLM2-wide layer-12 token states and frozen h12 blocks."""
    from shared import storage
    from training.capture.output import rows_to_table
    from training.shards import check_manifest, read_shards, shard_path

    adapt, w = bench("adapt"), routerbench_work
    table, rng = read_shards(w["activations"]), np.random.default_rng(2)
    rows = []
    for i, qid in enumerate(table.column("query_id").to_pylist()):
        t = int(rng.integers(3, 9))
        states = rng.normal(size=(t, 576)).astype(np.float16)
        rows.append({"query_id": qid, "split": table.column("split")[i].as_py(), "n_tokens": t + 20, "truncated": False,
                     "h12_last": states[-1].astype(np.float32), "h12_mean": states.mean(0).astype(np.float32),
                     "t12": states.tobytes(), "n_states": t, "prefix_key": ""})
    acts = str(tmp_path / "tokens")
    check_manifest(acts, {"hidden_size": 576, "token_layers": [12], "token_window": 8})
    storage.write_parquet(rows_to_table(rows, ["h12_last", "h12_mean"], [12]), shard_path(acts, 0))
    out = tmp_path / "adapt.json"
    assert adapt.main(["--activations", acts, "--labels", w["labels"], "--queries", w["queries"],
                       "--artifact", str(RB_ARTIFACT), "--objectives", "bce", "sample_llm:1:0.1", "--untrained",
                       "--n-components", "4", "--folds", "2", "--max-folds", "1", "--seeds", "1", "--max-epochs", "3",
                       "--epochs", "1", "--batch-size", "16", "--workers", "2", "--out", str(out)]) == 0
    doc = read_checked(adapt, out)
    assert [r["row"] for r in doc["rows"]] == ["frozen h12_last+h12_mean", "untrained blocks", "adapted, bce",
                                               "adapted, sample_llm x1 t0.1 top3 bottom3"]
    assert 0 < doc["n_scored"] < doc["n_rows"] and set(doc["tasks"]) == set(TASKS)
    assert adapt.markdown(doc).count("\n") == 1 + 4 + 1


def test_next_token_signal_samples_and_scores_a_tiny_capture(routerbench_work, tmp_path):
    signal = bench("next_token_signal")
    w, out = routerbench_work, tmp_path / "next.json"
    assert signal.main(["sample", "--queries", w["queries"], "--per-task", "arc-challenge=5", "winogrande=3",
                        "--out", str(tmp_path / "sample.parquet")]) == 0
    assert signal.main(["score", "--activations", w["activations"], "--labels", w["labels"],
                        "--queries", w["queries"], "--out", str(out)]) == 0
    doc = read_checked(signal, out)
    assert doc["column"] == "h30_next" and sorted(doc["by_task"]) == sorted(TASKS)
    text = signal.markdown(doc["by_task"], doc["targets"], doc["targets"][0])
    assert text.count("\n") == 1 + len(TASKS) * len(signal.STATS)


# ----------------------------------------------------------------------------- real models and Ray
@pytest.fixture(scope="module")
def ray_local():
    """One local 2-CPU Ray for the benches that need one: each keeps a Ray it did not start."""
    import ray

    from shared.ray_boot import ensure_ray

    ensure_ray("local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_prefix_cache_runs_on_a_short_system_prompt(tmp_path):
    prefix = bench("prefix_cache")
    out = tmp_path / "prefix.json"
    assert prefix.main(["--system-tokens", "64", "--n", "2", "--json", str(out)]) == 0
    doc = read_checked(prefix, out)
    assert doc["n"] == 2 and doc["cache"]["hits"] == 2 and doc["max_probability_gap"] < 1e-4
    assert "**" in prefix.report(doc)


@pytest.mark.slow
def test_decision_latency_times_two_artifacts_side_by_side(tmp_path):
    latency = bench("decision_latency")
    out = tmp_path / "latency.json"
    assert latency.main([f"reference={ROOT / 'data' / 'router'}", str(RB_ARTIFACT), "--n", "2", "--json", str(out)]) == 0
    doc = read_checked(latency, out)
    assert [r["label"] for r in doc["rows"]] == ["reference", "router"] and doc["rows"][0]["p50_ratio"] == 1.0
    assert doc["rows"][1]["depth"] > doc["rows"][0]["depth"] and doc["rows"][1]["adapted_blocks"] == 0
    assert latency.markdown(doc).count("\n") == 3 + 2


def test_capture_throughput_reads_routerbench_prompts_as_a_query_table(tmp_path):
    """``--routerbench`` only changes where the queries come from (the capture that follows is the one
    the next test runs): a seeded sample, in file order, one user message each."""
    import pyarrow.parquet as pq

    capture = bench("capture_throughput")
    if not any(ROUTERBENCH.glob("*.csv")):
        pytest.skip(f"no RouterBench CSVs at {ROUTERBENCH} (bench/README.md: ../shared/data/routerbench)")
    path = tmp_path / "queries.parquet"
    assert capture.routerbench_queries(ROUTERBENCH, 5, 0, path) == 5
    table = pq.read_table(path).to_pylist()
    order = [(q.rsplit("-", 1)[0], int(q.rsplit("-", 1)[1])) for q in (r["query_id"] for r in table)]
    assert order == sorted(order)
    assert all(len(r["messages"]) == 1 and r["messages"][0]["role"] == "user" and r["messages"][0]["content"]
               for r in table)
    assert capture.routerbench_queries(ROUTERBENCH, 5, 0, tmp_path / "again.parquet") == 5
    assert pq.read_table(tmp_path / "again.parquet").equals(pq.read_table(path))


@pytest.mark.slow
@pytest.mark.system
def test_capture_throughput_runs_on_three_queries(ray_local, tmp_path):
    capture = bench("capture_throughput")
    out = tmp_path / "capture.json"
    assert capture.main(["--n", "3", "--json", str(out), "layers=[2]", "max_actors=1", "max_tokens=64"]) == 0
    doc = read_checked(capture, out)
    assert doc["n"] == 3 and doc["naive"]["layers"] == [2]
    assert doc["shared"]["tokens"] == doc["off"]["tokens"] == doc["naive"]["tokens"] > 0
    assert "prefix sharing on vs off" in capture.report(doc)


@pytest.mark.slow
@pytest.mark.system
def test_fit_workers_runs_on_a_tiny_capture(ray_local, tmp_path):
    from tests.synthetic import TARGETS, write_synthetic

    fit = bench("fit_workers")
    data = write_synthetic(str(tmp_path), n=120, d=8)
    config = tmp_path / "fit.yaml"
    config.write_text(json.dumps({"activations": data["activations"], "labels": data["labels"], "targets": TARGETS,
                                  "out": str(tmp_path / "router"), "blocks": ["h2_last"], "n_components": 4}))
    out = tmp_path / "fit.json"
    assert fit.main(["--config", str(config), "--seeds", "1", "--workers", "1", "--json", str(out)]) == 0
    doc = read_checked(fit, out)
    assert [r["workers"] for r in doc["rows"]] == [1] and doc["rows"][0]["seconds"] > 0
    assert "1.00x" in fit.table(doc["rows"])


@pytest.mark.slow
@pytest.mark.system
def test_serve_load_runs_two_requests(ray_local, tmp_path):
    serve_load = bench("serve_load")
    out = tmp_path / "serve.json"
    assert serve_load.main(["--n", "2", "--concurrency", "1", "--max-tokens", "2", "--targets", "smollm2-135m",
                            "--json", str(out)]) == 0
    doc = read_checked(serve_load, out)
    assert [r["requests"] for r in doc["load"]] == [2] and doc["load"][0]["targets"] == {"smollm2-135m": 2}
    assert "**" in serve_load.table(doc)
