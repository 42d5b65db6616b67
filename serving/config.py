"""The serving config (one strict model), and the Serve config file generated from it.

``serve_config(cfg)`` produces the same document ``serve build`` would write for
``serving.app:build_app``: the application's ``args`` are this config, and each
deployment's replicas, autoscaling and resources come from it. KubeRay's RayService
embeds that document as ``serveConfigV2``, so there is no hand-kept copy anywhere.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, model_validator

from shared.config import StrictConfig
from shared.policy import Policy, policy_names

IMPORT_PATH = "serving.app:build_app"


class DeploymentOptions(StrictConfig):
    """Replicas, autoscaling and resources of one deployment."""

    min_replicas: int = Field(1, ge=0, description="Autoscaling floor.")
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Autoscaling target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(16, gt=0, description="Requests a replica accepts at once.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load above target this long before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load below target this long before one is removed.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per replica (Serve's default of 1 is too much for small models).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per replica: pins "
                                        "replicas to the nodes that offer them (e.g. a node group's label).")

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments of ``Deployment.options``."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "initial_replicas": max(self.min_replicas, 1),
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"resources": dict(self.resources)} if self.resources else {})},
        }


class BatchOptions(StrictConfig):
    max_batch_size: int = Field(8, gt=0, description="Largest encoder batch (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="How long a batch waits to fill.")


class PrefixCacheConfig(StrictConfig):
    """The Encoder replica's prefix KV cache (:mod:`serving.prefix_cache`)."""

    max_mb: float = Field(0.0, ge=0, description="Memory bound of the cache in MiB per Encoder replica; least "
                          "recently used prefixes are evicted to stay under it. 0: no cache (every prompt runs whole).")
    min_tokens: int = Field(64, ge=1, description="Shortest prefix worth caching, in encoder tokens.")
    min_seen: int = Field(2, ge=1, description="A prefix that is not a system prompt is cached once this many "
                          "prompts have begun with it (a system prompt is cached on first sight).")
    block_tokens: int = Field(16, ge=1, description="Prefixes are counted (and a seen prefix cached) at multiples "
                              "of this many tokens.")
    history: int = Field(65536, ge=1, description="Prefix counts kept for the min_seen rule (least recently "
                         "counted dropped first).")


class DecisionLogConfig(StrictConfig):
    """Where and how the ingress logs each answered request and each feedback (shared.decision_log)."""

    uri: str = Field(description="Log root, local path or s3:// URI: decisions/ and feedback/ parts go under it.")
    keep_prompts: bool = Field(False, description="Keep each request's messages (needed to retrain from the log); "
                               "false: only their sha256.")
    keep_responses: bool = Field(True, description="Keep each answer's text (needed by a judge).")
    queue_records: int = Field(10000, ge=1, description="Records waiting to be written, at most; past it new "
                               "records are dropped and counted (prefill_router_log_dropped_total), never waited on.")
    part_records: int = Field(1000, ge=1, description="A part is written once this many records are buffered.")
    part_s: float = Field(60.0, gt=0, description="... or once its oldest record is this old (seconds).")
    retries: int = Field(2, ge=0, description="Further tries of a failed part write before its records are dropped.")
    close_timeout_s: float = Field(20.0, gt=0, description="On shutdown, how long the last parts may take to write.")


class ExplorationConfig(StrictConfig):
    """Epsilon-greedy exploration, so that targets the policy rarely picks still get labels."""

    epsilon: float = Field(0.0, ge=0, le=1, description="Probability that a routed request goes to another "
                           "target the router scored (served, within max_cost_ratio) instead of the policy's choice; 0: never "
                           "(pinned requests: never).")
    max_cost_ratio: float | None = Field(1.0, gt=0, description="Only targets whose expected cost is at most this "
                                         "times the policy's choice's are explored; None: no cap.")
    seed: int | None = Field(None, description="Seed of the exploration draws (tests); None: from the OS.")


