"""The KubeRay manifests: every overlay renders and validates against the KubeRay CRDs, the
RayService's serveConfigV2 is exactly what the generator makes from configs/serve-k8s.yaml and
passes Ray's own Serve schema, and the validator does reject broken manifests."""

from __future__ import annotations

import copy
import shutil
import subprocess

import pytest
import yaml

from cluster import k8s
from tests.procs import ROOT

CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
OVERLAYS = ["base", *k8s.overlays()]


@pytest.fixture(scope="module")
def schemas():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}")
    return k8s.load_crd_schemas(CRD_DIR)


def by_kind(resources: list[dict]) -> dict[str, dict]:
    kinds = [r["kind"] for r in resources]
    assert len(kinds) == len(set(kinds)), kinds
    return {r["kind"]: r for r in resources}


def serve_doc(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def test_overlays_exist():
    assert {"dev-cpu", "gpu-prod"} <= set(k8s.overlays())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_resource_validates_against_its_crd(overlay, schemas):
    resources = k8s.render_overlay(overlay)
    assert set(by_kind(resources)) == {"RayCluster", "RayJob", "RayService"}
    for resource in resources:
        assert k8s.validate_resource(resource, schemas) == [], resource["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_v2_passes_rays_schema(overlay):
    from ray.serve.schema import ServeDeploySchema

    from serving.config import IMPORT_PATH, LIVE_FIELDS, IngressConfig, ServeConfig

    doc = serve_doc(by_kind(k8s.render_overlay(overlay))["RayService"])
    ServeDeploySchema.model_validate(doc)
    (app,) = doc["applications"]
    assert app["import_path"] == IMPORT_PATH == "serving.app:build_app"
    ServeConfig.model_validate(app["args"])  # the app's args are a valid serving config
    live = {d["name"]: d["user_config"] for d in app["deployments"]}  # applied in place, no restart
    assert live["Encoder"] == live["RouterHead"] == {"artifact": app["args"]["artifact"]}
    ingress = IngressConfig.model_validate(live.pop("Ingress"))
    assert not LIVE_FIELDS & set(app["args"]) and ingress.max_prompt_tokens == app["args"]["max_prompt_tokens"]
    targets = {name: cfg for name, cfg in live.items() if name.startswith("Target-")}
    assert targets and all(cfg == {"timeout_s": ingress.target_timeout_s} for cfg in targets.values())


def test_committed_rayservice_is_what_the_generator_makes_now():
    from serving.config import ServeConfig, serve_config
    from shared.config import load_config

    cfg = load_config(ServeConfig, ROOT / k8s.SERVE_CONFIG)
    assert cfg.http_host == "0.0.0.0" and cfg.artifact.startswith("s3://")
    generated = k8s.render_rayservice(cfg)
    committed_text = (ROOT / k8s.RAYSERVICE_OUT).read_text()
    committed = yaml.safe_load(committed_text)
    assert committed == generated, "k8s/base/rayservice.yaml is stale: re-run `prefill-router k8s render-rayservice`"
    assert committed_text == k8s.rayservice_yaml(generated, k8s.SERVE_CONFIG)
    doc = serve_doc(committed)
    runtime_env = doc["applications"][0].pop("runtime_env")
    assert runtime_env["working_dir"] == k8s.CODE_URI
    assert doc == serve_config(cfg, cfg.targets)  # serveConfigV2 is serve_config(), nothing hand-kept
    cluster = by_kind(k8s.render_overlay("base"))["RayCluster"]
    assert committed["spec"]["rayClusterConfig"] == k8s.with_readiness_probes(cluster["spec"], cfg)
    assert "rayservice.yaml" in yaml.safe_load((ROOT / "k8s/base/kustomization.yaml").read_text())["resources"]


def test_rayservice_render_needs_targets_for_a_remote_artifact():
    from serving.config import ServeConfig

    with pytest.raises(ValueError, match="targets"):
        k8s.render_rayservice(ServeConfig(artifact="s3://bucket/router"))


def test_render_rayservice_cli_writes_the_committed_file(tmp_path):
    from cluster.cli import main

    out = tmp_path / "rayservice.yaml"
    assert main(["k8s", "render-rayservice", "--serve-config", str(ROOT / k8s.SERVE_CONFIG), "-o", str(out)]) == 0
    assert yaml.safe_load(out.read_text()) == yaml.safe_load((ROOT / k8s.RAYSERVICE_OUT).read_text())


def test_raycluster_has_head_cpu_and_gpu_groups_and_autoscaling():
    cluster = by_kind(k8s.render_overlay("gpu-prod"))["RayCluster"]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == ["cpu", "gpu"]


@pytest.mark.parametrize("kind,groups", [("RayCluster", ("spec",)), ("RayJob", ("spec", "rayClusterSpec")),
                                         ("RayService", ("spec", "rayClusterConfig"))])
def test_gpu_overlay_requests_gpus_and_dev_overlay_none(kind, groups):
    def gpu_limits(overlay):
        spec = by_kind(k8s.render_overlay(overlay))[kind]
        for key in groups:
            spec = spec[key]
        return [c["resources"]["limits"].get("nvidia.com/gpu") for g in spec["workerGroupSpecs"]
                for c in g["template"]["spec"]["containers"]]

    assert 1 in gpu_limits("gpu-prod")
    assert not any(gpu_limits("dev-cpu"))


def test_rayjob_cleans_up_and_reads_s3_credentials_from_a_secret():
    for overlay in OVERLAYS:
        job = by_kind(k8s.render_overlay(overlay))["RayJob"]["spec"]
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
        assert "cluster.cli pipeline run --config configs/pipeline" in job["entrypoint"]
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in head["env"] if "valueFrom" in e}
        assert refs["AWS_ACCESS_KEY_ID"]["name"] == refs["AWS_SECRET_ACCESS_KEY"]["name"] == "prefill-router-s3"
        assert not any("value" in e and e["name"].startswith("AWS_") for e in head["env"])  # never inline
        config = job["entrypoint"].split("--config ")[1].split()[0]
        assert (ROOT / config).is_file(), config


def test_validator_rejects_broken_manifests(schemas):
    good = by_kind(k8s.render_overlay("base"))
    cases = []
    unknown = copy.deepcopy(good["RayCluster"])
    unknown["spec"]["workerGroupSpecs"][0]["replicaz"] = 2
    cases.append((unknown, "replicaz"))
    wrong_type = copy.deepcopy(good["RayJob"])
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    cases.append((wrong_type, "shutdownAfterJobFinishes"))
    not_a_string = copy.deepcopy(good["RayService"])
    not_a_string["spec"]["serveConfigV2"] = serve_doc(good["RayService"])
    cases.append((not_a_string, "serveConfigV2"))
    nameless = copy.deepcopy(good["RayCluster"])
    del nameless["metadata"]["name"]
    cases.append((nameless, "metadata.name"))
    for resource, where in cases:
        errors = k8s.validate_resource(resource, schemas)
        assert errors and any(where in e for e in errors), (where, errors)


def test_validate_cli_passes(schemas):
    from cluster.cli import main

    assert main(["k8s", "validate", "--crds", str(CRD_DIR)]) == 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu-prod"])
def test_renderer_matches_kubectl_kustomize(overlay):
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out), key=key) == sorted(k8s.render_overlay(overlay), key=key)


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "image" and isinstance(v, str)] + \
            [i for v in node.values() for i in _images(v)]
    return [i for v in node for i in _images(v)] if isinstance(node, list) else []


