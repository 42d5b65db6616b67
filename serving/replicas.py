"""Bodies of the encoder and router-head deployments (plain classes; ``build_app`` wraps them).

:class:`EncoderReplica` loads the artifact's encoder and runs the prompt's prefill only,
up to the deepest layer the artifact reads (``shared.encoder.Encoder``), then, for an artifact with an
adapter (``meta.adapter``), the adapted blocks over the last states of the adapter's layer
(:mod:`shared.adapter`); with ``prefix_cache.max_mb`` set, a shared prefix of the frozen part runs once
(:mod:`serving.prefix_cache`). For an artifact with attn blocks (``meta.pooled``) it also keeps the last
window of states of each attn layer and sends each block's window reduced by its token transform
(:class:`shared.pooled_head.TokenReducer`: ``(W, k)`` float32, NaN-padded) for the head to pool.
:class:`RouterHeadReplica` applies the artifact's transforms, SharedTrunkNet ensemble and
routing rule (a ``shared.policy.Policy``: tolerance, value or one added since). Both reload a new artifact
on a user-config change (``reconfigure``) and keep the old one when the new one fails to load.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from serving.config import PrefixCacheConfig
from serving.messages import (
    EncodedPrompt, EncodeFailed, PrefixUse, PromptRejected, PromptTooLong, TokenCount, error_line,
)
from serving.prefix_cache import PrefixCache, system_prompt_ids
from serving.schemas import RouteDecision
from shared.artifact import ArtifactError, load_adapter, load_artifact, read_meta
from shared.pooled_artifact import token_reducer
from shared.registry import load_registry
from shared.policy import Policy

log = logging.getLogger(__name__)
Encoded = EncodedPrompt | PromptTooLong | PromptRejected | EncodeFailed


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
        self.in_flight = 0  # requests waiting for a batch or in its forward pass (ready() reports it)
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
        self.encoder = Encoder(loaded, meta.layers, meta.poolings, max_tokens=self.max_prompt_tokens,
                               adapter=load_adapter(artifact, loaded.model, meta),
                               attn=token_reducer(artifact, meta))
        self.cache = self.new_cache(self.encoder)  # the layers may have changed: a new artifact starts empty
        self.artifact, self.name = artifact, spec.name
        log.info("encoder %s ready: layers %s (depth %d of %d)%s", spec.name, meta.layers, self.encoder.depth,
                 self.encoder.num_layers, f", adapted blocks {meta.adapter.block_names()}" if meta.adapter else
                 f", attn blocks {meta.pooled.names}" if meta.pooled else "")

    def new_cache(self, encoder: Any) -> PrefixCache | None:
        c = self.cache_config
        if not c.max_mb:
            return None
        return PrefixCache(encoder, int(c.max_mb * 2**20), min_tokens=c.min_tokens, min_seen=c.min_seen,
                           block_tokens=c.block_tokens, history=c.history)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve user-config update ``{"artifact": uri}``: see :func:`reload`."""
        reload(self, user_config, "encoder")

    def count_tokens(self, messages: list[dict[str, str]]) -> TokenCount | PromptRejected:
        """The prompt's encoder tokens, without a forward pass (the ingress's check on pinned requests)."""
        ids = self.token_ids([messages])[0]
        return ids if isinstance(ids, PromptRejected) else TokenCount(len(ids), self.max_prompt_tokens)

    def token_ids(self, batch: list[list[dict[str, str]]]) -> list[list[int] | PromptRejected]:
        """Each conversation's untruncated token ids; a text the tokenizer cannot read is a
        :class:`PromptRejected` in its place (when the batch fails, each is tokenized alone)."""
        try:
            return list(self.encoder.token_ids(batch))
        except Exception as exc:  # noqa: BLE001 - one prompt's text: refuse that one, answer the rest
            if len(batch) > 1:
                return [self.token_ids([m])[0] for m in batch]
            return [PromptRejected(f"the encoder cannot tokenize the prompt ({type(exc).__name__}: "
                                   f"{error_line(exc)}); send valid UTF-8 text")]

    def features(self, batch: list[list[dict[str, str]]], ids: list[list[int]]) -> list[EncodedPrompt | EncodeFailed]:
        """The prompts' pooled features in one forward pass; when it fails, each prompt runs alone, so
        only the prompt that fails by itself gets an :class:`EncodeFailed`."""
        try:
            return self.forward(batch, ids)
        except Exception as exc:  # noqa: BLE001 - isolate the failing prompt from its batch-mates
            if len(ids) > 1:
                log.warning("encoder batch of %d failed (%s): encoding each prompt alone", len(ids), type(exc).__name__)
                return [self.features([m], [x])[0] for m, x in zip(batch, ids)]
            log.warning("encoder failed on one prompt (%s): %s", type(exc).__name__, error_line(exc))
            return [EncodeFailed(type(exc).__name__, error_line(exc))]

    def forward(self, batch: list[list[dict[str, str]]], ids: list[list[int]]) -> list[EncodedPrompt]:
        if self.cache is None:
            feats, _, _ = self.encoder.encode_ids(ids)
            uses: list[PrefixUse | None] = [None] * len(ids)
        else:
            feats, uses = self.cache.encode(ids, [system_prompt_ids(self.encoder, m) for m in batch])
        return [EncodedPrompt({c: v[row] for c, v in feats.items()}, len(x), self.name, self.artifact, uses[row])
                for row, x in enumerate(ids)]

    async def encode_many(self, batch: list[list[dict[str, str]]]) -> list[Encoded]:
        """Encode several conversations in one bucketed forward pass. A prompt over the limit
        (:class:`PromptTooLong`), one the tokenizer cannot read (:class:`PromptRejected`) or one whose
        forward fails alone (:class:`EncodeFailed`) gets its answer in its place, never failing the batch."""
        ids = self.token_ids(batch)  # untruncated: the limit is checked on these
        results: list[Encoded | None] = [
            x if isinstance(x, PromptRejected) else PromptTooLong(len(x), self.max_prompt_tokens)
            if len(x) > self.max_prompt_tokens else None for x in ids]
        ok = [i for i, r in enumerate(results) if r is None]
        if ok:
            for i, encoded in zip(ok, self.features([batch[i] for i in ok], [ids[i] for i in ok])):
                results[i] = encoded
        return results

    async def encode_one(self, messages: list[dict[str, str]]) -> Encoded:
        """One conversation (``build_app`` replaces this with a ``@serve.batch`` of :meth:`encode_many`)."""
        return (await self.encode_many([messages]))[0]

    async def encode(self, messages: list[dict[str, str]]) -> Encoded:
        self.in_flight += 1
        try:
            return await self.encode_one(messages)
        finally:
            self.in_flight -= 1

    def ready(self) -> dict[str, Any]:
        """Answers once the artifact's encoder is loaded (the ingress's readiness check): also the
        requests in this replica now (``in_flight``) and, with the prefix cache on, its counters."""
        return {"encoder": self.name, "artifact": self.artifact, "pid": os.getpid(),
                "in_flight": self.in_flight,
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

    def decide(self, encoded: EncodedPrompt, rule: Policy | None) -> RouteDecision:
        """The routing decision for one encoded prompt; ``rule=None``: the artifact's rule."""
        meta = self.router.meta
        if encoded.encoder != meta.encoder.name:
            raise ArtifactError(f"features come from encoder {encoded.encoder!r}, the artifact expects "
                                f"{meta.encoder.name!r} (an artifact reload is in progress?)")
        feats = {k: np.asarray(v, dtype=np.float32)[None, :] for k, v in encoded.features.items()}
        P, novel = self.router.predict(feats)
        P = P[0][self.index]
        costs = self.router.costs([encoded.n_tokens])[0][self.index]
        rule = meta.policy.rule() if rule is None else rule
        order = rule.candidates(P, costs)
        return RouteDecision(target=self.names[order[0]], probabilities=dict(zip(self.names, map(float, P))),
                             expected_cost=dict(zip(self.names, map(float, costs))),
                             eligible=[self.names[i] for i in order], **rule.fields(),
                             prompt_tokens=int(encoded.n_tokens), artifact=self.artifact, novel=bool(novel[0]))

    def info(self) -> dict[str, Any]:
        """The loaded artifact (also the ingress's readiness check: it answers once one is loaded)."""
        return {"artifact": self.artifact, "targets": self.names, "encoder": self.router.meta.encoder.name,
                "created_at": self.router.meta.created_at}

    ready = info
