"""The loaded router: features -> P(correct) per target (with the novelty gate) -> chosen target.
:func:`shared.artifact.load_artifact` builds it; it needs numpy and torch only."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shared.errors import ArtifactError
from shared.policy import Policy


class Router:
    """A loaded artifact: features -> P(correct) per target -> chosen target."""

    def __init__(self, meta: Any, transform: Any, ensemble: Any):
        """``meta``: a :class:`shared.artifact.ArtifactMeta`; ``transform`` and ``ensemble``: a
        :class:`shared.trunk.FeatureTransform` and ``Ensemble``, or their pooled twins (:mod:`shared.pooled_head`)."""
        self.meta, self.transform, self.ensemble = meta, transform, ensemble

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.meta.targets]

    @property
    def block_names(self) -> list[str]:
        return list(self.transform.names)

    def predict(self, features_by_block: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``{block: (n, d_b)}`` raw activations (an attn block: its reduced window) -> ``(P, novel)``: ``P``
        ``(n, n_targets)`` the mean ensemble sigmoid, the novelty gate's prior on the ``novel`` ``(n,)`` rows
        (:mod:`shared.novelty`; none without ``meta.policy.novelty``)."""
        from shared.novelty import apply_gate, novelty, reduced_blocks

        gate = self.meta.policy.novelty
        try:
            z = self.transform.transform(features_by_block)
            scores = novelty(reduced_blocks(self.transform, features_by_block, z), gate.variances) if gate else None
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"features do not match the artifact: {exc}") from exc
        return apply_gate(self.ensemble.predict_proba(z), scores, gate)

    def predict_proba(self, features_by_block: Mapping[str, np.ndarray]) -> np.ndarray:
        """``(n, n_targets)`` P(correct) as :meth:`predict` gives it."""
        return self.predict(features_by_block)[0]

    def costs(self, input_tokens) -> np.ndarray:
        """``(n, T)`` USD per query: ``(in_tokens * price_in + median_out * price_out) / 1e6``."""
        tok = np.atleast_1d(np.asarray(input_tokens, dtype=np.float64))[:, None]
        pin = np.array([t.price_in for t in self.meta.targets])
        pout = np.array([t.price_out * t.median_output_tokens for t in self.meta.targets])
        return (tok * pin + pout) / 1e6

    def route(self, P: np.ndarray, input_tokens, rule: Policy | None = None) -> np.ndarray:
        """Chosen target index per query (a :class:`shared.policy.Policy`) with the per-query
        costs; ``rule=None`` uses the artifact's policy (``meta.policy.rule()``)."""
        rule = self.meta.policy.rule() if rule is None else rule
        P = np.asarray(P, dtype=np.float64)
        tok = np.broadcast_to(np.asarray(input_tokens, dtype=np.float64), (P.shape[0],))
        return rule.route(P, self.costs(tok))
