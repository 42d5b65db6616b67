"""A real router artifact for the serving tests.

Uses the committed reference artifact (``data/router``) when it is there; otherwise
trains a small one: real SmolLM2 prefill features of multiple-choice queries and real
labels (answer-option log-likelihood of SmolLM2 and Gemma), a small SharedTrunkNet.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REFERENCE = Path(__file__).resolve().parent.parent / "data" / "router"


def small_artifact(out: Path, n_queries: int = 24) -> str:
    from shared.artifact import ArtifactMeta, save_artifact
    from shared.config import load_config
    from shared.models import load_causal_lm
    from shared.registry import load_registry
    from shared.trunk import FeatureTransform, TrunkConfig, build_ensemble, train_one
    from training.backends import TransformersScorer
    from training.data import DataConfig, build_queries
    from training.encoder import Encoder

    table, _ = build_queries(load_config(DataConfig, None, [f"mmlu.n={4 * n_queries}", "reasoning_gym=[]"]))
    # The shortest prompts: the serving tests need a real artifact, not a good one (2 CPUs).
    rows = sorted(table.to_pylist(), key=lambda r: sum(len(m["content"]) for m in r["messages"]))[:n_queries]
    registry = load_registry()
    targets = ["smollm2-135m", "gemma3-270m"]
    Y = np.stack([[r["correct"] for r in TransformersScorer(registry.get(t), device="cpu").label(rows)]
                  for t in targets], axis=1).astype(np.float32)
    smol = registry.get("smollm2-135m")
    enc = Encoder(load_causal_lm(smol, device="cpu"), [10, 20], ["last"], batch_size=16)
    feats = enc.encode([r["messages"] for r in rows]).features
    transform = FeatureTransform.fit(feats, n_components=8)
    X = transform.transform(feats)
    cut = int(0.75 * len(rows))
    member = train_one(X[:cut], Y[:cut], None, X[cut:], Y[cut:], None, seed=0, cfg=TrunkConfig(max_epochs=20))
    meta = ArtifactMeta(
        encoder={"name": smol.name, "sha256": smol.sha256}, layers=[10, 20],
        pooling={c: "last" for c in feats},
        targets=[{"name": t, "price_in": registry.get(t).price_input_per_m,
                  "price_out": registry.get(t).price_output_per_m, "median_output_tokens": 1.0} for t in targets],
    )
    save_artifact(str(out), meta, transform, build_ensemble([member]))
    return str(out)


def router_artifact(tmp: Path) -> str:
    if (REFERENCE / "meta.json").is_file():
        return str(REFERENCE)
    return small_artifact(tmp / "router")
