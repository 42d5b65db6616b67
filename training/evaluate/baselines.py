"""Routers compared by ``prefill-router evaluate``, behind one small interface.

A router is fitted on the **train** split (tuned on **val**) and then either

- *probabilistic* (``probabilistic = True``): ``predict_proba(data, text) -> (n, T)``
  P(correct) per target, routed through the same tolerance policy and sweep as the
  prefill router (:func:`training.evaluate.routing_metrics.tolerance_sweep`); or
- *fixed-choice*: ``choice_weights(data, text) -> (n, T)`` rows summing to 1, the
  probability of sending query ``i`` to target ``j`` (one point, scored with
  :func:`training.evaluate.routing_metrics.expected_outcome`).

Implemented: :class:`RandomRouter`, :class:`AlwaysCheapest`, :class:`AlwaysBest`,
:class:`KNNRouter` and :class:`MLPRouter` (semantic, over sentence embeddings),
:class:`MFRouter` (RouteLLM-style matrix factorisation), :class:`TaskBestRouter` (a
reference told each query's task) and :class:`ArtifactRouter` (the prefill router, from
its artifact). A new router is a subclass with ``fit`` and
one of the two prediction methods.
"""

from __future__ import annotations

import warnings

from typing import Sequence

import numpy as np

from shared.errors import BadInput
from training.dataset import RoutingData

from training.embedder import Embedder


class RouterModel:
    """Base class: ``fit`` on train (``val`` for tuning / early stopping), then predict."""

    name: str = "router"
    probabilistic: bool = True

    def fit(self, train: RoutingData, train_text: Sequence[str], val: RoutingData | None = None,
            val_text: Sequence[str] | None = None) -> "RouterModel":
        return self

    def predict_proba(self, data: RoutingData, text: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} is a fixed-choice router")

    def choice_weights(self, data: RoutingData, text: Sequence[str]) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} is a probabilistic router")


def _mean_costs(data: RoutingData) -> np.ndarray:
    """``(T,)`` mean label cost per target over rows where it is known."""
    with np.errstate(invalid="ignore"):
        return np.nanmean(np.where(np.isnan(data.cost), np.nan, data.cost), axis=0)


class _OneTarget(RouterModel):
    """Always one target: ``index``, chosen by ``fit`` on train or given (a target known without
    train rows, e.g. from the router artifact's prices or its recorded best single model)."""

    probabilistic = False

    def __init__(self, index: int | None = None):
        self.index = index

    def choice_weights(self, data: RoutingData, text: Sequence[str]) -> np.ndarray:
        if self.index is None:
            raise BadInput(f"{self.name}: no target (neither fitted on train rows nor given)")
        W = np.zeros((len(data.query_ids), len(data.targets)))
        W[:, self.index] = 1.0
        return W


class RandomRouter(RouterModel):
    """Uniform random choice; scored as the expected value (no sampling noise)."""

    name, probabilistic = "random", False

    def choice_weights(self, data: RoutingData, text: Sequence[str]) -> np.ndarray:
        T = len(data.targets)
        return np.full((len(data.query_ids), T), 1.0 / T)


class AlwaysCheapest(_OneTarget):
    """Always the target with the lowest mean cost on train."""

    name = "always-cheapest"

    def fit(self, train, train_text, val=None, val_text=None):
        self.index = int(np.nanargmin(_mean_costs(train)))
        return self


class AlwaysBest(_OneTarget):
    """Always the most accurate target on train (ties: cheaper)."""

    name = "always-best"

    def fit(self, train, train_text, val=None, val_text=None):
        from training.evaluate.routing_metrics import best_single

        costs = np.nan_to_num(_mean_costs(train), nan=np.inf)
        self.index = best_single(train.Y, costs)[0]
        return self


