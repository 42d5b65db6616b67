"""Training objectives of SharedTrunkNet: the masked BCE alone, or with a ranking term added.

Seven similar targets share most of their failures, so a per-target BCE head mostly learns how
hard a query is; the routing decision needs which target is better for it. A ranking term
trains for that on the same features, and the BCE stays in every objective so the outputs
remain P(correct) for the policy (the tolerance rule compares probabilities and costs).

An objective is a class in :data:`OBJECTIVES` (one new class adds one), built from an
:class:`ObjectiveConfig` by :func:`objective`. Its ``__call__(logits, y, mask)`` is a scalar
loss to minimise, used for the gradient steps and for early stopping alike.

RouterDC's sample-LLM contrastive loss (:func:`sample_llm_contrastive_loss`, objective ``sample_llm``)
reads not the logits but the similarities ``sim`` ``(n, T)`` of a query's *embedding* to learned
target embeddings (:class:`TargetEmbeddings`): it trains an encoder, so only a network that has one
(``prefill-router adapt``'s adapted blocks) gives it ``sim``; a trunk over frozen features cannot use it.

Shapes: ``logits``, ``y``, ``mask`` are ``(n, T)``: ``n`` queries, ``T`` targets; ``y`` is a
score in [0, 1] (soft allowed) and may hold NaN where ``mask == 0``; ``mask`` is bool with
True = label present (None: ``~isnan(y)``). Missing labels contribute neither loss nor gradient.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from pydantic import Field, field_validator

from shared.config import StrictConfig
from shared.errors import BadInput
from shared.trunk import masked_bce_loss

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class ObjectiveConfig(StrictConfig):
    """Which loss SharedTrunkNet minimises, and the weight of its ranking term."""

    kind: str = Field("bce", description="Objective: bce (masked BCE only), pairwise, listwise, residual or "
                                         "sample_llm (masked BCE plus that term; training/objectives.py; sample_llm "
                                         "only where an encoder is trained: prefill-router adapt).")
    weight: float = Field(1.0, ge=0, description="Weight of the ranking term added to the masked BCE "
                                                 "(not read by bce).")
    temperature: float = Field(0.1, gt=0, description="listwise: temperature t of the label distribution "
                                                      "softmax(y / t) over a query's targets; sample_llm: the "
                                                      "similarity is cos / t.")
    top_k: int = Field(3, gt=0, description="sample_llm: a query's top-scoring targets pulled towards.")
    bottom_k: int = Field(3, gt=0, description="sample_llm: a query's bottom-scoring targets pushed away from.")

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {kind!r}; known: {sorted(OBJECTIVES)}")
        return kind

    def label(self) -> str:
        """Short name for tables: ``bce``, ``pairwise x1``, ``listwise x1 t0.1``."""
        if self.kind == "bce":
            return "bce"
        if self.kind == "sample_llm":
            return f"sample_llm x{self.weight:g} t{self.temperature:g} top{self.top_k} bottom{self.bottom_k}"
        return f"{self.kind} x{self.weight:g}" + (f" t{self.temperature:g}" if self.kind == "listwise" else "")


def _mask(y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y0, m)``: labels with missing entries set to 0, and the bool mask."""
    m = ~torch.isnan(y) if mask is None else mask.bool()
    return torch.where(m, torch.nan_to_num(y), torch.zeros_like(y)), m


def pairwise_logistic_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """RankNet's loss over each query's pairs of targets with different labels:
    ``sum_{i,a,b: y_ia > y_ib} w_iab * softplus(-(s_ia - s_ib)) / sum w_iab``, ``w_iab = y_ia - y_ib``
    (a soft label's margin weighs the pair; 0/1 labels give weight 1). Both labels must be present.
    0 when no pair differs. Invariant to a per-query shift of the logits: it trains only the order."""
    y0, m = _mask(y, mask)
    diff = y0[:, :, None] - y0[:, None, :]                                     # (n, T, T)
    w = torch.where(m[:, :, None] & m[:, None, :] & (diff > 0), diff, torch.zeros_like(diff))
    margin = logits[:, :, None] - logits[:, None, :]
    return (w * torch.nn.functional.softplus(-margin)).sum() / w.sum().clamp_min(1e-12)


def listwise_softmax_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                          temperature: float = 0.1) -> torch.Tensor:
    """ListNet's cross-entropy between two distributions over a query's present targets (as
    RouterDC's sample-LLM contrastive loss): ``q_i = softmax(y_i / t)``, ``p_i = softmax(s_i)``,
    ``loss = mean_i -sum_a q_ia log p_ia`` over queries with at least two present labels.
    A small ``t`` puts nearly all of ``q`` on the best-scoring targets."""
    y0, m = _mask(y, mask)
    rows = m.sum(dim=1) >= 2
    if not bool(rows.any()):
        return logits.sum() * 0.0
    neg = torch.finfo(logits.dtype).min / 4
    q = torch.softmax(torch.where(m, y0 / temperature, torch.full_like(y0, neg)), dim=1)
    logp = torch.log_softmax(torch.where(m, logits, torch.full_like(logits, neg)), dim=1)
    ce = -(q * torch.where(m, logp, torch.zeros_like(logp))).sum(dim=1)
    return ce[rows].mean()