def test_manifests_run_the_projects_image_with_the_projects_pins():
    """Every pod runs an image built by k8s/image/Dockerfile, which installs what .ci/install does."""
    import re
    import tomllib

    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    tags = set(re.findall(r"-t (\S+) \.", dockerfile))
    assert {t.rsplit("-", 1)[1] for t in tags} == {"cpu", "gpu"}
    for name in k8s.overlays():
        images = set(_images(k8s.render_overlay(name)))
        assert images and images <= tags, (name, images - tags)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(d for d in deps if d.startswith("torch=="))
    assert torch_pin in dockerfile
    no_deps = re.search(r"--no-deps (.+)", (ROOT / ".ci" / "install").read_text()).group(1).split()
    assert all(pkg in dockerfile for pkg in no_deps)


def test_rayservice_pods_are_ready_only_when_the_app_answers():
    """Every Ray container of the RayService is probed on /readyz (encoder, head and a target answer),
    not /healthz (the ingress alone), on the Serve port."""
    rayservice = yaml.safe_load((ROOT / k8s.RAYSERVICE_OUT).read_text())
    spec = rayservice["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    port = serve_doc(rayservice)["http_options"]["port"]
    for group in groups:
        probe = group["template"]["spec"]["containers"][0]["readinessProbe"]
        assert probe["httpGet"] == {"path": "/readyz", "port": port}
    plain = by_kind(k8s.render_overlay("base"))["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]
    assert "readinessProbe" not in plain["containers"][0]  # the retraining cluster serves no app


def test_the_learning_loop_schedules_the_from_logs_rayjob(schemas):
    """k8s/loop: the base's retraining RayJob on configs/pipeline-from-logs.yaml, and a CronJob whose
    account may do exactly what its command does (delete and create that RayJob, by that name)."""
    resources = k8s.build(k8s.K8S_DIR / "loop")
    kinds = by_kind(resources)
    assert set(kinds) == {"RayJob", "ServiceAccount", "Role", "RoleBinding", "CronJob"}
    job = kinds["RayJob"]
    assert k8s.validate_resource(job, schemas) == []
    name, entry = job["metadata"]["name"], job["spec"]["entrypoint"]
    config = entry.split("--config ")[1].split()[0]
    assert config == "configs/pipeline-from-logs.yaml" and (ROOT / config).is_file()
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    cron = kinds["CronJob"]["spec"]
    assert len(cron["schedule"].split()) == 5 and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == kinds["ServiceAccount"]["metadata"]["name"]
    assert kinds["RoleBinding"]["roleRef"]["name"] == kinds["Role"]["metadata"]["name"]
    (rule,) = kinds["Role"]["rules"]
    assert rule["resources"] == ["rayjobs"] and {"create", "delete"} <= set(rule["verbs"])
    command = " ".join(pod["containers"][0]["command"])
    assert f"kubectl delete rayjob {name}" in command and "kubectl create -f /manifests/rayjob.yaml" in command
    assert pod["volumes"][0]["configMap"]["name"] == name  # the ConfigMap the kustomization says to create
    assert f"configmap {name}" in (k8s.K8S_DIR / "loop" / "kustomization.yaml").read_text()