class TaskBestRouter(RouterModel):
    """Reference, not a deployable router: it is told each query's task (``task`` /
    ``source`` of the query table) and sends the query to the target that was most accurate
    on that task's train + val rows (ties: cheaper). A task with fewer than ``min_rows`` fitting
    rows, or one it never saw, goes to its source's pooled group when one was fitted (an MMLU
    subject to ``mmlu``), else to the best single target of train + val. It bounds what coarse,
    task-level routing can gain; a router that sees only the prompt has to beat it per query."""

    name, probabilistic = "task-best", False

    def __init__(self, tasks: dict[str, tuple[str, str]], min_rows: int = 50):
        self.tasks, self.min_rows, self.choice, self.from_artifact = tasks, min_rows, {}, False
        self.means: dict[str, np.ndarray] = {}  # group -> (T,) mean score per target on train + val

    def _meta(self, data: RoutingData) -> tuple[list[str], list[str]]:
        missing = [q for q in data.query_ids if q not in self.tasks]
        if missing:
            raise BadInput(f"task-best: {len(missing)} query ids have no task (e.g. {missing[:3]})")
        return [self.tasks[q][1] for q in data.query_ids], [self.tasks[q][0] for q in data.query_ids]

    def fit(self, train, train_text, val=None, val_text=None):
        from training.evaluate.headroom import big_tasks, task_groups
        from training.evaluate.routing_metrics import best_single

        parts = [train] if val is None else [train, val]
        Y, cost = np.concatenate([p.Y for p in parts]), np.concatenate([p.cost for p in parts])
        meta = [self._meta(p) for p in parts]
        tasks, sources = sum((m[0] for m in meta), []), sum((m[1] for m in meta), [])
        self.big = big_tasks(tasks, self.min_rows)
        groups = task_groups(tasks, sources, self.big)
        costs = np.where(np.isnan(cost), np.nanmean(cost, axis=0), cost)
        self.default = best_single(Y, costs)[0]
        self.choice = {g: best_single(Y[groups == g], costs[groups == g])[0] for g in np.unique(groups)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a target never labelled in a group: nan
            self.means = {"": np.nanmean(Y, axis=0)} | {g: np.nanmean(Y[groups == g], axis=0) for g in self.choice}
        return self

    def record(self, names: Sequence[str]) -> dict:
        """What it learnt, by target name (JSON): written into the router artifact by evaluate, so a
        table without train rows (a held-out check) is scored against the same task-level choices."""
        means = {str(g): {t: _finite(m[j]) for j, t in enumerate(names)} for g, m in self.means.items()}
        return {"groups": {str(g): names[i] for g, i in self.choice.items()}, "default": names[self.default],
                "big": sorted(map(str, self.big)), "min_rows": self.min_rows, "means": means}

    @classmethod
    def from_record(cls, tasks: dict[str, tuple[str, str]], record: dict, names: Sequence[str]) -> "TaskBestRouter":
        """A fitted router from :meth:`record` (``names``: the targets' order of the rows scored)."""
        out = cls(tasks, int(record.get("min_rows", 50)))
        out.big, out.default = set(record["big"]), list(names).index(record["default"])
        out.choice = {g: list(names).index(t) for g, t in record["groups"].items()}
        out.means = {g: np.array([np.nan if m.get(t) is None else m[t] for t in names], dtype=np.float64)
                     for g, m in record.get("means", {}).items()}  # absent in records before the pairwise AUC
        out.from_artifact = True
        return out

    def groups(self, data: RoutingData) -> np.ndarray:
        """``(n,)`` the fitted routing group of each row (a small or unseen task: its source)."""
        from training.evaluate.headroom import task_groups

        return task_groups(*self._meta(data), self.big)

    def scores(self, data: RoutingData) -> np.ndarray | None:
        """``(n, T)`` each row's group mean score per target on train + val (an unseen group: the
        pooled mean): the task-aware reference as a scorer, for the pairwise AUC. None when the
        fitted record holds no means."""
        if not self.means:
            return None
        pooled = np.nan_to_num(self.means[""], nan=0.0)
        rows = np.stack([self.means.get(g, pooled) for g in self.groups(data)])
        return np.where(np.isnan(rows), pooled, rows)

    def choice_weights(self, data, text):
        W = np.zeros((len(data.query_ids), len(data.targets)))
        for i, g in enumerate(self.groups(data)):
            W[i, self.choice.get(g, self.default)] = 1.0
        return W


def _finite(x: float) -> float | None:
    """``x`` as a float, None (JSON null) for nan."""
    return float(x) if np.isfinite(x) else None


class ArtifactRouter(RouterModel):
    """The prefill router: a loaded :class:`shared.artifact.Router`, reading the activation
    columns of its blocks (:mod:`shared.features` names both alike)."""

    name = "prefill-router"

    def __init__(self, router):
        self.router = router

    @classmethod
    def load(cls, uri: str) -> "ArtifactRouter":
        from shared.artifact import load_artifact

        return cls(load_artifact(uri))

    def predict_proba(self, data: RoutingData, text: Sequence[str]) -> np.ndarray:
        cols = self.router.block_names
        missing = sorted(c for c in cols if c not in data.blocks)
        if missing:
            raise BadInput(f"the artifact needs activation columns {missing}; the data has {sorted(data.blocks)}")
        return self.router.predict_proba({c: data.blocks[c] for c in cols})


class SemanticRouter(RouterModel):
    """Base of routers over a text embedding ``embedder(texts) -> (n, d)``."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def embed(self, text: Sequence[str]) -> np.ndarray:
        return np.asarray(self.embedder(list(text)), dtype=np.float32)


def knn_proba(E_query: np.ndarray, E_train: np.ndarray, Y_train: np.ndarray, k: int) -> np.ndarray:
    """Mean present label of the ``k`` nearest train rows by cosine similarity, per target;
    a target with no labelled neighbour gets its train mean. ``(n, T)``."""
    def unit(E):
        return E / np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)

    sim = unit(E_query) @ unit(E_train).T
    k = min(k, E_train.shape[0])
    idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    neigh = Y_train[idx]  # (n, k, T)
    present = ~np.isnan(neigh)
    counts = present.sum(axis=1)
    sums = np.where(present, neigh, 0.0).sum(axis=1)
    prior = np.nan_to_num(np.nanmean(Y_train, axis=0), nan=0.5)
    return np.where(counts > 0, sums / np.maximum(counts, 1), prior)


class KNNRouter(SemanticRouter):
    """kNN over sentence embeddings; ``k`` chosen on val by mean masked Brier score."""

    name = "knn-minilm"

    def __init__(self, embedder: Embedder, ks: Sequence[int] = (5, 10, 20, 40, 80)):
        super().__init__(embedder)
        self.ks, self.k = list(ks), int(ks[0])

    def fit(self, train, train_text, val=None, val_text=None):
        from training.metrics import brier

        self.E, self.Y = self.embed(train_text), np.asarray(train.Y, dtype=np.float64)
        if val is not None and len(val.query_ids) and len(self.ks) > 1:
            Ev = self.embed(val_text)
            scores = [float(np.nanmean(brier(val.Y, knn_proba(Ev, self.E, self.Y, k)))) for k in self.ks]
            self.k = int(self.ks[int(np.nanargmin(scores))])
            self.val_brier = dict(zip(map(str, self.ks), scores))
        return self

    def predict_proba(self, data, text):
        return knn_proba(self.embed(text), self.E, self.Y, self.k)


class MLPRouter(SemanticRouter):
    """The prefill router's recipe (scaler + PCA, SharedTrunkNet seed ensemble, early stop
    on val) over sentence embeddings instead of activations: isolates the features."""

    name = "mlp-minilm"

    def __init__(self, embedder: Embedder, seeds: int = 3, keep: int = 3, n_components: int | None = 128,
                 trunk=None):
        super().__init__(embedder)
        self.seeds, self.keep, self.n_components, self.trunk = seeds, keep, n_components, trunk

    def fit(self, train, train_text, val=None, val_text=None):
        from shared.trunk import FeatureTransform
        from training.loop import build_ensemble, select_ensemble, train_one

        if val is None or not len(val.query_ids):
            raise BadInput("MLPRouter needs a val split for early stopping")
        self.transform = FeatureTransform.fit({"text": self.embed(train_text)}, n_components=self.n_components)
        Xtr = self.transform.transform({"text": self.embed(train_text)})
        Xva = self.transform.transform({"text": self.embed(val_text)})
        results = [train_one(Xtr, train.Y, None, Xva, val.Y, None, seed=s, cfg=self.trunk) for s in range(self.seeds)]
        self.ensemble = build_ensemble(select_ensemble(results, min(self.keep, len(results))))
        return self

    def predict_proba(self, data, text):
        return self.ensemble.predict_proba(self.transform.transform({"text": self.embed(text)}))


def mf_net(d_in: int, n_targets: int, dim: int):
    """The matrix-factorisation scorer ``logit[i, t] = w . (P q_i * v_t / |v_t|) + b_t``
    (a torch module; torch is imported here, not when this file is imported)."""
    import torch

    class MFNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, dim, bias=False)                          # P
            self.targets = torch.nn.Parameter(torch.randn(n_targets, dim) / dim**0.5)  # v_t
            self.w = torch.nn.Linear(dim, 1, bias=False)                                # w
            self.bias = torch.nn.Parameter(torch.zeros(n_targets))                      # b_t

        def forward(self, x):
            q = self.proj(x)                                                            # (n, dim)
            v = torch.nn.functional.normalize(self.targets, dim=1)                      # (T, dim)
            return self.w(q[:, None, :] * v[None]).squeeze(-1) + self.bias              # (n, T)

    return MFNet()


class MFRouter(SemanticRouter):
    """RouteLLM-style matrix factorisation over sentence embeddings: a learned projection
    of the query and one embedding per target; masked BCE; Adam; early stop on val loss."""

    name = "mf-minilm"

    def __init__(self, embedder: Embedder, dim: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4,
                 batch_size: int = 256, max_epochs: int = 300, patience: int = 20, seed: int = 0):
        super().__init__(embedder)
        self.dim, self.lr, self.weight_decay, self.batch_size = dim, lr, weight_decay, batch_size
        self.max_epochs, self.patience, self.seed = max_epochs, patience, seed

    def fit(self, train, train_text, val=None, val_text=None):
        from training.loop import early_stopping

        if val is None or not len(val.query_ids):
            raise BadInput("MFRouter needs a val split for early stopping")
        Xtr, Xva = (self.embed(t) for t in (train_text, val_text))
        out = early_stopping(lambda: mf_net(Xtr.shape[1], train.Y.shape[1], self.dim), (Xtr, train.Y, None),
                             (Xva, val.Y, None), self.seed, lr=self.lr, weight_decay=self.weight_decay,
                             batch_size=self.batch_size, max_epochs=self.max_epochs, patience=self.patience,
                             min_delta=1e-6)
        self.net, self.val_loss = out.net, out.val_loss
        return self

    def predict_proba(self, data, text):
        import torch

        with torch.no_grad():
            return torch.sigmoid(self.net(torch.as_tensor(self.embed(text)))).double().numpy()
