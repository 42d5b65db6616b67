"""Training an :class:`training.adapt.model.AdaptedRouter` end to end, early-stopped on validation rows.

1. **Warm start** (``warm_start``): the trunk is first trained on the *untrained* blocks' features, which are
   fixed then (:func:`training.loop.train_one`, the frozen recipe: cheap, the blocks run once per row). The
   network starts as today's frozen-feature router over the same windows; its validation loss is the one to
   beat, and it is what comes back if no epoch beats it.
2. **End to end**: Adam over minibatches of windows, the trunk (and RouterDC's target embeddings) at ``lr``
   with weight decay, the adapted blocks at ``block_lr`` without (decay would pull pretrained weights to 0);
   the objective's loss on the validation rows ``evals_per_epoch`` times an epoch; stop after ``patience``
   evaluations without a ``min_delta`` improvement, or at ``max_minutes``; the best evaluation's weights.

A progress line goes to the log at every evaluation and at most every ``log_every_s`` seconds between (no
carriage returns: readable in a Ray job's log or a file).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from pydantic import Field

from shared.config import StrictConfig
from training.adapt.model import AdaptedRouter, AdaptInputs
from training.objectives import ObjectiveConfig, TargetEmbeddings, objective

log = logging.getLogger(__name__)


class AdaptTrainConfig(StrictConfig):
    """How the adapted blocks and the trunk are trained."""

    hidden: list[int] = Field([256, 128], description="SharedTrunkNet hidden widths.")
    dropout: list[float] = Field([0.3, 0.2], description="Dropout after each hidden layer.")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate of the trunk (and the target embeddings).")
    block_lr: float = Field(3e-5, gt=0, description="Adam learning rate of the adapted blocks (lower: they start "
                                                    "pretrained).")
    weight_decay: float = Field(1e-4, ge=0, description="Adam weight decay of the trunk (none on the blocks).")
    batch_size: int = Field(32, gt=0, description="Rows per minibatch (each runs the blocks over its windows).")
    max_epochs: int = Field(6, ge=0, description="Upper bound on end-to-end epochs (0: the warm start only: the "
                                                 "untrained blocks under a trained trunk).")
    evals_per_epoch: int = Field(2, gt=0, description="Validation evaluations per epoch (early-stopping checks).")
    patience: int = Field(2, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(1e-5, ge=0, description="Smallest validation-loss drop that counts as improvement.")
    max_minutes: float | None = Field(None, gt=0, description="Stop end-to-end training after this long.")
    warm_start: bool = Field(True, description="Train the trunk on the untrained blocks' features first.")
    warm_epochs: int = Field(150, gt=0, description="Warm start: SharedTrunkNet's epoch bound (patience 15, batch "
                                                    "512, lr 1e-3: the frozen recipe).")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="Loss: the masked BCE, or it "
                                       "plus a term; sample_llm is RouterDC's sample-LLM contrastive loss.")
    log_every_s: float = Field(30.0, gt=0, description="Most seconds between progress lines within an epoch.")
    seed: int = Field(0, description="Seed of the trunk's initialisation, the minibatch order and the split.")
    sortish: bool = Field(True, description="Minibatches of rows of similar window length (sorted within random "
                                            "pools of 50 batches, batch order shuffled): less padding per step.")


@dataclass
class AdaptTrainResult:
    """The trained network (best evaluation's weights, eval mode) and its history."""

    model: AdaptedRouter
    embeddings: TargetEmbeddings | None
    val_loss: float
    start_val_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def warm_start(model: AdaptedRouter, feats_tr: np.ndarray, feats_va: np.ndarray, tr: AdaptInputs,
               va: AdaptInputs, cfg: AdaptTrainConfig) -> None:
    """Train ``model.trunk`` on ``[dense, e]`` with ``e`` the untrained blocks' embeddings (``feats_*``
    ``(n, d_a)``), the frozen recipe (:func:`training.loop.train_one`, masked BCE)."""
    from training.loop import TrunkConfig, train_one

    Xtr, Xva = np.concatenate([tr.dense, feats_tr], axis=1), np.concatenate([va.dense, feats_va], axis=1)
    trunk = TrunkConfig(hidden=cfg.hidden, dropout=cfg.dropout, max_epochs=cfg.warm_epochs)
    result = train_one(Xtr, tr.Y, None, Xva, va.Y, None, seed=cfg.seed, cfg=trunk)
    model.trunk.load_state_dict(result.state_dict)


@torch.no_grad()
def evaluate(model: AdaptedRouter, emb: TargetEmbeddings | None, inputs: AdaptInputs, loss, chunk: int = 64) -> float:
    """The objective's loss over all of ``inputs`` (eval mode, one loss over the concatenated outputs)."""
    model.eval()
    logits, sims = [], []
    for i in range(0, len(inputs), chunk):
        out, e = model(*inputs.tensors(slice(i, i + chunk)))
        logits.append(out)
        sims.append(emb(e) if emb is not None else None)
    y = torch.as_tensor(inputs.Y.astype(np.float32))
    extra = (torch.cat(sims),) if emb is not None else ()
    return float(loss(torch.cat(logits), y, None, *extra))


def optimiser(model: AdaptedRouter, emb: TargetEmbeddings | None, cfg: AdaptTrainConfig) -> torch.optim.Adam:
    head = list(model.trunk.parameters()) + (list(emb.parameters()) if emb is not None else [])
    return torch.optim.Adam([{"params": head, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                             {"params": model.adapter.block_parameters(), "lr": cfg.block_lr, "weight_decay": 0.0}])


def minibatches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, sortish: bool) -> list[np.ndarray]:
    """One epoch's minibatches (row indices) over rows of window lengths ``lengths``: a random permutation cut
    into batches; ``sortish``: sorted by length within random pools of 50 batches first, the batches' order then
    shuffled (every row once an epoch either way)."""
    order = rng.permutation(len(lengths))
    if sortish:
        pools = np.array_split(order, max(1, int(np.ceil(len(order) / (50 * batch_size)))))
        order = np.concatenate([p[np.argsort(lengths[p], kind="stable")] for p in pools])
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [out[i] for i in rng.permutation(len(out))] if sortish else out


def train_adapted(model: AdaptedRouter, tr: AdaptInputs, va: AdaptInputs, cfg: AdaptTrainConfig,
                  label: str = "adapt") -> AdaptTrainResult:
    """Train ``model`` (its trunk warm-started beforehand when ``cfg.warm_start``) end to end on ``tr``,
    early-stopped on ``va``; see the module docstring. Deterministic given the inputs and ``cfg.seed``."""
    start = time.perf_counter()
    obj = objective(cfg.objective)
    rng = np.random.default_rng(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        emb = TargetEmbeddings(model.d_adapted, tr.Y.shape[1], cfg.objective.temperature) \
            if obj.needs_embedding else None
        opt = optimiser(model, emb, cfg)
        best = first = evaluate(model, emb, va, obj)
        state, history, stale = copy.deepcopy((model.state_dict(), emb and emb.state_dict())), [], 0
        log.info("%s: start, val loss %.5f (%d train rows, %d val rows, %s)", label, best, len(tr), len(va),
                 cfg.objective.label())
        steps = int(np.ceil(len(tr) / cfg.batch_size))
        checks = set(np.linspace(0, steps, cfg.evals_per_epoch + 1).round().astype(int)[1:].tolist())
        lengths = tr.mask.sum(axis=1)
        for epoch in range(cfg.max_epochs):
            batches, total, seen, said = minibatches(lengths, cfg.batch_size, rng, cfg.sortish), 0.0, 0, time.perf_counter()
            for step, idx in enumerate(batches, start=1):
                model.train()
                logits, e = model(*tr.tensors(idx))
                y = torch.as_tensor(tr.Y[idx].astype(np.float32))
                loss = obj(logits, y, None, emb(e)) if emb is not None else obj(logits, y, None)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
                if time.perf_counter() - said > cfg.log_every_s:
                    said = time.perf_counter()
                    log.info("%s: epoch %d/%d, step %d/%d, train loss %.5f, %.0f s", label, epoch + 1, cfg.max_epochs,
                             step, steps, total / seen, said - start)
                if step not in checks:
                    continue
                val = evaluate(model, emb, va, obj)
                history.append({"epoch": epoch + (step / steps), "train_loss": total / seen, "val_loss": val})
                improved = val < best - cfg.min_delta
                if improved:
                    best, stale = val, 0
                    state = copy.deepcopy((model.state_dict(), emb and emb.state_dict()))
                else:
                    stale += 1
                log.info("%s: epoch %.2f, train loss %.5f, val loss %.5f%s, best %.5f, %.0f s", label,
                         history[-1]["epoch"], total / seen, val, " (best)" if improved else "", best,
                         time.perf_counter() - start)
                out_of_time = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
                if stale >= cfg.patience or out_of_time:
                    return finish(model, emb, state, best, first, history, start)
    return finish(model, emb, state, best, first, history, start)


def finish(model, emb, state, best, first, history, start) -> AdaptTrainResult:
    model.load_state_dict(state[0])
    if emb is not None:
        emb.load_state_dict(state[1])
    return AdaptTrainResult(model.eval(), emb, best, first, history, time.perf_counter() - start)


@dataclass
class AdaptedFit:
    """What :func:`fit_adapted` returns: the trained parts as the artifact holds them and the training record."""

    adapter: torch.nn.Module
    transform: object  # shared.trunk.FeatureTransform over [frozen blocks..., adapted blocks...]
    trunk: torch.nn.Module
    result: AdaptTrainResult


def fit_adapted(model_lm: torch.nn.Module, spec, windows: AdaptInputs, frozen_raw: dict[str, np.ndarray],
                fit_rows: np.ndarray, stop_rows: np.ndarray, n_components: int, cfg: AdaptTrainConfig,
                label: str = "adapt") -> AdaptedFit:
    """Adapted blocks ``spec`` (:class:`shared.adapter.AdapterSpec`) copied from ``model_lm`` (the encoder's causal
    LM), trained with a trunk on rows ``fit_rows`` of ``windows`` (its ``dense`` is ignored: the frozen blocks
    ``frozen_raw`` ``{block: (n, d)}`` get a standardise->PCA fitted on ``fit_rows``), early-stopped on
    ``stop_rows``. Every transform is fitted on ``fit_rows`` only."""
    from shared.adapter import AdaptedTop
    from shared.trunk import FeatureTransform
    from training.adapt.model import AdaptedRouter, adapted_transform, artifact_parts

    adapter = AdaptedTop.from_model(model_lm, spec)
    for p in adapter.parameters():
        p.requires_grad_(True)
    frozen = FeatureTransform.fit({b: x[fit_rows] for b, x in frozen_raw.items()}, n_components=n_components,
                                  seed=cfg.seed) if frozen_raw else None
    n = len(windows)
    dense = frozen.transform(frozen_raw) if frozen else np.zeros((n, 0), dtype=np.float32)
    rows = AdaptInputs(windows.states, windows.mask, windows.n_tokens, dense, windows.Y)
    adapted, feats = adapted_transform(adapter, rows, fit_rows, n_components, cfg.seed)
    model = AdaptedRouter(adapter, adapted.blocks, dense.shape[1], windows.Y.shape[1], cfg.hidden, cfg.dropout)
    tr, va = rows.take(fit_rows), rows.take(stop_rows)
    if cfg.warm_start:
        z = adapted.transform(feats)
        warm_start(model, z[fit_rows], z[stop_rows], tr, va, cfg)
        log.info("%s: trunk warm-started on the untrained blocks' features", label)
    result = train_adapted(model, tr, va, cfg, label)
    transform, trunk = artifact_parts(result.model, frozen, adapted)
    return AdaptedFit(result.model.adapter.eval(), transform, trunk, result)
