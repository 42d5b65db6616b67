"""Activation capture on a real local Ray cluster: local and S3 (moto) output, resume after a kill."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared import storage
from shared.config import load_config
from training.capture.run import CaptureConfig, read_features, run_capture
from training.data.build import DataConfig, run_build
from training.shards import ManifestMismatch, finished_shards, shard_path

from tests.procs import kill_while_a_shard_is_held
from tests.s3_gate import SHARD
from tests.procs import ROOT

pytestmark = pytest.mark.slow
# Where the layer does not matter: the encoder stops at the deepest layer asked for (6 of 30).
SHALLOW, SHALLOW_COLUMNS = ["layers=[0, 6]"], ("h0_last", "h6_mean")


@pytest.fixture(scope="module")
def queries(tmp_path_factory) -> Path:
    """16 real queries: 12 MMLU + 4 syllogisms (the quick config, smaller)."""
    out = tmp_path_factory.mktemp("q") / "queries.parquet"
    cfg = load_config(DataConfig, ROOT / "configs" / "data-quick.yaml",
                      [f"output={out}", "mmlu.n=12", "reasoning_gym=[{task: syllogism, n: 4}]"])
    run_build(cfg)
    assert pq.read_table(out).num_rows == 16
    return out


def capture_cfg(queries, out, *extra) -> CaptureConfig:
    base = [f"queries={queries}", f"out={out}", "layers=[0, 6, 30]", "poolings=[last, mean]", "shard_size=6",
            "bucket_window=4", "batch_size=4", "progress=false"]
    return load_config(CaptureConfig, None, base + list(extra))


def check_output(out: str, queries: Path, dtype=np.float16, columns=("h0_last", "h6_mean", "h30_last")) -> pa.Table:
    """Plain pyarrow reads fixed-shape tensors; exactly one row per query, in query-table order."""
    expected = pq.read_table(queries)
    fs, path = storage.filesystem(out)
    tables = []
    for shard in sorted(finished_shards(out)):
        table = pq.read_table(shard_path(out, shard).removeprefix("s3://"), filesystem=fs)
        for col in columns:
            assert isinstance(table.column(col).type, pa.FixedShapeTensorType)
            assert table.column(col).type.shape == [576]
            assert table.column(col).chunk(0).to_numpy_ndarray().dtype == dtype
        tables.append(table)
    table = pa.concat_tables(tables)
    assert table.column("query_id").to_pylist() == expected.column("query_id").to_pylist()
    assert table.column("split").to_pylist() == expected.column("split").to_pylist()
    assert min(table.column("n_tokens").to_pylist()) > 10
    return table


def test_local_capture_matches_encoder_and_rerun_skips(ray_cluster, queries, tmp_path, smollm):
    from shared.encoder import Encoder

    out = str(tmp_path / "act")
    summary = run_capture(capture_cfg(queries, out))
    assert summary["captured_rows"] == 16 and summary["shards_written"] == 3 and summary["shards_skipped"] == 0
    table = check_output(out, queries)

    # The vectors are the encoder's, row for row (float16 storage).
    rows = pq.read_table(queries).slice(0, 5).column("messages").to_pylist()
    direct = Encoder(smollm, [0, 6, 30], ("last", "mean")).encode(rows).features
    ids, h6 = read_features(out, "h6_mean")
    assert ids[:5] == table.column("query_id").to_pylist()[:5]
    np.testing.assert_allclose(h6[:5].astype(np.float32), direct["h6_mean"], rtol=2e-3, atol=2e-3)

    manifest = storage.read_json(f"{out}/manifest.json")
    ident = manifest["identity"]
    assert ident["layers"] == [0, 6, 30] and ident["embedding_layer_index"] == 0 and ident["hidden_size"] == 576
    assert ident["encoder"]["sha256"] and ident["query_table_hash"] and manifest["chat_template"]

    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(out).glob("shard-*.parquet")}
    again = run_capture(capture_cfg(queries, out))
    assert again["captured_rows"] == 0 and again["shards_skipped"] == 3
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in Path(out).glob("shard-*.parquet")}
    with pytest.raises(ManifestMismatch, match="layers"):
        run_capture(capture_cfg(queries, out, "layers=[1]"))


def test_s3_capture_with_moto(ray_cluster, queries, moto_s3):
    import boto3

    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="acts")
    storage.write_bytes("s3://acts/in/queries.parquet", queries.read_bytes())
    out = "s3://acts/runs/smollm"
    # memory_gb: each actor reserves RAM in Ray (a real reservation the local cluster must grant)
    summary = run_capture(capture_cfg("s3://acts/in/queries.parquet", out, "dtype=float32", "memory_gb=0.5", *SHALLOW))
    assert summary["captured_rows"] == 16 and finished_shards(out) == {0, 1, 2}
    check_output(out, queries, dtype=np.float32, columns=SHALLOW_COLUMNS)
    assert storage.read_json(f"{out}/manifest.json")["identity"]["dtype"] == "float32"
    with pytest.raises(ValueError, match="cannot write capture output"):
        run_capture(capture_cfg(queries, "s3://no-such-bucket/x"))


def test_actor_resources():
    from training.capture.run import actor_resources

    cfg = capture_cfg("q.parquet", "out", "num_cpus=2")
    assert actor_resources(cfg, use_gpu=False) == {"num_cpus": 2.0}
    assert actor_resources(cfg, use_gpu=True) == {"num_gpus": 1.0}
    assert actor_resources(capture_cfg("q", "o", "memory_gb=1.5"), use_gpu=False) == {"num_cpus": 1.0,
                                                                                       "memory": 1.5 * 2**30}


def test_high_memory_warning_said_once_then_off_unless_memory_is_reserved(caplog):
    from ray.data.context import DataContext

    from training.capture.run import quiet_memory_detector

    ctx = DataContext()
    detector = ctx.issue_detectors_config.high_memory_detector_config
    interval = detector.detection_time_interval_s
    quiet_memory_detector(ctx, capture_cfg("q", "o", "memory_gb=1.5"))
    assert detector.detection_time_interval_s == interval and not caplog.records
    with caplog.at_level("INFO", logger="training.capture.run"):
        quiet_memory_detector(ctx, capture_cfg("q", "o"))
    assert detector.detection_time_interval_s == -1
    assert [r.message for r in caplog.records if "capture.memory_gb is unset" in r.message]


def test_resume_after_kill(ray_cluster, moto_s3, queries):
    """The job is killed while its second shard's upload is held (one shard finished): the rerun skips
    that shard, writes every other one, never rewrites the finished one, and loses no query."""
    import boto3

    from tests.s3_gate import GatedS3

    boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket="killed")
    out = "s3://killed/capture"
    args = [f"queries={queries}", f"out={out}", *SHALLOW, "shard_size=2", "bucket_window=2",
            "batch_size=2", "max_actors=1", "progress=false", f"ray_address={ray_cluster}"]
    with GatedS3(allow=1) as gated:
        before = kill_while_a_shard_is_held(["training.capture.run", *args], gated)
        assert finished_shards(out) == {int(SHARD.search(before[0]).group(1))}, before
        gated.gate.set_mode("pass")
        gated.gate.writes.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("AWS_ENDPOINT_URL_S3", gated.url)
            summary = run_capture(capture_cfg(queries, out, "shard_size=2", *SHALLOW))
        rewritten = set(gated.gate.writes) & {before[0]}
    assert summary["shards_skipped"] == 1 and summary["captured_rows"] == 14 and not rewritten
    table = check_output(out, queries, columns=SHALLOW_COLUMNS)
    assert table.num_rows == 16 and len(set(table.column("query_id").to_pylist())) == 16


def test_reuse_copies_the_prompts_an_earlier_capture_holds_and_encodes_only_the_new(ray_cluster, queries, tmp_path,
                                                                                      caplog):
    """A second query table: 8 prompts of the first (another order, other ids) and 4 new ones. With the first
    capture in ``reuse`` only the 4 are encoded and the 8 are its vectors exactly; a source made another way
    (float32) is skipped with a warning naming why."""
    first = str(tmp_path / "first")
    run_capture(capture_cfg(queries, first, *SHALLOW))
    table = pq.read_table(queries)
    old = table.slice(0, 8)
    new = table.slice(8, 4).to_pylist()
    for row in new:
        row["messages"] = [{**m, "content": m["content"] + " Answer briefly."} for m in row["messages"]]
    rows = [*reversed(old.to_pylist()), *new]
    for i, row in enumerate(rows):
        row["query_id"] = f"second-{i}"
    second_q = tmp_path / "second.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), second_q)
    second = str(tmp_path / "second")
    summary = run_capture(capture_cfg(second_q, second, *SHALLOW, f"reuse=[{first}]"))
    assert (summary["reused_rows"], summary["captured_rows"]) == (8, 4)
    ids1, h1 = read_features(first, "h6_mean")
    ids2, h2 = read_features(second, "h6_mean")
    by_id = dict(zip(ids1, h1))
    for i, row in enumerate(reversed(old.to_pylist())):
        np.testing.assert_array_equal(h2[ids2.index(f"second-{i}")], by_id[row["query_id"]])
    assert ids2 == [f"second-{i}" for i in range(12)]

    other = str(tmp_path / "third")
    with caplog.at_level("WARNING", logger="training.capture.reuse"):
        again = run_capture(capture_cfg(second_q, other, *SHALLOW, "dtype=float32", f"reuse=[{first}]"))
    assert again["reused_rows"] == 0 and again["captured_rows"] == 12
    assert any("another dtype" in r.message for r in caplog.records)
