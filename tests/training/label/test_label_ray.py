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

from tests.procs import kill_while_a_shard_is_held
from tests.s3_gate import SHARD
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


def test_resume_after_kill(ray_cluster, moto_s3, queries, label_registry):
    """The job is killed while its second shard's upload is held (one shard finished): the rerun skips
    that shard, never rewrites it, and ends with exactly one row per (query, target)."""
    import boto3

    from tests.s3_gate import GatedS3

    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="killed")
    out = "s3://killed/labels"
    tdir = storage.join(out, "smollm2-135m")
    args = [f"queries={queries}", f"out={out}", f"registry={label_registry}", "targets=[smollm2-135m]", "shard_size=2",
            "batch_size=2", "progress=false", "scoring.max_new_tokens=8", f"ray_address={ray_cluster}"]
    with GatedS3(allow=1) as gated:
        before = kill_while_a_shard_is_held(["training.label.run", "run", *args], gated)
        assert finished_shards(tdir) == {int(SHARD.search(before[0]).group(1))}, before
        gated.gate.set_mode("pass")
        gated.gate.writes.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL_S3", gated.url)
            summary = run_label(cfg_for(queries, out, label_registry, "shard_size=2", "batch_size=2"))
        rewritten = set(gated.gate.writes) & {before[0]}
    assert summary["targets"]["smollm2-135m"]["ok"] == 12 and not rewritten
    assert len(finished_shards(tdir)) == 6
    ids = read_target(tdir).column("query_id").to_pylist()
    assert len(ids) == 12 and len(set(ids)) == 12  # exactly one row per (query, target)
