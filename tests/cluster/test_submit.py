"""``prefill-router submit`` and the pipeline it runs.

Fast: a bad job spec fails before anything is submitted; the publish rule; the config wiring.
End to end: a real local Ray head (``cluster.local``), the small pipeline submitted as a Ray
job and published to a local directory, then the same work_dir submitted again (every stage
skipped or resumed) and published to a loopback moto S3 server. The submitted pipeline imports
its 40 queries with both targets' labels (``data_import``, long format: logged traffic and
judgements), so no target generates in the job: Ray Data labelling itself, local and resumed
after a kill, is tested in tests/training/label; here the job's stages are import, capture
(Ray Data actors in the job's runtime env), probe, tune, fit (Ray Train), evaluate, publish.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from cluster.cli import main
from tests.procs import free_port
from tests.procs import ROOT
from tests.traffic import logged_traffic

SMALL = str(ROOT / "configs" / "pipeline-small.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.system]


def flat(text: str) -> str:
    return " ".join(text.split())


# --------------------------------------------------------------------------- fail fast, submit nothing
@pytest.fixture
def no_connection(monkeypatch):
    """Fail the test if the submit command so much as connects to a cluster."""
    import cluster.jobs

    def refuse(*args, **kwargs):
        raise AssertionError("a job was about to be submitted for an invalid spec")

    monkeypatch.setattr(cluster.jobs, "connect", refuse)


@pytest.mark.parametrize("overrides,expected", [
    (["data=null", "queries=/nonexistent/dir/queries.parquet"], "queries: no query table at /nonexistent/dir"),
    (["targets=[smollm2-135m, no-such-model]"], "targets: unknown model 'no-such-model'"),
    (["capture.encoder=no-such-encoder"], "capture.encoder: unknown model 'no-such-encoder'"),
    (["label.no_such_key=1"], "no_such_key"),
    (["label.out=/elsewhere"], "label.out: set by the pipeline"),
    (["data=null", "data_import={format: long, inputs: [../elsewhere/t.parquet]}"],
     "data_import.inputs ../elsewhere/t.parquet points outside the repository; use an absolute path"),
])
def test_bad_spec_exits_2_and_submits_nothing(overrides, expected, no_connection, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["submit", "run", SMALL, *overrides, "--address", dead]) == 2
    err = flat(capsys.readouterr().err)
    assert expected in err
    assert "jobs API" not in err and "connect" not in err.lower()


def test_valid_spec_without_a_cluster_says_so(capsys):
    dead = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", "run", SMALL, "work_dir=/tmp/x", "--address", dead]) == 2
    assert "cannot reach the Ray jobs API" in flat(capsys.readouterr().err)


def test_paths_the_upload_leaves_out_are_refused():
    from cluster.jobs import SubmitError, upload_path

    assert upload_path("configs/pipeline-small.yaml", "config") == "configs/pipeline-small.yaml"
    assert upload_path(SMALL, "config") == "configs/pipeline-small.yaml"
    assert upload_path("s3://bucket/q.parquet", "queries") is None
    assert upload_path("/somewhere/else/q.parquet", "queries") is None  # absolute: for a cluster on this machine
    for excluded in ("runs/queries.parquet", "data/big/queries.parquet", ".venv/x.yaml"):
        with pytest.raises(SubmitError, match="not uploaded"):
            upload_path(excluded, "queries")


def test_runtime_env_and_entrypoint(monkeypatch):
    from cluster import jobs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.setenv("HF_TOKEN", "hf-secret")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    env = jobs.runtime_env(["tqdm"], ["EXTRA=1"])
    assert "AWS_SECRET_ACCESS_KEY" not in env["env_vars"] and "HF_TOKEN" not in env["env_vars"]
    assert jobs.runtime_env([], [], pass_secrets=True)["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "secret"
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"] and env["pip"] == ["tqdm"]
    assert env["env_vars"]["AWS_ACCESS_KEY_ID"] == "key" and env["env_vars"]["EXTRA"] == "1"
    assert "RAY_ADDRESS" not in env["env_vars"]
    assert jobs.entrypoint("python", "configs/p.yaml", ["publish.uri=s3://b/{run_id}"]) == \
        "python -m cluster.cli pipeline run --config configs/p.yaml 'publish.uri=s3://b/{run_id}'"
    assert jobs.default_python("http://127.0.0.1:8265") == jobs.sys.executable
    assert jobs.default_python("http://ray-head.prod:8265") == "python"


# --------------------------------------------------------------------------- pure pieces
@pytest.mark.parametrize("new,current,margin,publish", [
    (0.50, None, 0.0, True),           # nothing published yet
    (0.50, 0.50, 0.0, True),           # equal is not worse
    (0.46, 0.50, 0.05, True),          # worse, within the margin
    (0.44, 0.50, 0.05, False),         # worse by more than the margin
    (math.nan, 0.50, 0.05, False),     # undefined new metric never replaces a defined one
    (0.10, math.nan, 0.0, True),       # the published one is undefined on this data
])
def test_publish_decision(new, current, margin, publish):
    from cluster.pipeline.publish import publish_decision

    ok, reason = publish_decision(new, current, margin)
    assert ok is publish and reason


def test_pipeline_config_wires_paths_under_work_dir():
    from shared.config import load_config
    from cluster.pipeline.config import PipelineConfig

    cfg = load_config(PipelineConfig, SMALL, ["work_dir=/w", "fit.train.seeds=3"])
    assert cfg.data.output == cfg.label.queries == cfg.capture.queries == cfg.evaluate.queries == "/w/queries.parquet"
    assert cfg.label.out == cfg.probe.labels == cfg.fit.labels == cfg.evaluate.labels == "/w/labels"
    assert cfg.capture.out == cfg.probe.activations == cfg.fit.activations == "/w/activations"
    assert cfg.fit.out == cfg.evaluate.artifact == "/w/router"
    assert cfg.label.targets == cfg.probe.targets == cfg.fit.targets == ["smollm2-135m", "gemma3-270m"]
    assert cfg.fit.train.storage_path == "/w/ray-train" and cfg.fit.train.seeds == 3
    assert cfg.tune.probe_report == "/w/probe/probe.json" and cfg.tune.out == "/w/tune"
    assert cfg.fit.tune_report == "/w/tune/tune.json" and cfg.tune.queries == "/w/queries.parquet"
    assert PipelineConfig.model_validate(cfg.model_dump()) == cfg  # wired values round-trip
    no_tune = load_config(PipelineConfig, SMALL, ["work_dir=/w", "tune=null"])
    assert no_tune.tune is None and no_tune.fit.tune_report is None


def test_pipeline_refuses_fixed_blocks_beside_a_tune_stage():
    from shared.config import load_config
    from cluster.pipeline.config import PipelineConfig

    with pytest.raises(ValueError, match="fit.blocks is set"):
        load_config(PipelineConfig, SMALL, ["fit.blocks=[h8_last]"])


# --------------------------------------------------------------------------- end to end on a local head
@pytest.fixture(scope="module")
def head(tmp_path_factory, moto_s3):
    from cluster.local import LocalClusterConfig, start_head, stop_head

    state_file = tmp_path_factory.mktemp("cluster") / "local.json"
    cfg = LocalClusterConfig(state_file=str(state_file), port=0, dashboard_port=0, num_cpus=3,
                             start_timeout_s=300)
    try:
        start_head(cfg)
        yield cfg
    finally:
        if state_file.exists():
            stop_head(cfg)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline") / "work"


@pytest.fixture(scope="module")
def imported(work) -> list[str]:
    """Overrides: import the logged traffic instead of building and labelling a query table."""
    table = logged_traffic(work.parent / "traffic.parquet")
    return ["data=null", f"data_import={{format: long, inputs: [{table}]}}"]


@pytest.fixture(scope="module")
def submitted(head, work, imported) -> dict:
    """The first submission (to a fresh work_dir, published locally), run once for the module by
    whichever test needs it first; what it printed and wrote is kept as it was then, so each test
    reads the same thing in any order, alone (``-k``) or after the others."""
    published = work.parent / "published"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["submit", "run", SMALL, f"work_dir={work}", f"publish.uri={published}", *imported,
                     "--state-file", head.state_file])
    read = lambda p: json.loads(p.read_text()) if p.is_file() else None  # noqa: E731
    return {"code": code, "out": out.getvalue(), "published": published, "work": work,
            "summary": read(work / "pipeline-summary.json"), "tuned": read(work / "tune" / "tune.json")}


def first_run_ok(submitted: dict) -> None:
    """Fail (never skip) a test whose setup, the first submission, failed."""
    assert submitted["code"] == 0, submitted["out"][-3000:]


@pytest.mark.timeout(1800)
def test_submit_runs_the_pipeline_and_publishes_locally(submitted):
    from shared.artifact import load_artifact

    first_run_ok(submitted)
    published, out = submitted["published"], submitted["out"]
    assert "pipeline 8/8: publish" in out and "SUCCEEDED" in out
    assert (published / "meta.json").is_file()
    router = load_artifact(str(published))
    assert router.target_names == ["smollm2-135m", "gemma3-270m"]
    tuned = submitted["tuned"]["best"]  # fit took tune's choice
    assert sorted(router.meta.pooling) == sorted(tuned["blocks"])
    assert router.meta.training_metrics["features"] == {"n_components": tuned["n_components"], "chosen_by": "tune"}
    record = json.loads((published / "publish.json").read_text())
    assert record["baseline"] is None and record["artifact"] == str(published)
    summary = submitted["summary"]
    assert summary["stages"]["data"]["rows"] == 40 and summary["stages"]["publish"]["published"]
    assert summary["stages"]["label"]["reused"] == str(submitted["work"] / "labels")  # imported: nothing generated


@pytest.mark.timeout(900)
def test_resubmit_resumes_and_publishes_to_s3(head, work, imported, moto_s3, submitted, capsys):
    import boto3

    first_run_ok(submitted)
    s3 = boto3.client("s3", endpoint_url=moto_s3["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="routers")
    job = ["--state-file", head.state_file]
    code = main(["submit", "run", SMALL, f"work_dir={work}", "publish.uri=s3://routers/small/{run_id}", *imported,
                 "publish.pointer=s3://routers/current.json", "--submission-id", "pr-test-s3", *job])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert main(["submit", "status", "pr-test-s3", *job]) == 0 and "SUCCEEDED" in capsys.readouterr().out
    assert main(["submit", "logs", "pr-test-s3", *job]) == 0 and "pipeline 8/8: publish" in capsys.readouterr().out
    assert main(["submit", "stop", "pr-test-s3", *job]) == 0 and "not running" in capsys.readouterr().out
    assert main(["submit", "status", "no-such-job", *job]) == 2 and "does not exist" in flat(capsys.readouterr().err)
    stages = json.loads((work / "pipeline-summary.json").read_text())["stages"]
    assert all(stages[s].get("skipped") for s in ("data", "probe", "tune", "fit", "evaluate")), stages
    assert stages["label"]["queries"] == 40 and stages["capture"]["shards_written"] == 0
    pointer = json.loads(s3.get_object(Bucket="routers", Key="current.json")["Body"].read())
    key = pointer["artifact"].removeprefix("s3://routers/")
    assert pointer["artifact"].startswith("s3://routers/small/") and "{run_id}" not in key
    for name in ("meta.json", "weights.safetensors", "transform.safetensors", "publish.json"):
        s3.head_object(Bucket="routers", Key=f"{key}/{name}")


def test_publish_compares_with_the_published_artifact(work, imported, submitted, tmp_path):
    """In process, on the work_dir above: the published artifact is re-scored on the same test split."""
    from shared.config import load_config
    from cluster.pipeline.config import PipelineConfig
    from cluster.pipeline.publish import PublishConfig, publish

    first_run_ok(submitted)
    published = submitted["published"]
    cfg = load_config(PipelineConfig, SMALL, [f"work_dir={work}", *imported])
    new = json.loads((work / "stages" / "evaluate.json").read_text())["result"]["metrics"]
    pub = PublishConfig(uri=str(tmp_path / "next"), baseline=str(published), metric="accuracy")
    same = publish(pub, cfg.fit.out, new, cfg.evaluate, str(tmp_path))
    assert same["published"] and same["current"] == pytest.approx(new["accuracy"])  # same artifact, same data
    worse = publish(pub, cfg.fit.out, {**new, "accuracy": new["accuracy"] - 0.5}, cfg.evaluate, str(tmp_path))
    assert not worse["published"] and "worse than published" in worse["reason"]


@pytest.mark.parametrize("published,code_setting,expected", [(True, 3, 0), (False, 3, 3), (False, 0, 0)])
def test_pipeline_run_exit_status_says_whether_it_published(monkeypatch, tmp_path, published, code_setting,
                                                            expected, capsys):
    """A refused publish fails the run (and so the Ray job) unless publish.refused_exit_code=0."""
    import cluster.pipeline.run as pipeline

    def fake_run(cfg):  # the stages themselves are covered end to end above
        pub = {"published": published, "reason": "worse than published", "artifact": "x"}
        return {"seconds": 1.0, "stages": {"publish": pub}, "config": cfg.model_dump(mode="json")}

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    code = main(["pipeline", "run", "--config", SMALL, f"work_dir={tmp_path}", f"publish.uri={tmp_path}/pub",
                 f"publish.refused_exit_code={code_setting}"])
    assert code == expected
    assert ("publish refused" in capsys.readouterr().err) is (expected != 0)
