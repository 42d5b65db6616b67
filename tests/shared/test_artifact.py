"""Router artifact: save/load round trip, integrity and refusal checks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.artifact import (
    SCHEMA_VERSION,
    ArtifactError,
    ArtifactMeta,
    EncoderInfo,
    OperatingPoint,
    PolicyDefaults,
    TargetInfo,
    load_artifact,
    read_meta,
    save_artifact,
    update_policy,
)
from shared.policy import Policy
from shared.routing import route_by_value, route_with_tolerance
from shared.trunk import Ensemble, FeatureTransform, SharedTrunkNet
from tests.procs import ROOT as REPO



def make_parts(seed=0):
    rng = np.random.default_rng(seed)
    train = {"h4_last": rng.normal(size=(40, 16)), "h8_mean": rng.normal(size=(40, 12))}
    transform = FeatureTransform.fit(train, n_components=6)
    torch.manual_seed(seed)
    ensemble = Ensemble([SharedTrunkNet(transform.d_out, 3, hidden=[16, 8]) for _ in range(3)])
    meta = ArtifactMeta(
        encoder=EncoderInfo(name="smollm2-135m", sha256="ab" * 32, revision="v1", chat_template="plain"),
        layers=[4, 8],
        pooling={"h4_last": "last", "h8_mean": "mean"},
        targets=[
            TargetInfo(name="big", price_in=3.0, price_out=15.0, median_output_tokens=200),
            TargetInfo(name="mid", price_in=1.0, price_out=4.0, median_output_tokens=150),
            TargetInfo(name="small", price_in=0.1, price_out=0.4, median_output_tokens=120),
        ],
        training_metrics={"val_auc_mean": 0.81},
        policy=PolicyDefaults(tolerance=0.15),
    )
    query = {"h4_last": rng.normal(size=(7, 16)), "h8_mean": rng.normal(size=(7, 12))}
    return meta, transform, ensemble, query


@pytest.fixture
def saved(tmp_path):
    meta, transform, ensemble, query = make_parts()
    uri = str(tmp_path / "router-v1")
    written = save_artifact(uri, meta, transform, ensemble)
    return uri, written, transform, ensemble, query


def test_round_trip_gives_identical_predictions_and_routes(saved):
    uri, written, transform, ensemble, query = saved
    assert sorted(p.name for p in Path(uri).iterdir()) == ["meta.json", "transform.safetensors", "weights.safetensors"]
    router = load_artifact(uri, expected_encoder="smollm2-135m")
    expected = ensemble.predict_proba(transform.transform(query))
    P = router.predict_proba(query)
    assert P.shape == (7, 3)
    np.testing.assert_array_equal(P, expected)
    assert router.target_names == ["big", "mid", "small"]
    assert router.meta == written and router.meta.trunk.n_members == 3
    assert router.meta.transform.blocks[1].model_dump() == {"name": "h8_mean", "d_in": 12, "d_out": 6}
    # cost of target "mid" for 1000 input tokens: (1000 * 1.0 + 150 * 4.0) / 1e6 = 0.0016
    assert router.costs([1000])[0, 1] == pytest.approx(0.0016)
    tokens = np.full(7, 1000.0)
    np.testing.assert_array_equal(router.route(P, tokens), route_with_tolerance(P, router.costs(tokens), 0.15))


def test_loaded_router_needs_no_sklearn_ray_or_training(saved):
    uri = saved[0]
    code = (
        "import sys, numpy as np\n"
        "from shared.artifact import load_artifact\n"
        f"r = load_artifact({uri!r})\n"
        "f = {b.name: np.zeros((2, b.d_in)) for b in r.meta.transform.blocks}\n"
        "r.route(r.predict_proba(f), 100)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sklearn', 'ray', 'training')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def _edit_meta(uri, **changes):
    path = Path(uri) / "meta.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_a_plain_artifact_is_written_as_schema_2_so_older_servers_still_read_it(saved):
    assert read_meta(saved[0]).schema_version == 2  # 3 (an adapter) and 4 (attn blocks) only when used


def test_unknown_schema_version_is_refused(saved):
    uri = saved[0]
    _edit_meta(uri, schema_version=SCHEMA_VERSION + 1)
    message = rf"schema_version={SCHEMA_VERSION + 1}.*reads only schema_version=1 or 2 or 3 or {SCHEMA_VERSION}"
    with pytest.raises(ArtifactError, match=message):
        load_artifact(uri)


def test_value_operating_point_routes_and_schema_1_still_loads(saved):
    uri, _, _, _, query = saved
    _edit_meta(uri, schema_version=1)  # written before the value policy: tolerance only, still valid
    router = load_artifact(uri)
    assert router.meta.policy.rule() == Policy.of("tolerance", 0.15)
    point = OperatingPoint(policy="value", value=0.02, target_accuracy=0.9, val_accuracy=0.91, val_cost=0.001)
    meta = update_policy(uri, router.meta.policy.model_copy(update={"operating_point": point}))
    assert meta.schema_version == 2 and meta.policy.rule() == Policy.of("value", 0.02)  # the policy's schema
    router = load_artifact(uri)
    P, tokens = router.predict_proba(query), np.full(7, 1000.0)
    np.testing.assert_array_equal(router.route(P, tokens), route_by_value(P, router.costs(tokens), 0.02))
    np.testing.assert_array_equal(router.route(P, tokens, Policy.of("tolerance", 1.0)), np.full(7, 2))  # cheapest
    with pytest.raises(ValueError, match="needs its parameter 'value'"):
        OperatingPoint(policy="value", tolerance=0.1)


def test_encoder_mismatch_is_refused(saved):
    uri = saved[0]
    with pytest.raises(ArtifactError, match="encoder name='smollm2-135m'.*name='gemma3-270m'"):
        load_artifact(uri, expected_encoder="gemma3-270m")
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(uri, expected_encoder=EncoderInfo(name="smollm2-135m", sha256="cd" * 32))
    # unset fields on the server side are not compared
    load_artifact(uri, expected_encoder={"name": "smollm2-135m", "revision": None})


def test_corrupt_or_missing_files_are_refused(saved, tmp_path):
    uri = saved[0]
    weights = Path(uri) / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(uri)
    with pytest.raises(ArtifactError, match="cannot read meta.json"):
        load_artifact(str(tmp_path / "nowhere"))


def test_feature_mismatch_and_inconsistent_save_are_refused(saved, tmp_path):
    uri = saved[0]
    router = load_artifact(uri)
    with pytest.raises(ArtifactError, match="missing"):
        router.predict_proba({"h4_last": np.zeros((1, 16))})
    meta, transform, ensemble, _ = make_parts()
    two_targets = Ensemble([SharedTrunkNet(transform.d_out, 2, hidden=[4], dropout=[0.0])])
    with pytest.raises(ArtifactError, match="3 targets"):
        save_artifact(str(tmp_path / "bad"), meta, transform, two_targets)


def test_s3_round_trip_with_loopback_moto(monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "test",
                           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="routers")
        meta, transform, ensemble, query = make_parts(seed=1)
        save_artifact("s3://routers/r/v1", meta, transform, ensemble)
        router = load_artifact("s3://routers/r/v1", expected_encoder="smollm2-135m")
        np.testing.assert_array_equal(router.predict_proba(query), ensemble.predict_proba(transform.transform(query)))
    finally:
        server.stop()
