"""``prefill-router probe``: which encoder layers (and poolings) predict each target.

For every captured block (layer x pooling) and every target, on the train + val splits
only (never test), with missing labels masked:

- Fisher separability J of correct vs incorrect activations (``separability.fisher_separability``;
  it needs two classes, so a soft score counts as correct at ``y >= 0.5``),
- effective dimensionality d_eff of the block (``separability.effective_dimensionality``),
- cross-validated logistic-probe AUC (``separability.probe_auc``), fitted and scored on the soft
  labels as they are (a score ``y`` weighs ``y`` as right and ``1 - y`` as wrong).

Selection: per target the block with the best probe AUC, and, for the shared trunk, the
``n_blocks`` blocks with the best mean AUC over targets (``depth_tolerance`` > 0 prefers
shallower blocks that are nearly as good: a shallower deepest layer is a cheaper decision). Writes ``probe.json`` and
``probe_layers.png`` (J, d_eff and AUC against depth, one line per target and pooling).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from shared import storage
from shared.cli_utils import config_command, console, run_cli
from shared.errors import BadInput
from shared.features import parse_block
from training.dataset import RoutingData, RoutingDataConfig, load_routing_data
from training.labels import RIGHT_AT

log = logging.getLogger(__name__)


LABEL_NOTE = ("the probe AUC is fitted and scored on the soft labels as they are; Fisher J and the folds' "
              f"stratification count a label as right at y >= {RIGHT_AT}")


class ProbeConfig(RoutingDataConfig):
    """Config of ``prefill-router probe``."""

    targets: list[str] = Field(description="Targets to probe (label sub-directories).")
    out: str = Field("runs/probe", description="Output directory (local path) for probe.json and plots.")
    splits: list[str] = Field(default_factory=lambda: ["train", "val"], description="Splits used; never test.")
    folds: int = Field(5, ge=2, description="Cross-validation folds of the logistic probe.")
    C: float = Field(1.0, gt=0, description="Inverse L2 strength of the logistic probe.")
    pca_dims: int | None = Field(64, gt=0, description="PCA before the probe (speed); None: raw features.")
    n_blocks: int = Field(2, gt=0, description="Blocks selected for the shared trunk.")
    depth_tolerance: float = Field(
        0.0, ge=0, description="Prefer shallower blocks: any block whose mean AUC is within this of the best "
        "is ranked by depth first (the serving encoder stops at the deepest selected layer).")
    seed: int = Field(0, description="Seed of the folds.")


def _probe_features(X: np.ndarray, dims: int | None, seed: int) -> np.ndarray:
    """Standardise, then (optionally) PCA to ``dims``: keeps the logistic probe fast and stable."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    Z = StandardScaler().fit_transform(X)
    if dims is None or dims >= min(Z.shape):
        return Z
    return PCA(n_components=dims, random_state=seed).fit_transform(Z)


def probe_block(X: np.ndarray, Y: np.ndarray, targets: list[str], cfg: ProbeConfig) -> dict[str, Any]:
    """Scores of one block ``X`` ``(n, d)`` against labels ``Y`` ``(n, T)`` in [0, 1] (NaN = missing):
    per target J (thresholded at ``y >= 0.5``), the soft probe AUC (nan unless each side of the
    threshold has ``folds`` rows), ``n``, ``positives`` (rows with ``y >= 0.5``) and ``mean_label``
    (the mean soft score)."""
    from training.fit.separability import effective_dimensionality, fisher_separability, probe_auc

    Z = _probe_features(X, cfg.pca_dims, cfg.seed)
    per_target = {}
    for t, name in enumerate(targets):
        known = ~np.isnan(Y[:, t])
        y = Y[known, t]
        right = (y >= RIGHT_AT).astype(int)
        enough = len(np.unique(right)) == 2 and min(np.bincount(right)) >= cfg.folds
        per_target[name] = {
            "J": float(fisher_separability(X[known], y)),
            "auc": float(probe_auc(Z[known], y, folds=cfg.folds, seed=cfg.seed, C=cfg.C)) if enough else float("nan"),
            "n": int(known.sum()),
            "positives": int(right.sum()),
            "mean_label": float(y.mean()) if len(y) else float("nan"),
        }
    return {"d_eff": float(effective_dimensionality(X)), "per_target": per_target}


