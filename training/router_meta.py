"""What a router artifact records about its training, shared by the stages that write one (``fit``,
``adapt``): the encoder's identity from the capture manifest, the target table (registry prices, median
answer length on train), validation metrics and the best single target on train.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from shared import storage
from shared.errors import BadInput
from training.dataset import RoutingData


def encoder_info(activations_uri: str) -> dict[str, Any]:
    """The encoder identity recorded in the capture manifest."""
    manifest = storage.read_json(storage.join(activations_uri, "manifest.json"))
    enc = manifest.get("encoder") or manifest.get("identity", {}).get("encoder")
    if isinstance(enc, str):
        enc = {"name": enc}
    if not isinstance(enc, dict) or "name" not in enc:
        raise BadInput(f"{activations_uri}/manifest.json does not name its encoder")
    return {k: enc.get(k) for k in ("name", "sha256", "revision", "chat_template")}


def target_table(data: RoutingData, registry_path: str | None) -> list[dict[str, Any]]:
    """Prices from the registry and the median answer length of each target on train."""
    from shared.registry import load_registry

    registry = load_registry(registry_path)
    rows = []
    for t, name in enumerate(data.targets):
        spec = registry.get(name)
        out_tok = data.output_tokens[:, t]
        median = float(np.nanmedian(out_tok)) if np.isfinite(out_tok).any() else 0.0
        rows.append({"name": name, "price_in": spec.price_input_per_m, "price_out": spec.price_output_per_m,
                     "median_output_tokens": median})
    return rows


def val_metrics(P: np.ndarray, Y: np.ndarray, targets: list[str]) -> dict[str, Any]:
    """Per-target val AUC, Brier and log-loss of ``P`` against ``Y`` ``(n, T)``, soft labels as they
    are (:mod:`training.metrics`), and the mean AUC."""
    from training.metrics import brier, log_loss, masked_auc

    auc, br, ll = masked_auc(Y, P), brier(Y, P), log_loss(Y, P)
    return {"val_auc": dict(zip(targets, map(float, auc))), "val_brier": dict(zip(targets, map(float, br))),
            "val_log_loss": dict(zip(targets, map(float, ll))), "val_mean_auc": float(np.nanmean(auc))}


def best_single_record(train: RoutingData) -> dict[str, Any]:
    """The best single target on the train rows, as ``evaluate``'s ``always-best`` picks it
    (``training.metrics.best_target`` on each target's accuracy and mean label cost; ties: the
    cheaper): ``{"target", "accuracy", "mean_cost", "rows": "train", "n"}``. Kept in the
    artifact's training metrics, so an evaluation on a table without train rows still has its
    ``always-best``."""
    from training.metrics import best_target

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a target with no label: nan
        accs, costs = np.nanmean(train.Y, axis=0), np.nanmean(train.cost, axis=0)
    j = best_target(accs, np.nan_to_num(costs, nan=np.inf))
    return {"target": train.targets[j], "accuracy": float(accs[j]), "mean_cost": float(costs[j]), "rows": "train",
            "n": int(len(train.query_ids))}
