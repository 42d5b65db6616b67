"""Render the kustomize overlays under ``k8s/`` in pure Python (no kustomize binary).

``kubectl apply -k k8s/overlays/<name>`` is how operators apply the manifests; this
module reproduces the *subset* of kustomize those files use, so tests (and machines
without kubectl) can check the rendered result offline:

- ``resources``: YAML files (multi-document) or directories holding a kustomization;
- ``patches``: JSON6902 operations (a YAML list, inline ``patch`` or a ``path`` file),
  selected by ``target`` (``group``/``version``/``kind``/``name``/``namespace``), applied
  with the ``jsonpatch`` package (``test`` ops included, so a patch that no longer fits
  its base fails loudly);
- ``labels``: ``pairs`` added to ``metadata.labels`` (no selectors, no templates);
- ``namespace``: set on every namespaced resource.

Anything else (strategic-merge patches, generators, ``images``, name prefixes, label
selectors...) raises :class:`KustomizeSubsetError` rather than render something that
differs from what kustomize would produce. A test compares this renderer's output with
``kubectl kustomize`` where kubectl is installed.

:func:`load_crd_schemas` and :func:`validate_resource` check a manifest against the
KubeRay CRDs' ``openAPIV3Schema`` with ``jsonschema``, the way the API server does with
strict field validation (``kubectl apply``'s default): an object schema with
``properties`` rejects unknown fields (the KubeRay CRDs use no
``x-kubernetes-preserve-unknown-fields``), ``nullable`` admits null, int-or-string is the
schema's own ``anyOf`` and ``x-kubernetes-list-map-keys`` must be unique. CEL rules
(``x-kubernetes-validations``) and ``format`` ranges are not evaluated.

:func:`render_rayservice` generates ``k8s/base/rayservice.yaml``: its ``serveConfigV2`` is
``serving.config.serve_config`` of ``configs/serve-k8s.yaml`` and its ``rayClusterConfig``
the spec of ``k8s/base/raycluster.yaml``, so neither is a hand-kept copy
(``prefill-router k8s render-rayservice -o k8s/base/rayservice.yaml``; a test checks the
committed file is what the generator writes now).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml

from shared.errors import BadInput, MissingInput, UnknownName

K8S_DIR = Path(__file__).resolve().parent.parent / "k8s"
KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "patches", "labels", "namespace"}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "PriorityClass"}


class KustomizeSubsetError(BadInput):
    """The kustomization uses a feature this renderer does not implement, or a patch failed."""


def read_yaml_docs(path: Path) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: the CRDs are megabytes
    return [doc for doc in yaml.load_all(path.read_text(), Loader=loader) if doc is not None]


def _matches(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = resource.get("apiVersion", "").rpartition("/")
    meta = resource.get("metadata", {})
    wanted = {"group": group, "version": version, "kind": resource.get("kind"), "name": meta.get("name"),
              "namespace": meta.get("namespace")}
    unknown = set(target) - set(wanted)
    if unknown:
        raise KustomizeSubsetError(f"patch target keys {sorted(unknown)} are not supported (only {sorted(wanted)})")
    return all(wanted[key] == value for key, value in target.items())


def _patch_ops(entry: dict[str, Any], root: Path) -> list[dict[str, Any]]:
    if "path" in entry:
        ops = yaml.safe_load((root / entry["path"]).read_text())
    elif "patch" in entry:
        ops = yaml.safe_load(entry["patch"])
    else:
        raise KustomizeSubsetError(f"{root / KUSTOMIZATION}: a patch needs `path` or `patch`: {entry}")
    if not isinstance(ops, list) or not all(isinstance(op, dict) and "op" in op for op in ops):
        raise KustomizeSubsetError(f"{root / KUSTOMIZATION}: only JSON6902 patches (a list of ops) are supported")
    return ops


def apply_json6902(resource: dict[str, Any], ops: list[dict[str, Any]], where: str) -> dict[str, Any]:
    import jsonpatch

    try:
        return jsonpatch.apply_patch(resource, ops)  # returns a patched copy
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise KustomizeSubsetError(f"{where}: patch does not apply: {exc}") from exc


def build(directory: str | Path) -> list[dict[str, Any]]:
    """The resources a kustomization directory renders to, in kustomize's order."""
    root = Path(directory)
    kpath = root / KUSTOMIZATION
    if not kpath.is_file():
        raise MissingInput(f"no {KUSTOMIZATION} in {root}")
    spec = yaml.safe_load(kpath.read_text()) or {}
    unsupported = set(spec) - SUPPORTED_KEYS
    if unsupported:
        raise KustomizeSubsetError(f"{kpath}: {sorted(unsupported)} not supported by cluster.k8s (see its docstring)")
    resources: list[dict[str, Any]] = []
    for entry in spec.get("resources", []):
        path = root / entry
        resources += build(path) if path.is_dir() else [copy.deepcopy(d) for d in read_yaml_docs(path)]
    for entry in spec.get("patches", []):
        ops = _patch_ops(entry, root)
        target = entry.get("target") or {}
        hits = [i for i, r in enumerate(resources) if _matches(r, target)]
        if not hits:
            raise KustomizeSubsetError(f"{kpath}: patch target {target} matches no resource")
        for i in hits:
            resources[i] = apply_json6902(resources[i], ops, f"{kpath} -> {resources[i]['kind']}")
    for entry in spec.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeSubsetError(f"{kpath}: labels with includeSelectors/includeTemplates are not supported")
        for r in resources:
            r.setdefault("metadata", {}).setdefault("labels", {}).update(entry.get("pairs", {}))
    if spec.get("namespace"):
        for r in resources:
            if r.get("kind") not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = spec["namespace"]
    return resources


