"""``prefill-router tune``: choose the trunk's blocks and PCA size by cross-validation on
train + val (never test), with the semantic embedding scored the same way for reference.

Each candidate (a block list and ``n_components``) is scored by :func:`cv_scores`: K folds
grouped by ``group_id`` (variants of one source item stay in one fold); in each fold the
standardise->PCA transform is fitted on the training folds only, an ensemble of
SharedTrunkNets is trained on 85% of them and early-stopped on the other 15%, and the
per-target AUC (with Brier and log-loss beside it) is measured on the held-out fold, on the
soft labels as they are (no threshold: a score ``y`` counts ``y`` right, ``1 - y`` wrong).
With ``minilm: true`` the MiniLM sentence embedding (the semantic baselines' input) goes
through the same protocol, so the prefill-over-semantic margin is known before any test
number is looked at.

The chosen candidate (:func:`choose_candidate`) is the best mean CV AUC, or with
``depth_tolerance`` > 0 the shallowest near-best one, as ``probe`` chooses blocks.
Writes ``tune.json`` and ``tune.png`` (mean CV AUC per candidate, one bar per target).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydantic import Field

from shared import storage
from shared.cli_utils import config_command, console, run_cli
from shared.config import StrictConfig
from shared.errors import BadInput
from training.loop import TrunkConfig
from training.dataset import RoutingData, RoutingDataConfig
from training.fit.probe import choice_rows, save_figure

MINILM = "minilm"


class Candidate(StrictConfig):
    """One configuration of the trunk's input features."""

    blocks: list[str] | Literal["probe"] = Field(
        description="Activation columns, 'probe' (the probe report's selection) or [minilm] (sentence embedding).")
    n_components: int = Field(gt=0, description="PCA components per block (fitted on the training folds only).")


class TuneConfig(RoutingDataConfig):
    """Config of ``prefill-router tune``."""

    targets: list[str] = Field(description="Targets, in the order of the router's outputs.")
    queries: str | None = Field(None, description="Query table: folds grouped by group_id; needed for minilm.")
    probe_report: str | None = Field(None, description="probe.json for candidates whose blocks are 'probe'.")
    candidates: list[Candidate] = Field(min_length=1, description="Feature configurations to compare.")
    minilm: bool = Field(False, description="Also score the MiniLM embedding (as the semantic MLP baseline sees it).")
    minilm_components: int = Field(128, gt=0, description="PCA components of the MiniLM candidate.")
    out: str = Field("runs/tune", description="Output directory (local path) for tune.json and tune.png.")
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], description="Splits used; never test.")
    folds: int = Field(5, ge=2, description="Cross-validation folds.")
    seeds: int = Field(3, gt=0, description="Ensemble members per fold (all kept).")
    early_stop_share: float = Field(0.15, gt=0, lt=1, description="Share of the training folds for early stopping.")
    trunk: TrunkConfig = Field(default_factory=TrunkConfig, description="SharedTrunkNet network and optimiser.")
    depth_tolerance: float = Field(
        0.0, ge=0, description="Prefer a shallower encoder: among candidates whose mean CV AUC is within this of "
        "the best, choose the one whose deepest layer is shallowest (then the best AUC), as probe does.")
    seed: int = Field(0, description="Seed of the fold split and the early-stopping split.")


