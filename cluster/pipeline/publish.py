"""The pipeline's last stage: publish a new router artifact only when it is not worse.

The new artifact's evaluation metric (``metric``, on this run's test split) is compared
with the currently published artifact's, evaluated on **the same** data: the baseline is
re-scored by ``training.evaluate.run`` (no baselines, no operating point written), so the
two numbers are comparable. On labels imported from a decision log, ``dr_accuracy`` (or
``ips_accuracy`` / ``snips_accuracy``) compares the off-policy estimates of the two routers'
accuracy on the same logged test rows, with the same propensities, clipping and bootstrap.
:func:`publish_decision` is the rule (a pure function): publish when nothing is published yet,
or when ``new >= current - max_regression``.

Publishing copies the artifact to ``uri`` (local or ``s3://``) with
:func:`shared.artifact.copy_artifact` (``meta.json`` last, so a half-copied artifact has
none; the copy is checked to load), writes ``publish.json`` beside it and updates the
optional ``pointer`` file. ``{run_id}`` in ``uri`` gives every run its own URI, which is
what an in-place Serve reload needs (``reload_serve_app``: only the Encoder's and
RouterHead's ``user_config.artifact`` change, see ``serving.app.deploy``).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from shared import storage
from shared.config import StrictConfig
from shared.ray_boot import ensure_ray

if TYPE_CHECKING:
    from training.evaluate.results import EvalReport

log = logging.getLogger(__name__)

METRICS = ("gap_closed", "max_gap_closed", "pauccc", "accuracy", "cost_savings", "mean_auc",
           "dr_accuracy", "ips_accuracy", "snips_accuracy")
# Off-policy estimates (labels from a decision log: report.json's off_policy): <estimator>_accuracy.
OFF_POLICY_METRICS = {m: m.removesuffix("_accuracy") for m in METRICS if m.endswith("_accuracy") and m != "accuracy"}
ROUTER_NAME = "prefill-router"  # training.evaluate.baselines.ArtifactRouter.name in the evaluation report


class ReloadServeConfig(StrictConfig):
    """Point a running Serve app at the newly published artifact (in place, no restart)."""

    serve_config: str = Field(description="ServeConfig YAML the running app was deployed from "
                                          "(e.g. configs/serve-k8s.yaml); its `args` must stay as deployed.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides of that serve config.")
    app_name: str | None = Field(None, description="Serve app name (None: the serve config's app_name).")
    ray_address: str | None = Field(None, description="Ray address of the cluster running Serve; None: the "
                                                      "cluster the pipeline runs on.")
    timeout_s: float = Field(600, gt=0, description="Seconds to wait for the app to be RUNNING again.")


class PublishConfig(StrictConfig):
    """Where and when a new artifact is published."""

    uri: str | None = Field(None, description="Destination artifact directory (local or s3://); `{run_id}` is "
                                              "replaced by the run's UTC timestamp. None: do not publish.")
    pointer: str | None = Field(None, description="JSON file (local or s3://) naming the current artifact; "
                                                  "updated on publish, its artifact is the next baseline.")
    baseline: str | None = Field(None, description="Artifact to beat; None: the pointer's artifact, else the "
                                                   "artifact already at `uri` (when it has no {run_id}).")
    metric: Literal[METRICS] = Field("gap_closed", description="Test-split metric compared (higher is better). "
                                     "On labels from a decision log: dr_accuracy (or ips_ / snips_accuracy), the "
                                     "off-policy estimate of the router's accuracy on the logged test traffic; the "
                                     "classical ones count observed cells only there.")
    max_regression: float = Field(0.0, description="Publish when new >= current - max_regression (negative: the "
                                  "new artifact must beat the published one by at least that much).")
    force: bool = Field(False, description="Publish even when worse, or when the baseline cannot be evaluated.")
    reload_serve_app: ReloadServeConfig | None = Field(None, description="Reload a running Serve app after "
                                                                         "publishing.")
    refused_exit_code: int = Field(3, ge=0, le=125, description="Exit status of `pipeline run` (so the Ray job "
                                   "fails) when `uri` is set but publishing was refused; 0: succeed anyway.")


def publish_decision(new: float | None, current: float | None, max_regression: float) -> tuple[bool, str]:
    """Whether to publish an artifact scoring ``new`` over one scoring ``current`` (None: none published)."""
    if current is None:
        return True, "no published artifact to compare with"
    if math.isnan(current):
        return True, "the published artifact's metric is undefined (nan) on this data"
    if new is None or math.isnan(new):
        return False, f"the new artifact's metric is undefined (nan); the published one scores {current:.4f}"
    if new >= current - max_regression:
        return True, f"new {new:.4f} >= published {current:.4f} - max_regression {max_regression:g}"
    if max_regression < 0:
        return False, f"new {new:.4f} is not better than published {current:.4f} by at least {-max_regression:g}"
    return False, f"new {new:.4f} is worse than published {current:.4f} by more than {max_regression:g}"


def resolve_baseline(pub: PublishConfig) -> str | None:
    """The artifact currently published (see :class:`PublishConfig`), if there is one."""
    from shared.artifact import is_artifact

    candidates = [pub.baseline]
    if pub.pointer and storage.exists(pub.pointer):
        candidates.append(storage.read_json(pub.pointer).get("artifact"))
    if pub.uri and "{run_id}" not in pub.uri:
        candidates.append(pub.uri)
    for uri in candidates:
        if uri and is_artifact(uri):
            return uri
    return None


def artifact_test_metrics(report: EvalReport) -> dict[str, float]:
    """The artifact's headline numbers on the test split of an evaluation report (an undefined one left out),
    and, when the report has off-policy estimates (a decision log's labels), ``<estimator>_accuracy``."""
    row = report.router(ROUTER_NAME)
    out = {m: float(getattr(row, m)) for m in METRICS if getattr(row, m, None) is not None}
    ours = report.off_policy.routers.get(ROUTER_NAME) if report.off_policy else None
    for metric, est in OFF_POLICY_METRICS.items():
        value = None if ours is None else getattr(ours.accuracy, est)
        if value and value[0] is not None and math.isfinite(value[0]):
            out[metric] = float(value[0])
    return out


def baseline_metrics(eval_cfg: Any, baseline: str, out: str) -> dict[str, float]:
    """Re-score the published artifact on this run's data (same splits as the new one)."""
    from training.evaluate.run import run_evaluation

    cfg = eval_cfg.model_copy(update={"artifact": baseline, "routers": [], "write_operating_point": False,
                                      "out": out})
    return artifact_test_metrics(run_evaluation(cfg))


def reload_serve(reload: ReloadServeConfig, artifact: str) -> dict[str, Any]:
    """``serving.app.deploy(cfg, artifact=...)``: an in-place user_config reload of the running app."""
    import ray

    from serving.app import deploy
    from serving.config import ServeConfig
    from shared.config import load_config

    overrides = list(reload.overrides) + ([f"app_name={reload.app_name}"] if reload.app_name else [])
    cfg = load_config(ServeConfig, reload.serve_config, overrides)
    if reload.ray_address and ray.is_initialized():
        ray.shutdown()
    ensure_ray(reload.ray_address, log_to_driver=False)
    deploy(cfg, artifact=artifact, timeout_s=reload.timeout_s)
    return {"app": cfg.app_name, "artifact": artifact}


def publish(pub: PublishConfig, artifact: str, new: dict[str, float], eval_cfg: Any, work_dir: str) -> dict[str, Any]:
    """Compare, then copy ``artifact`` to ``pub.uri``, record it and optionally reload Serve."""
    from shared.cli_utils import console

    if not pub.uri:
        return {"published": False, "reason": "publish.uri is not set"}
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest = pub.uri.replace("{run_id}", run_id)
    baseline = resolve_baseline(pub)
    if baseline and pub.metric in OFF_POLICY_METRICS and pub.metric not in new and not pub.force:
        return {"published": False, "metric": pub.metric, "baseline": baseline,
                "reason": f"{pub.metric} is an off-policy estimate, and this evaluation has none (its labels carry "
                          "no propensities: not a decision-log import) or it is undefined (no logged test row)"}
    current: dict[str, float] | None = None
    if baseline:
        console.print(f"comparing with the published artifact {baseline} on this run's test split")
        try:
            current = baseline_metrics(eval_cfg, baseline, str(Path(work_dir) / "eval-baseline"))
        except Exception as exc:  # noqa: BLE001 - any reason it cannot be scored means "not comparable"
            if not pub.force:
                return {"published": False, "baseline": baseline,
                        "reason": f"the published artifact cannot be evaluated on this data ({exc}); "
                                  "set publish.force=true to replace it anyway"}
            log.warning("baseline %s not comparable (%s); publishing because force=true", baseline, exc)
    ok, reason = publish_decision(new.get(pub.metric), None if current is None else current.get(pub.metric, math.nan),
                                  pub.max_regression)
    result = {"metric": pub.metric, "new": new.get(pub.metric), "baseline": baseline,
              "current": None if current is None else current.get(pub.metric), "reason": reason}
    if not ok and not pub.force:
        return {**result, "published": False}
    from shared.artifact import copy_artifact

    copy_artifact(artifact, dest)
    record = {**result, "artifact": dest, "run_id": run_id, "metrics": new,
              "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_json(storage.join(dest, "publish.json"), record)
    if pub.pointer:
        storage.write_json(pub.pointer, record)
    if pub.reload_serve_app:
        try:
            record["reloaded"] = reload_serve(pub.reload_serve_app, dest)
        except Exception as exc:  # noqa: BLE001 - published, but the running app still serves the old one
            raise RuntimeError(f"published {dest}, but reloading the Serve app failed: {exc}") from exc
    return {**record, "published": True}