class IngressConfig(StrictConfig):
    """What the ingress replica needs (no artifact: a new artifact must not restart it)."""

    default_max_tokens: int = Field(128, gt=0, description="Answer length when a request names none.")
    default_tolerance: float | None = Field(None, ge=0, le=1, description="Tolerance when a request names no "
                                            "rule; None (and no default_value): the artifact's operating point.")
    default_value: float | None = Field(None, ge=0, allow_inf_nan=False, description="USD one correct answer is "
                                        "worth when a request names no rule (the value policy, shared.policy); at "
                                        "most one of default_tolerance and default_value.")
    target_timeout_s: float = Field(120.0, gt=0, description="A target slower than this counts as failed (and is "
                                    "cancelled: it stops generating).")
    auth_token_env: str | None = Field(None, description="Env var with a bearer token the ingress requires; the app "
                                       "refuses to start if it names an unset variable.")
    auth_probes: bool = Field(False, description="With auth_token_env set, /healthz, /readyz and /metrics need the "
                              "bearer token too. False (the default): they stay open for liveness/readiness probes "
                              "and Prometheus scrapers, and anyone who reaches the port learns the served targets' "
                              "names and the request counts; set true where that port is reachable by others.")
    max_prompt_tokens: int = Field(4096, gt=0, description="Longer prompts are refused with 413 on every path.")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger request bodies are refused with 413 unread.")
    fallback_target: str | None = Field(None, description="Answers routed requests (marked in a header) when the "
                                        "encoder or router head fails; None: such requests get a JSON 503.")
    ready_timeout_s: float = Field(2.0, gt=0, description="How long /readyz waits for each deployment to answer.")
    route_timeout_s: float = Field(10.0, gt=0, description="The encoder and router head must decide (or count a "
                                   "pinned prompt's tokens) within this; else the request is degraded.")
    decision_log: DecisionLogConfig | None = Field(None, description="Log every answered request and every "
                                                   "feedback to Parquet (None: no log, and /v1/feedback answers 404).")
    exploration: ExplorationConfig = Field(default_factory=ExplorationConfig, description="Exploration of targets "
                                           "other than the policy's choice (off by default).")

    @model_validator(mode="after")
    def _one_default_rule(self):
        self.default_rule()
        return self

    def default_rule(self) -> Policy | None:
        """The rule a request that names none routes by (None: the artifact's): the one
        ``default_<policy name>`` field set (shared.policy.Policy.pick checks there is at most one)."""
        names = {f"default_{n}" for n in policy_names()}
        return Policy.pick({k: v for k, v in self if k in names}, prefix="default_")


def auth_token(name: str | None) -> str | None:
    """The bearer token in env var ``name`` (None: no auth); ValueError when ``name`` is unset or empty."""
    if not name:
        return None
    token = os.environ.get(name, "").strip()
    if not token:
        raise ValueError(f"auth_token_env is {name!r}, but {name} is unset or empty in the ingress replica's "
                         f"environment: set it there (the Ray cluster's or pod's env) or set auth_token_env: "
                         "null to serve without auth; refusing to start without the auth that was asked for")
    return token