def fold_predictions(blocks: dict[str, np.ndarray], Y: np.ndarray, groups: np.ndarray, n_components: int,
                     trunk: TrunkConfig, folds: int = 5, seeds: int = 3, early_stop_share: float = 0.15,
                     seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per fold ``f`` (GroupKFold over ``groups``): ``(held_f, P_f)``, the held-out row indices and
    ``(len(held_f), T)`` predictions of a SharedTrunkNet ensemble that never saw them.

    ``blocks``: ``{name: (n, d_b)}``; ``Y``: ``(n, T)`` in [0, 1] with NaN = missing. The
    standardise->PCA transform is fitted on the training folds only; ``seeds`` members are
    trained on a ``1 - early_stop_share`` part of them and early-stopped on the rest;
    ``P_f = mean_s sigmoid(net_s(X[held_f]))``.
    """
    from sklearn.model_selection import GroupKFold

    from shared.trunk import FeatureTransform

    from training.loop import build_ensemble, train_one

    for k, (fit_idx, held) in enumerate(GroupKFold(n_splits=folds).split(Y, groups=groups)):
        perm = np.random.default_rng(seed + k).permutation(fit_idx)
        cut = max(1, int(round((1 - early_stop_share) * len(perm))))
        tr, es = perm[:cut], perm[cut:]
        transform = FeatureTransform.fit({b: x[tr] for b, x in blocks.items()}, n_components=n_components, seed=seed)
        X = transform.transform(blocks)
        members = [train_one(X[tr], Y[tr], None, X[es], Y[es], None, seed=seed + s, cfg=trunk) for s in range(seeds)]
        yield held, build_ensemble(members).predict_proba(X[held])


def cv_scores(blocks: dict[str, np.ndarray], Y: np.ndarray, groups: np.ndarray, n_components: int,
              trunk: TrunkConfig, folds: int = 5, seeds: int = 3, early_stop_share: float = 0.15,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Cross-validated scores of a SharedTrunkNet ensemble per target, each ``(T,)``, the mean over
    folds (NaN-skipping) of :func:`fold_predictions`' held-out predictions (same arguments and
    shapes): ``auc`` (``masked_auc(Y[held_f], P_f)``), ``brier`` and ``log_loss``. All three read
    soft labels as they are (:mod:`training.metrics`: a score ``y`` counts ``y`` right and
    ``1 - y`` wrong; no threshold)."""
    from training.metrics import brier, log_loss, masked_auc

    per_fold = [(masked_auc(Y[held], P), brier(Y[held], P), log_loss(Y[held], P)) for held, P in
                fold_predictions(blocks, Y, groups, n_components, trunk, folds, seeds, early_stop_share, seed)]
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a target with no score in any fold -> nan
        means = np.nanmean(np.asarray(per_fold, dtype=np.float64), axis=0)  # (3, T)
    return dict(zip(("auc", "brier", "log_loss"), means))


def choose_candidate(rows: Sequence[dict[str, Any]], depth_tolerance: float = 0.0) -> dict[str, Any]:
    """The chosen row: among rows with ``mean_auc >= max(mean_auc) - depth_tolerance``, the
    smallest deepest layer (``max`` of the blocks' layer indices), then the highest ``mean_auc``.
    MiniLM rows and rows whose ``mean_auc`` is NaN (no fold had both classes) are never chosen."""
    from shared.features import parse_block

    rows = [r for r in rows if r["blocks"] != [MINILM] and np.isfinite(r["mean_auc"])]
    if not rows:
        raise BadInput("no prefill candidate has a cross-validated AUC (too few rows, or a target "
                         "with one class only in every fold?)")
    top = max(r["mean_auc"] for r in rows)
    near = [r for r in rows if r["mean_auc"] >= top - depth_tolerance]
    return min(near, key=lambda r: (max(parse_block(b)[0] for b in r["blocks"]), -r["mean_auc"]))


def fold_groups(data: RoutingData, queries: str | None) -> np.ndarray:
    """``(n,)`` ``group_id`` per row from the query table (the query id where there is none)."""
    if not queries:
        return np.asarray(data.query_ids)
    table = storage.read_parquet(queries, columns=["query_id", "group_id"])
    gid = dict(zip(table.column("query_id").to_pylist(), table.column("group_id").to_pylist()))
    return np.array([gid.get(q) or q for q in data.query_ids], dtype=object)


def candidate_blocks(cand: Candidate, cfg: TuneConfig) -> list[str]:
    if cand.blocks != "probe":
        return list(cand.blocks)
    if not cfg.probe_report:
        raise BadInput("a candidate uses blocks: probe, but probe_report is not set")
    return list(storage.read_json(cfg.probe_report)["selected"]["blocks"])


def minilm_block(data: RoutingData, queries: str | None) -> np.ndarray:
    """``(n, 384)`` MiniLM embeddings of the rows' prompts as the semantic baselines embed them
    (:func:`training.semantic_text.semantic_texts` with the default settings; shared prefixes
    learned from the train rows)."""
    from training.embedder import MiniLMEmbedder
    from training.semantic_text import semantic_texts_for

    if not queries:
        raise BadInput("minilm needs the query table: set queries=<path to queries.parquet>")
    texts, _ = semantic_texts_for(queries, list(data.query_ids), np.asarray(data.split) == "train")
    return MiniLMEmbedder()(texts)


def plot_tune(rows: list[dict[str, Any]], targets: list[str], path: Path) -> None:
    """Horizontal bars: mean CV AUC per candidate, with each target's AUC as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [r["label"] for r in rows]
    ax.barh(labels, [r["mean_auc"] for r in rows], color="#9ab")
    for name in targets:
        ax.plot([r["auc"][name] for r in rows], labels, "o", ms=4, label=name)
    low = min(min(r["auc"].values()) for r in rows)
    ax.set_xlim(max(0.0, low - 0.05), 1.0)
    ax.set_xlabel(f"cross-validated AUC on train + val (bar: mean over {len(targets)} targets)")
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def run_tune(cfg: TuneConfig, data: RoutingData | None = None) -> dict[str, Any]:
    """Score every candidate (and MiniLM when asked); write ``tune.json`` and ``tune.png``."""
    from rich.progress import track

    data = choice_rows(cfg, data, "tuning chooses the configuration: it")
    if len(data.query_ids) < cfg.folds:
        raise BadInput(f"{len(data.query_ids)} rows in splits {cfg.splits}: fewer than folds={cfg.folds}")
    groups = fold_groups(data, cfg.queries)
    jobs = [(f"{'+'.join(names)} / {c.n_components}", names, c.n_components)
            for c, names in ((c, candidate_blocks(c, cfg)) for c in cfg.candidates)]
    blocks = dict(data.blocks)
    if cfg.minilm:
        blocks[MINILM] = minilm_block(data, cfg.queries)
        jobs.append((f"{MINILM} / {cfg.minilm_components} (semantic)", [MINILM], cfg.minilm_components))
    missing = sorted({b for _, names, _ in jobs for b in names} - set(blocks))
    if missing:
        raise BadInput(f"unknown blocks {missing}; the activations have {sorted(data.blocks)}")
    rows = []
    for label, names, k in track(jobs, description="cross-validating"):
        scores = cv_scores({b: blocks[b] for b in names}, data.Y, groups, k, cfg.trunk, cfg.folds, cfg.seeds,
                           cfg.early_stop_share, cfg.seed)
        rows.append({"label": label, "blocks": names, "n_components": k,
                     **{f"mean_{name}": _nanmean(v) for name, v in scores.items()},
                     **{name: dict(zip(data.targets, map(float, v))) for name, v in scores.items()}})
    best = choose_candidate(rows, cfg.depth_tolerance)
    out = {"config": cfg.model_dump(mode="json"), "n_rows": int(len(data.query_ids)), "candidates": rows,
           "best": best}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    storage.write_json(str(Path(cfg.out) / "tune.json"), out)
    plot_tune(rows, data.targets, Path(cfg.out) / "tune.png")
    console.print(tune_table(rows))
    console.print(f"chosen (depth tolerance {cfg.depth_tolerance}): {best['label']} (mean CV AUC "
                  f"{best['mean_auc']:.4f}); report in {cfg.out}/tune.json")
    return out


def _nanmean(values: np.ndarray) -> float:
    """``np.nanmean`` of ``values``; nan, without a warning, when all are NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values))


def tune_table(rows: Sequence[dict[str, Any]]):
    """Per candidate: mean CV AUC (the choice), mean Brier and log-loss, and each target's AUC."""
    from rich.table import Table

    view = Table(title="cross-validated AUC (train + val; soft labels as they are)")
    view.add_column("candidate")
    for col in ("mean AUC", "Brier", "log-loss"):
        view.add_column(col, justify="right")
    for t in rows[0]["auc"]:
        view.add_column(t, justify="right")
    for r in rows:
        view.add_row(r["label"], f"{r['mean_auc']:.4f}", f"{r['mean_brier']:.4f}", f"{r['mean_log_loss']:.4f}",
                     *(f"{a:.4f}" for a in r["auc"].values()))
    return view


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router tune", argv, config_command(
        TuneConfig, run_tune, "Compare block sets and PCA sizes by cross-validated AUC on train + val."))
