"""Labelling on a real local Ray cluster with the real SmolLM2: output, a down endpoint, resume after a kill."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from shared import storage
from shared.config import load_config
from training.data.build import DataConfig, run_build
from training.label.run import LabelConfig, run_label
from training.labels import load_labels, read_target
from training.shards import finished_shards

from tests.procs import kill_after_first_shard
from tests.procs import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """12 real queries: 8 MMLU (option log-likelihood) + 4 one-digit sums (generation + task scorer)."""
    out = tmp_path_factory.mktemp("q") / "queries.parquet"
    cfg = load_config(DataConfig, ROOT / "configs" / "data-quick.yaml", [
        f"output={out}", "mmlu.n=8",
        "reasoning_gym=[{task: basic_arithmetic, n: 4, config: {min_terms: 2, max_terms: 2, "
        "min_digits: 1, max_digits: 1}}]"])
    run_build(cfg)
    return out


@pytest.fixture(scope="module")
def label_registry(tmp_path_factory) -> Path:
    """The shipped SmolLM2 entry plus an openai target whose endpoint is down (nothing listens on port 9)."""
    models = yaml.safe_load((ROOT / "configs" / "models.yaml").read_text())["models"]
    smol = next(m for m in models if m["name"] == "smollm2-135m")
    down = {"name": "down-endpoint", "role": "target", "backend": "openai", "source": "openai",
            "base_url": "http://127.0.0.1:9/v1", "price_input_per_m": 1.0, "price_output_per_m": 2.0,
            "context_limit": 4096}
    path = tmp_path_factory.mktemp("reg") / "models.yaml"
    path.write_text(yaml.safe_dump({"models": [smol, down]}))
    return path


def cfg_for(queries, out, label_registry, *extra) -> LabelConfig:
    base = [f"queries={queries}", f"out={out}", f"registry={label_registry}", "targets=[smollm2-135m]",
            "shard_size=4", "batch_size=4", "progress=false", "scoring.max_new_tokens=8"]
    return load_config(LabelConfig, None, base + list(extra))


def test_label_smollm_then_rerun_skips(ray_cluster, queries, label_registry, tmp_path):
    out = tmp_path / "labels"
    summary = run_label(cfg_for(queries, out, label_registry))
    stats = summary["targets"]["smollm2-135m"]
    assert stats["ok"] == 12 and stats["failed"] == 0 and stats["missing"] == 0
    table = load_labels(str(out))["smollm2-135m"]
    assert sorted(table.column("query_id").to_pylist()) == sorted(pq.read_table(queries).column("query_id").to_pylist())
    rows = table.to_pylist()
    assert all(0.0 <= r["correct"] <= 1.0 for r in rows)  # reasoning-gym may give partial credit
    mc = [r for r in rows if r["output_tokens"] == 1]
    assert len(mc) == 8 and all(r["answer"] in "ABCD" and r["correct"] in (0.0, 1.0) for r in mc)
    assert all(r["input_tokens"] > 10 and r["cost"] > 0 and r["latency_s"] > 0 for r in rows)
    manifest = storage.read_json(str(out / "smollm2-135m" / "manifest.json"))
    assert manifest["identity"]["queries_hash"] == summary["queries_hash"]
    assert manifest["identity"]["target"] and "reasoning-gym" in manifest["identity"]["scorers"]

    mtimes = {p: p.stat().st_mtime_ns for p in (out / "smollm2-135m").glob("shard-*.parquet")}
    assert len(mtimes) == 3
    again = run_label(cfg_for(queries, out, label_registry))
    assert again["targets"]["smollm2-135m"]["ok"] == 12
    assert mtimes == {p: p.stat().st_mtime_ns for p in (out / "smollm2-135m").glob("shard-*.parquet")}


def test_down_endpoint_rows_are_failed_not_wrong(ray_cluster, queries, label_registry, tmp_path):
    out = tmp_path / "labels"
    cfg = cfg_for(queries, out, label_registry, "targets=[down-endpoint]", "openai.max_retries=1",
                  "openai.backoff_s=0.01", "openai.timeout_s=2")
    summary = run_label(cfg)
    stats = summary["targets"]["down-endpoint"]
    assert stats["ok"] == 0 and stats["failed"] == 12
    assert finished_shards(str(out / "down-endpoint")) == set()  # nothing counts as done
    failed = read_target(str(out / "down-endpoint")).to_pylist()
    assert len(failed) == 12 and all(r["status"] == "failed" and r["correct"] is None for r in failed)
    assert all("127.0.0.1:9" in r["error"] for r in failed)
    assert load_labels(str(out), ["down-endpoint"])["down-endpoint"].num_rows == 0


def test_resume_after_kill(ray_cluster, queries, label_registry, tmp_path):
    out = tmp_path / "labels"
    tdir = out / "smollm2-135m"
    args = [f"queries={queries}", f"out={out}", f"registry={label_registry}", "targets=[smollm2-135m]", "shard_size=2",
            "batch_size=2", "progress=false", "scoring.max_new_tokens=8", f"ray_address={ray_cluster}"]
    before = kill_after_first_shard(["training.label.run", "run", *args], tdir)
    assert 1 <= len(before) < 6, f"kill should land mid-run, found {sorted(before)}"

    summary = run_label(cfg_for(queries, out, label_registry, "shard_size=2", "batch_size=2"))
    assert summary["targets"]["smollm2-135m"]["ok"] == 12
    assert all(tdir.joinpath(name).stat().st_mtime_ns == ns for name, ns in before.items())
    ids = read_target(str(tdir)).column("query_id").to_pylist()
    assert len(ids) == 12 and len(set(ids)) == 12  # exactly one row per (query, target)