class ServeConfig(IngressConfig):
    """Config of the Serve application (``prefill-router serve``): the ingress's settings (inherited,
    so a YAML keeps them at the top level) plus the artifact, targets and deployments."""

    app_name: str = Field("prefill-router", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    http_host: str = Field("127.0.0.1", description="Serve proxy host (0.0.0.0 in a cluster).")
    http_port: int = Field(8000, gt=0, lt=65536, description="Serve proxy port.")
    artifact: str = Field(description="Router artifact directory: local path or s3:// URI.")
    registry: str | None = Field(None, description="Model registry YAML (default configs/models.yaml).")
    targets: list[str] | None = Field(
        None, description="Targets to serve (default: the artifact's). Names the artifact does not route to are "
        "served for requests that name them (model=<target>). []: a decision service that serves no target: "
        "/v1/route decides among all the artifact's targets, chat completions answer 400.")
    endpoints: dict[str, str] = Field(
        default_factory=dict, description="Serve a target through another registry entry, e.g. the same model "
        "behind a different OpenAI-compatible endpoint: {target: registry name}.")
    encoder_batch: BatchOptions = Field(default_factory=BatchOptions, description="Encoder request batching.")
    prefix_cache: PrefixCacheConfig = Field(default_factory=PrefixCacheConfig,
                                            description="The Encoder replica's prefix KV cache (off by default).")
    ingress: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.2), description="Ingress.")
    encoder: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Encoder replicas.")
    head: DeploymentOptions = Field(default_factory=lambda: DeploymentOptions(num_cpus=0.2), description="Router head.")
    target_defaults: DeploymentOptions = Field(default_factory=DeploymentOptions, description="Every target.")
    target_overrides: dict[str, DeploymentOptions] = Field(default_factory=dict, description="Per-target options.")

    def ingress_config(self) -> IngressConfig:
        """The part of this config the ingress replica is built with."""
        return IngressConfig.model_validate(self.model_dump(include=set(IngressConfig.model_fields)))

    def target_options(self, name: str) -> DeploymentOptions:
        return self.target_overrides.get(name, self.target_defaults)


def deployment_name(role: str, target: str | None = None) -> str:
    """Serve deployment names: Ingress, Encoder, RouterHead, Target-<name>."""
    return f"Target-{target}" if target else role


#: The ingress's settings that travel in ``user_config`` (applied in place) rather than in the
#: application's ``args``; ``max_prompt_tokens`` stays in ``args`` too, the Encoder is built with it.
LIVE_FIELDS = frozenset(IngressConfig.model_fields) - {"max_prompt_tokens"}


class TargetLiveConfig(StrictConfig):
    """What a target replica takes in place (Serve ``user_config``, no restart)."""

    timeout_s: float = Field(120.0, gt=0, description="Bound on one call to an OpenAI-compatible endpoint "
                             "(connect and read), seconds: the serving config's target_timeout_s.")


def target_user_config(cfg: ServeConfig) -> dict[str, Any]:
    """Every target replica's ``user_config``: its own bound on an endpoint call."""
    return TargetLiveConfig(timeout_s=cfg.target_timeout_s).model_dump(mode="json")


def serve_config(cfg: ServeConfig, targets: list[str]) -> dict[str, Any]:
    """The ``serve build``-style config document for this app (validated by Ray's schema in tests).

    Serve versions an application by its ``args``: any change there replaces every replica,
    models included (on GPUs: every vLLM engine reloads). So what operators change while
    serving travels in the deployments' ``user_config``, which Serve applies in place
    (``reconfigure``, no restart): the artifact (Encoder, RouterHead), the ingress's settings
    (auth, timeouts, fallback, defaults, limits: Ingress) and the targets' call timeout.
    """
    artifact = {"artifact": cfg.artifact}  # changing it reloads the artifact in place
    deployments = [
        {"name": deployment_name("Ingress"), **cfg.ingress.serve_options(),
         "user_config": cfg.ingress_config().model_dump(mode="json")},
        {"name": deployment_name("Encoder"), **cfg.encoder.serve_options(), "user_config": artifact},
        {"name": deployment_name("RouterHead"), **cfg.head.serve_options(), "user_config": artifact},
        *({"name": deployment_name("Target", t), **cfg.target_options(t).serve_options(),
           "user_config": target_user_config(cfg)} for t in targets),
    ]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "applications": [{
            "name": cfg.app_name,
            "route_prefix": cfg.route_prefix,
            "import_path": IMPORT_PATH,
            "args": cfg.model_dump(mode="json", exclude=set(LIVE_FIELDS)),
            "deployments": deployments,
        }],
    }
