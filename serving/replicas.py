"""Bodies of the encoder and router-head deployments (plain classes; ``build_app`` wraps them).

:class:`EncoderReplica` loads the artifact's encoder and runs the prompt's prefill only,
up to the deepest layer the artifact reads (``shared.encoder.Encoder``); with
``prefix_cache.max_mb`` set, a shared prefix runs once (:mod:`serving.prefix_cache`).
:class:`RouterHeadReplica` applies the artifact's transforms, SharedTrunkNet ensemble and
routing rule (tolerance or value policy, ``shared.policy.Rule``). Both reload a new artifact
on a user-config change (``reconfigure``) and keep the old one when the new one fails to load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from serving.config import PrefixCacheConfig
from serving.messages import EncodedPrompt, PrefixUse, PromptTooLong, TokenCount
from serving.prefix_cache import PrefixCache, system_prompt_ids
from serving.schemas import RouteDecision
from shared.artifact import ArtifactError, load_artifact, read_meta
from shared.registry import load_registry
from shared.policy import Rule

log = logging.getLogger(__name__)


def reload(replica: Any, user_config: dict[str, Any] | None, what: str) -> None:
    """Load ``user_config["artifact"]`` into ``replica`` (which has ``artifact`` and ``_load``).

    The first load must succeed (a replica without an artifact cannot serve); a later
    one that fails is logged and the replica keeps serving the artifact it has.
    """
    uri = (user_config or {}).get("artifact")
    if not uri:
        raise ArtifactError(f"the {what} needs user_config.artifact")
    if uri == replica.artifact:
        return
    if replica.artifact is None:
        replica._load(uri)
        return
    try:
        replica._load(uri)
    except Exception as exc:  # noqa: BLE001 - any load failure keeps the serving artifact
        log.error("artifact %s failed to load in the %s, keeping %s: %s", uri, what, replica.artifact, exc)
        return
    log.info("%s now serves artifact %s", what, uri)


class EncoderReplica:
    """Prefill-only encoder for the artifact's layers; one request or a batch of them."""

    def __init__(self, registry: str | None = None, max_prompt_tokens: int = 4096, device: str | None = None,
                 artifact: str | None = None, prefix_cache: dict[str, Any] | None = None):
        self.registry, self.max_prompt_tokens, self.device = registry, max_prompt_tokens, device
        self.cache_config = PrefixCacheConfig.model_validate(prefix_cache or {})
        self.artifact, self.encoder, self.name, self.cache = None, None, None, None
        if artifact:
            self.reconfigure({"artifact": artifact})

    def _load(self, artifact: str) -> None:
        from shared.models import load_causal_lm
        from shared.encoder import Encoder

        meta = read_meta(artifact)
        spec = load_registry(self.registry).get(meta.encoder.name)
        if meta.encoder.sha256 and spec.sha256 and meta.encoder.sha256 != spec.sha256:
            raise ArtifactError(f"artifact {artifact} was trained on {spec.name} sha256 {meta.encoder.sha256}, "
                                f"the registry pins {spec.sha256}")
        if self.encoder is not None and self.name == spec.name:
            loaded = self.encoder.loaded  # same weights: only the layers change
        else:
            loaded = load_causal_lm(spec, device=self.device)
        self.encoder = Encoder(loaded, meta.layers, meta.poolings, max_tokens=self.max_prompt_tokens)
        self.cache = self.new_cache(self.encoder)  # the layers may have changed: a new artifact starts empty
        self.artifact, self.name = artifact, spec.name
        log.info("encoder %s ready: layers %s (depth %d of %d)", spec.name, meta.layers, self.encoder.depth,
                 self.encoder.num_layers)

    def new_cache(self, encoder: Any) -> PrefixCache | None:
        c = self.cache_config
        if not c.max_mb:
            return None
        return PrefixCache(encoder, int(c.max_mb * 2**20), min_tokens=c.min_tokens, min_seen=c.min_seen,
                           block_tokens=c.block_tokens, history=c.history)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve user-config update ``{"artifact": uri}``: see :func:`reload`."""
        reload(self, user_config, "encoder")

    def count_tokens(self, messages: list[dict[str, str]]) -> TokenCount:
        """The prompt's encoder tokens, without a forward pass (the ingress's check on pinned requests)."""
        return TokenCount(len(self.encoder.token_ids([messages])[0]), self.max_prompt_tokens)

    async def encode_many(self, batch: list[list[dict[str, str]]]) -> list[EncodedPrompt | PromptTooLong]:
        """Encode several conversations in one bucketed forward pass; a too-long prompt is refused
        on its own (a :class:`PromptTooLong` in its place), never run and never failing the batch."""
        ids = self.encoder.token_ids(batch)  # untruncated: the limit is checked on these
        results: list[EncodedPrompt | PromptTooLong] = [
            PromptTooLong(len(x), self.max_prompt_tokens) for x in ids]
        ok = [i for i, x in enumerate(ids) if len(x) <= self.max_prompt_tokens]
        if not ok:
            return results
        if self.cache is None:
            feats, _, _ = self.encoder.encode_ids([ids[i] for i in ok])
            uses: list[PrefixUse | None] = [None] * len(ok)
        else:
            feats, uses = self.cache.encode([ids[i] for i in ok],
                                            [system_prompt_ids(self.encoder, batch[i]) for i in ok])
        for row, i in enumerate(ok):
            results[i] = EncodedPrompt({c: v[row] for c, v in feats.items()}, len(ids[i]), self.name,
                                       self.artifact, uses[row])
        return results

    async def encode_one(self, messages: list[dict[str, str]]) -> EncodedPrompt | PromptTooLong:
        """One conversation (``build_app`` replaces this with a ``@serve.batch`` of :meth:`encode_many`)."""
        return (await self.encode_many([messages]))[0]

    async def encode(self, messages: list[dict[str, str]]) -> EncodedPrompt | PromptTooLong:
        return await self.encode_one(messages)

    def ready(self) -> dict[str, Any]:
        """Answers once the artifact's encoder is loaded (the ingress's readiness check); with the
        prefix cache on, also its entries, bytes and counters."""
        return {"encoder": self.name, "artifact": self.artifact, "pid": os.getpid(),
                "prefix_cache": self.cache.stats() if self.cache is not None else None}


class RouterHeadReplica:
    """Artifact transforms + ensemble + policy over the served targets."""

    def __init__(self, targets: list[str] | None = None, artifact: str | None = None):
        self.served = targets
        self.artifact, self.router = None, None
        if artifact:
            self.reconfigure({"artifact": artifact})

    def _load(self, artifact: str) -> None:
        router = load_artifact(artifact)
        names = router.target_names
        served = [t for t in names if self.served is None or t in self.served]
        if not served:
            raise ArtifactError(f"artifact {artifact} routes to {names}, none of which is served")
        self.router, self.artifact = router, artifact
        self.index = [names.index(t) for t in served]
        self.names = served

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve user-config update ``{"artifact": uri}``: see :func:`reload`."""
        reload(self, user_config, "router head")

    def decide(self, encoded: EncodedPrompt, rule: Rule | None) -> RouteDecision:
        """The routing decision for one encoded prompt; ``rule=None``: the artifact's rule."""
        meta = self.router.meta
        if encoded.encoder != meta.encoder.name:
            raise ArtifactError(f"features come from encoder {encoded.encoder!r}, the artifact expects "
                                f"{meta.encoder.name!r} (an artifact reload is in progress?)")
        feats = {k: np.asarray(v, dtype=np.float32)[None, :] for k, v in encoded.features.items()}
        P = self.router.predict_proba(feats)[0][self.index]
        costs = self.router.costs([encoded.n_tokens])[0][self.index]
        rule = meta.policy.rule() if rule is None else Rule.of(*rule)
        order = rule.candidates(P, costs)
        return RouteDecision(target=self.names[order[0]], probabilities=dict(zip(self.names, map(float, P))),
                             expected_cost=dict(zip(self.names, map(float, costs))),
                             eligible=[self.names[i] for i in order], policy=rule.policy,
                             **{rule.policy: rule.param}, prompt_tokens=int(encoded.n_tokens), artifact=self.artifact)

    def info(self) -> dict[str, Any]:
        """The loaded artifact (also the ingress's readiness check: it answers once one is loaded)."""
        return {"artifact": self.artifact, "targets": self.names, "encoder": self.router.meta.encoder.name,
                "created_at": self.router.meta.created_at}

    ready = info