def select_blocks(report: dict[str, dict], targets: list[str], n_blocks: int,
                  depth_tolerance: float = 0.0) -> dict[str, Any]:
    """Best block per target by AUC, and ``n_blocks`` blocks for the trunk (NaN-aware).

    Trunk blocks: rank by mean AUC over targets ``m_b``; blocks with
    ``m_b >= max_b m_b - depth_tolerance`` come first, shallowest layer first (ties: higher
    ``m_b``), then the rest by ``m_b``. ``depth_tolerance=0`` is plain best-mean-AUC order."""
    names = list(report)
    auc = np.array([[report[b]["per_target"][t]["auc"] for t in targets] for b in names])
    per_target = {}
    for j, t in enumerate(targets):
        col = auc[:, j]
        per_target[t] = names[int(np.nanargmax(col))] if np.isfinite(col).any() else None
    mean = np.where(np.isfinite(auc).any(axis=1), np.nanmean(np.where(np.isfinite(auc), auc, np.nan), axis=1), -1)
    order = np.argsort(-mean, kind="stable")
    near = [i for i in order if mean[i] >= mean[order[0]] - depth_tolerance] if depth_tolerance > 0 else []
    near.sort(key=lambda i: (parse_block(names[i])[0], -mean[i]))
    chosen = (near + [i for i in order if i not in near])[:n_blocks]
    return {"per_target": per_target, "blocks": [names[i] for i in chosen],
            "mean_auc": {names[i]: float(mean[i]) for i in order}}


def plot_layers(report: dict[str, dict], targets: list[str], path: Path) -> None:
    """J, d_eff and probe AUC against layer depth; one line per target and pooling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    poolings = sorted({parse_block(b)[1] for b in report})
    for pooling, style in zip(poolings, ("-", "--", ":")):
        blocks = sorted((b for b in report if parse_block(b)[1] == pooling), key=lambda b: parse_block(b)[0])
        layers = [parse_block(b)[0] for b in blocks]
        axes[1].plot(layers, [report[b]["d_eff"] for b in blocks], style, marker="o", label=pooling)
        for t in targets:
            axes[0].plot(layers, [report[b]["per_target"][t]["J"] for b in blocks], style, marker=".",
                         label=f"{t} ({pooling})")
            axes[2].plot(layers, [report[b]["per_target"][t]["auc"] for b in blocks], style, marker=".",
                         label=f"{t} ({pooling})")
    titles = (f"Fisher separability J (right: y >= {RIGHT_AT})", "effective dimensionality d_eff",
              "probe AUC (CV, soft labels)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("layer (hidden_states index; 0 = embeddings)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as a PNG (laid out tight) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def choice_rows(cfg: Any, data: RoutingData | None, chooser: str) -> RoutingData:
    """The rows a choice (of layers, of the configuration) sees: ``cfg.splits``, which must not hold test."""
    if "test" in cfg.splits:
        raise BadInput(f"{chooser} must not see the test split")
    return (data or load_routing_data(cfg.activations, cfg.labels, cfg.targets)).where(*cfg.splits)


ATTN_NOTE = ("not probed: J, d_eff and the probe AUC read one fixed vector per prompt, and a learned token "
             "pooling has none before it is trained; tune (or bench/pooling.py) scores it by cross-validated AUC")


def attn_note(activations: str) -> dict[str, str]:
    """``{h{layer}_attn: why it is not probed}`` for every token layer the capture kept (none: ``{}``)."""
    uri = storage.join(activations, "manifest.json")
    layers = (storage.read_json(uri).get("identity") or {}).get("token_layers", []) if storage.exists(uri) else []
    return {f"h{layer}_attn": ATTN_NOTE for layer in layers}


def run_probe(cfg: ProbeConfig, data: RoutingData | None = None) -> dict[str, Any]:
    """Probe every block; write ``probe.json`` and ``probe_layers.png`` under ``cfg.out``."""
    from shared.progress import Progress

    data = choice_rows(cfg, data, "probes choose layers: they")
    if len(data.query_ids) == 0:
        raise BadInput(f"no rows in splits {cfg.splits}")
    report = {}
    with Progress(len(data.blocks), "probe: probing layers", "blocks") as progress:
        for b in data.blocks:
            report[b] = probe_block(data.blocks[b], data.Y, data.targets, cfg)
            progress.update(1, detail=b)
    selected = select_blocks(report, data.targets, cfg.n_blocks, cfg.depth_tolerance)
    for b, scores in report.items():
        layer, pooling = parse_block(b)
        scores.update(layer=layer, pooling=pooling)
    out = {"config": cfg.model_dump(mode="json"), "n_rows": int(len(data.query_ids)), "blocks": report,
           "selected": selected, "labels": LABEL_NOTE, "attn_blocks": attn_note(cfg.activations)}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    storage.write_json(str(Path(cfg.out) / "probe.json"), out)
    plot_layers(report, data.targets, Path(cfg.out) / "probe_layers.png")
    console.print(f"selected blocks {selected['blocks']}; best per target {selected['per_target']}; "
                  f"report in {cfg.out}/probe.json")
    if not np.isin(data.Y[~np.isnan(data.Y)], (0.0, 1.0)).all():
        console.print(f"soft labels: {LABEL_NOTE}", highlight=False)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli("prefill-router probe", argv, config_command(
        ProbeConfig, run_probe, "Score every captured layer with J, d_eff and a cross-validated probe AUC."))