def overlays() -> list[str]:
    return sorted(p.parent.name for p in (K8S_DIR / "overlays").glob(f"*/{KUSTOMIZATION}"))


def render_overlay(name: str) -> list[dict[str, Any]]:
    """Resources of ``k8s/overlays/<name>`` (``base`` renders ``k8s/base``)."""
    directory = K8S_DIR / "base" if name == "base" else K8S_DIR / "overlays" / name
    if not directory.is_dir():
        raise UnknownName(f"no overlay {name!r}; available: {', '.join(overlays())} (or base)")
    return build(directory)


def to_yaml(resources: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(resources, sort_keys=False)


# --------------------------------------------------------------------------- CRD validation
_DATA_KEYS = {"default", "enum", "required", "x-kubernetes-validations", "x-kubernetes-list-map-keys", "example"}


def strict_schema(node: Any) -> Any:
    """A CRD schema as strict field validation applies it (see the module docstring)."""
    if isinstance(node, list):
        return [strict_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        else:
            out[key] = value if key in _DATA_KEYS else strict_schema(value)
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


def load_crd_schemas(crd_dir: str | Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(apiVersion, kind): strict schema}`` for every served version of every CRD file in ``crd_dir``."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        for crd in read_yaml_docs(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    schema = strict_schema(version["schema"]["openAPIV3Schema"])
                    schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def _list_map_keys(validator, keys, instance, schema):
    from jsonschema import ValidationError

    if not validator.is_type(instance, "array"):
        return
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                yield ValidationError(f"duplicate entry for list-map keys {keys}: {dict(zip(keys, key))}")
            seen.add(key)


def validate_resource(resource: dict[str, Any], schemas: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Errors (``path: message``) of one manifest against its CRD; empty when valid."""
    from jsonschema import Draft7Validator, validators

    gvk = (resource.get("apiVersion", ""), resource.get("kind", ""))
    if gvk not in schemas:
        return [f"no CRD schema for apiVersion={gvk[0]!r} kind={gvk[1]!r} (have {sorted(schemas)})"]
    errors = []
    name = (resource.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        errors.append("metadata.name: required")
    cls = validators.extend(Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
    for err in sorted(cls(schemas[gvk]).iter_errors(resource), key=lambda e: list(e.absolute_path)):
        errors.append(f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}")
    return errors


# --------------------------------------------------------------------------- RayService generator
RAYSERVICE_NAME = "prefill-router-serve"
RAYSERVICE_OUT = "k8s/base/rayservice.yaml"
SERVE_CONFIG = "configs/serve-k8s.yaml"
# Code of the app on a stock Ray image: the same zip the RayJob uses (see README, "Operating on a cluster").
CODE_URI = "s3://prefill-router-artifacts/code/prefill-router.zip"


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded serveConfigV2) as ``|`` blocks, so diffs stay readable."""


_LiteralDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def rayservice_targets(cfg: Any) -> list[str]:
    """The served targets: ``cfg.targets``, or the local artifact's (a remote artifact is not read)."""
    from serving.app import served_targets
    from shared import storage

    if cfg.targets is not None:
        return list(cfg.targets)
    if storage.is_s3(cfg.artifact):
        raise BadInput(f"the serve config's artifact {cfg.artifact} is remote: list `targets` in the serve "
                         "config so the RayService can be rendered without reading it")
    return served_targets(cfg)


def render_rayservice(cfg: Any, name: str = RAYSERVICE_NAME, code_uri: str | None = CODE_URI,
                      cluster_file: Path = K8S_DIR / "base" / "raycluster.yaml") -> dict[str, Any]:
    """A RayService whose ``serveConfigV2`` is ``serving.config.serve_config`` of ``cfg`` and whose
    ``rayClusterConfig`` is the spec of the base RayCluster: nothing is kept by hand."""
    from serving.config import serve_config

    doc = serve_config(cfg, rayservice_targets(cfg))
    if code_uri:
        doc["applications"][0]["runtime_env"] = {"working_dir": code_uri,
                                                 "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    clusters = [r for r in read_yaml_docs(cluster_file) if r.get("kind") == "RayCluster"]
    if len(clusters) != 1:
        raise BadInput(f"{cluster_file} must hold exactly one RayCluster")
    return {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": name},
            "spec": {"upgradeStrategy": {"type": "NewCluster"},
                     "serveConfigV2": yaml.safe_dump(doc, sort_keys=False),
                     "rayClusterConfig": with_readiness_probes(clusters[0]["spec"], cfg)}}


def with_readiness_probes(cluster_spec: dict[str, Any], cfg: Any) -> dict[str, Any]:
    """A copy of a RayCluster spec whose Ray containers are ready only when the app can answer:
    ``GET /readyz`` on the Serve port (every node runs a proxy) is 200 only when the encoder, the
    router head and at least one target answer. KubeRay keeps a probe the manifest sets."""
    spec = copy.deepcopy(cluster_spec)
    probe = {"httpGet": {"path": "/readyz", "port": cfg.http_port}, "initialDelaySeconds": 10,
             "periodSeconds": 5, "timeoutSeconds": int(cfg.ready_timeout_s) + 3, "failureThreshold": 3}
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    for group in groups:
        group["template"]["spec"]["containers"][0]["readinessProbe"] = copy.deepcopy(probe)
    return spec


def rayservice_yaml(resource: dict[str, Any], serve_config_path: str) -> str:
    header = (f"# GENERATED from {serve_config_path} by\n"
              f"#   prefill-router k8s render-rayservice --serve-config {serve_config_path} -o {RAYSERVICE_OUT}\n"
              "# (serveConfigV2 = serving.config.serve_config; rayClusterConfig = the spec of raycluster.yaml).\n"
              "# Do not edit: change the serve config or raycluster.yaml and re-run; tests/cluster/test_k8s.py checks it.\n"
              "# Applied in place, no replica restarted: user_config.artifact of Encoder and RouterHead (a new\n"
              "# artifact), the Ingress's user_config (auth, timeouts, fallback, defaults) and the Targets'\n"
              "# (timeout_s). Any change of args replaces every replica, models included.\n")
    return header + yaml.dump(resource, Dumper=_LiteralDumper, sort_keys=False, width=120)


# --------------------------------------------------------------------------- CLI
def render_command(
    overlay: Annotated[str, typer.Argument(help="k8s/overlays/<overlay> to render, or base.")],
) -> None:
    """Print an overlay's manifests as kustomize would (for machines without kubectl)."""
    print(to_yaml(render_overlay(overlay)), end="")


def rayservice_command(
    serve_config: Annotated[str, typer.Option("--serve-config", "-s", help="ServeConfig YAML.")] = SERVE_CONFIG,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here, not stdout.")] = None,
    name: Annotated[str, typer.Option("--name", help="RayService metadata.name.")] = RAYSERVICE_NAME,
    code_uri: Annotated[str, typer.Option("--code-uri", help="runtime_env working_dir of the app ('' for none: "
                                                            "the image holds the project).")] = CODE_URI,
) -> None:
    """Generate the RayService manifest from the serving config (serveConfigV2 is never hand-kept)."""
    from serving.config import ServeConfig
    from shared.cli_utils import console
    from shared.config import load_config

    text = rayservice_yaml(render_rayservice(load_config(ServeConfig, serve_config), name, code_uri or None),
                           serve_config)
    if output:
        output.write_text(text)
        console.print(f"wrote {output}")
    else:
        print(text, end="")


def validate_command(
    crds: Annotated[Path, typer.Option("--crds", help="Directory of KubeRay CRD YAMLs.")] = K8S_DIR.parent.parent
    / "shared" / "kuberay-crds",
) -> None:
    """Validate every overlay's resources against the KubeRay CRD schemas; exit 1 on errors."""
    from shared.cli_utils import console
    from shared.errors import MissingInput

    if not crds.is_dir():
        raise MissingInput(f"no CRD directory {crds}")
    schemas = load_crd_schemas(crds)
    bad = 0
    for overlay in ["base", *overlays()]:
        for resource in render_overlay(overlay):
            errors = validate_resource(resource, schemas)
            bad += len(errors)
            status = "[green]ok[/]" if not errors else "[red]" + "; ".join(errors[:5]) + "[/]"
            console.print(f"{overlay}: {resource['kind']}/{resource['metadata']['name']}: {status}")
    if bad:
        raise typer.Exit(code=1)


def main(argv: list[str] | None = None) -> int:
    from shared.cli_utils import run_cli

    commands = {"render": render_command, "render-rayservice": rayservice_command, "validate": validate_command}
    return run_cli("prefill-router k8s", argv, commands, "KubeRay manifests under k8s/.", logs=False)


if __name__ == "__main__":
    raise SystemExit(main())