def residual_bce_loss(logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """BCE of each target against the query's mean: with ``ybar_i`` and ``sbar_i`` the means of
    ``y_i`` and ``s_i`` over the query's present targets, the masked BCE of logits
    ``s_ia - sbar_i`` against targets ``(1 + y_ia - ybar_i) / 2`` in [0, 1]: how much better or
    worse than the query's average target each one does, whatever the query's difficulty."""
    y0, m = _mask(y, mask)
    count = m.sum(dim=1, keepdim=True).clamp_min(1)
    ybar = y0.sum(dim=1, keepdim=True) / count
    sbar = torch.where(m, logits, torch.zeros_like(logits)).sum(dim=1, keepdim=True) / count
    return masked_bce_loss(logits - sbar, (1.0 + y0 - ybar) / 2.0, m)


def sample_llm_contrastive_loss(sim: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None,
                                top_k: int = 3, bottom_k: int = 3) -> torch.Tensor:
    """RouterDC's sample-LLM contrastive loss (Chen et al., NeurIPS 2024, eq. 3) on similarities ``sim``
    ``(n, T)``, ``sim_ia = cos(E(x_i), k_a) / t``: with ``I+_i`` the ``top_k`` present targets of query ``i``
    by score and ``I-_i`` its ``bottom_k`` (ties broken by target order),
    ``loss = mean over (i, a in I+_i) of -log(exp(sim_ia) / (exp(sim_ia) + sum_{b in N_ia} exp(sim_ib)))``,
    ``N_ia = {b in I-_i : y_ib < y_ia}``: it pulls the query's embedding towards its best targets'
    embeddings and away from its worst. A pair whose scores tie is no signal (RouterDC's sets then
    overlap); a positive with no lower-scoring negative (e.g. every target wrong) is left out. 0 when none."""
    y0, m = _mask(y, mask)
    big = torch.finfo(y0.dtype).max
    rank_down = torch.argsort(torch.argsort(torch.where(m, -y0, torch.full_like(y0, big)), dim=1, stable=True),
                              dim=1, stable=True)
    rank_up = torch.argsort(torch.argsort(torch.where(m, y0, torch.full_like(y0, big)), dim=1, stable=True),
                            dim=1, stable=True)
    top, bottom = m & (rank_down < top_k), m & (rank_up < bottom_k)
    pairs = top[:, :, None] & bottom[:, None, :] & (y0[:, None, :] < y0[:, :, None])  # (n, a, b)
    neg = torch.where(pairs, sim[:, None, :].expand_as(pairs), torch.full_like(pairs, float("-inf"), dtype=sim.dtype))
    lse = torch.logsumexp(torch.cat([sim[:, :, None], neg], dim=2), dim=2)  # (n, T)
    used = pairs.any(dim=2)
    if not bool(used.any()):
        return sim.sum() * 0.0
    return (lse - sim)[used].mean()


class TargetEmbeddings(torch.nn.Module):
    """RouterDC's learned target ("LLM") embeddings ``k_a`` ``(T, d)``: ``forward(e)`` with query embeddings
    ``e`` ``(n, d)`` -> ``sim`` ``(n, T)``, ``sim_ia = cos(e_i, k_a) / temperature``."""

    def __init__(self, d: int, n_targets: int, temperature: float = 0.1):
        super().__init__()
        self.keys = torch.nn.Parameter(torch.randn(n_targets, d) / d ** 0.5)
        self.temperature = float(temperature)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        e = torch.nn.functional.normalize(e, dim=1)
        k = torch.nn.functional.normalize(self.keys, dim=1)
        return e @ k.T / self.temperature


class Objective:
    """Base: the masked BCE plus ``weight`` times :meth:`ranking` (zero for :class:`BCE`)."""

    kind: ClassVar[str]
    needs_embedding: ClassVar[bool] = False  # whether __call__ also takes sim, the query embedding's similarities

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def ranking(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return masked_bce_loss(logits, y, mask) + self.cfg.weight * self.ranking(logits, y, mask)


class BCE(Objective):
    """The paper's masked multi-output BCE, alone."""

    kind = "bce"

    def __call__(self, logits, y, mask=None):
        return masked_bce_loss(logits, y, mask)


class Pairwise(Objective):
    """Masked BCE + :func:`pairwise_logistic_loss`."""

    kind = "pairwise"

    def ranking(self, logits, y, mask):
        return pairwise_logistic_loss(logits, y, mask)


class Listwise(Objective):
    """Masked BCE + :func:`listwise_softmax_loss` at ``temperature``."""

    kind = "listwise"

    def ranking(self, logits, y, mask):
        return listwise_softmax_loss(logits, y, mask, self.cfg.temperature)


class Residual(Objective):
    """Masked BCE + :func:`residual_bce_loss`."""

    kind = "residual"

    def ranking(self, logits, y, mask):
        return residual_bce_loss(logits, y, mask)


class SampleLLM(Objective):
    """Masked BCE on the logits + :func:`sample_llm_contrastive_loss` on the query embedding's similarities
    ``sim`` to the target embeddings: ``__call__(logits, y, mask, sim)``."""

    kind = "sample_llm"
    needs_embedding = True

    def __call__(self, logits, y, mask=None, sim=None):
        if sim is None:
            raise BadInput("the sample_llm objective trains an encoder's embedding of the query: only prefill-router "
                           "adapt (adapted encoder blocks) gives it one; a trunk over frozen features cannot use it")
        return masked_bce_loss(logits, y, mask) + self.cfg.weight * sample_llm_contrastive_loss(
            sim, y, mask, self.cfg.top_k, self.cfg.bottom_k)


OBJECTIVES: dict[str, type[Objective]] = {c.kind: c for c in (BCE, Pairwise, Listwise, Residual, SampleLLM)}


def objective(cfg: ObjectiveConfig | None = None) -> Objective:
    """The loss ``cfg`` names (default: the masked BCE)."""
    cfg = cfg or ObjectiveConfig()
    return OBJECTIVES[cfg.kind](cfg)
