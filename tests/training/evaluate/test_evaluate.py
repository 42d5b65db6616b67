"""Evaluation: baselines on tiny data, and the full evaluation on a synthetic RoutingData
with a real (small) router artifact fitted directly with shared.trunk / shared.artifact."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from shared.artifact import (ArtifactMeta, EncoderInfo, PolicyDefaults, TargetInfo, load_artifact, read_meta,
                             save_artifact)
from shared.policy import Policy
from shared.trunk import FeatureTransform
from training.loop import TrunkConfig, build_ensemble, train_one
from training.evaluate import routing_metrics as M
from training.metrics import masked_auc
from training.evaluate.baselines import (AlwaysBest, AlwaysCheapest, KNNRouter, MFRouter, RandomRouter, TaskBestRouter,
                                knn_proba)
from training.evaluate.headroom import big_tasks, headroom_by_group, task_groups
from training.dataset import RoutingData
from training.evaluate.run import EvalConfig, run_evaluation

PRICES = [(0.1, 0.4, 60.0), (1.0, 4.0, 120.0), (5.0, 15.0, 250.0)]  # price_in, price_out, output tokens
TARGETS = ["small", "mid", "big"]
SMALL_TRUNK = TrunkConfig(hidden=[32, 16], dropout=[0.1, 0.1], batch_size=128, max_epochs=40, patience=6)


def synthetic(n: int = 1200, seed: int = 0) -> RoutingData:
    """Labels depend on feature directions: a shared difficulty z (block h4_last) and a skill
    only "mid" has (block h8_mean); the big model is the most accurate on average."""
    rng = np.random.default_rng(seed)
    X1, X2 = rng.normal(size=(n, 24)), rng.normal(size=(n, 16))
    z, s = X1 @ (np.ones(24) / np.sqrt(24)), X2[:, 0]
    logits = np.stack([3.0 * z - 1.0, 2.0 * z + 2.5 * s - 0.3, 1.5 * z + 1.0], axis=1)
    Y = (rng.random((n, 3)) < 1 / (1 + np.exp(-logits))).astype(float)
    Y[rng.random((n, 3)) < 0.02] = np.nan
    tok_in = rng.integers(50, 300, size=n).astype(float)
    tok_out = np.stack([rng.poisson(o, size=n) for _, _, o in PRICES], axis=1).astype(float)
    cost = np.stack([(tok_in * pi + tok_out[:, j] * po) / 1e6 for j, (pi, po, _) in enumerate(PRICES)], axis=1)
    cost[np.isnan(Y)] = np.nan
    split = rng.choice(["train", "val", "test"], size=n, p=[0.55, 0.15, 0.30])
    return RoutingData(query_ids=np.array([f"q{i}" for i in range(n)]), split=split,
                       blocks={"h4_last": X1.astype(np.float32), "h8_mean": X2.astype(np.float32)},
                       targets=list(TARGETS), Y=Y, cost=cost, input_tokens=np.repeat(tok_in[:, None], 3, axis=1),
                       output_tokens=tok_out, n_tokens=tok_in)


def fit_artifact(data: RoutingData, uri: str) -> None:
    """A real small artifact over the blocks h4_last and h8_mean."""
    tr, va = data.where("train"), data.where("val")
    names = ["h4_last", "h8_mean"]
    transform = FeatureTransform.fit({k: tr.blocks[k] for k in names}, n_components=16)
    Xtr, Xva = (transform.transform({k: d.blocks[k] for k in names}) for d in (tr, va))
    ensemble = build_ensemble([train_one(Xtr, tr.Y, None, Xva, va.Y, None, seed=s, cfg=SMALL_TRUNK) for s in (0, 1)])
    meta = ArtifactMeta(
        encoder=EncoderInfo(name="smollm2-135m"), layers=[4, 8], pooling={"h4_last": "last", "h8_mean": "mean"},
        targets=[TargetInfo(name=t, price_in=pi, price_out=po, median_output_tokens=o)
                 for t, (pi, po, o) in zip(TARGETS, PRICES)],
        policy=PolicyDefaults(tolerance=0.2))
    save_artifact(uri, meta, transform, ensemble)


def TASKS(n: int) -> list[str]:  # noqa: N802 - the synthetic rows' tasks
    return ["alpha" if i % 3 else "beta" for i in range(n)]


def lookup_embedder(data: RoutingData, seed: int = 1):
    """Text (the query id) -> a noisy view of part of the features: a stand-in for MiniLM."""
    rng = np.random.default_rng(seed)
    table = np.concatenate([data.blocks["h4_last"][:, :8], data.blocks["h8_mean"][:, :2]], axis=1)
    table = table + rng.normal(scale=1.0, size=table.shape)
    index = {q: i for i, q in enumerate(data.query_ids)}
    return lambda texts: table[[index[t] for t in texts]].astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks train several times faster on one thread (and do not fight for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, one_thread):
    tmp = tmp_path_factory.mktemp("eval")
    data = synthetic()
    fit_artifact(data, str(tmp / "router"))
    cfg = EvalConfig(artifact=str(tmp / "router"), activations="unused", labels="unused", out=str(tmp / "out"),
                     operating_point={"target_accuracy": "best_single"}, mlp_seeds=1, n_components=8,
                     trunk=SMALL_TRUNK, knn_ks=[10, 30])
    report = run_evaluation(cfg, data=data, texts=list(data.query_ids), embedder=lookup_embedder(data),
                            tasks=TASKS(len(data.query_ids)))
    return data, cfg, report


def test_report_files_and_keys(evaluated):
    data, cfg, report = evaluated
    out = json.loads((Path(cfg.out) / "report.json").read_text())
    assert set(out) >= {"targets", "n", "disagreement_share", "operating_point", "subsets", "paper", "config"}
    for key in ("test", "disagreement"):
        refs = out["subsets"][key]["references"]
        assert set(refs) >= {"single", "best_single", "oracle", "most_expensive", "cheapest", "hull",
                             "zero_router_pauccc"}
        routers = out["subsets"][key]["routers"]
        assert set(routers) == {"prefill-router", "random", "always-cheapest", "always-best", "knn-minilm",
                                "mlp-minilm", "mf-minilm"}
        for r in routers.values():
            assert set(r) >= {"accuracy", "cost", "gap_closed", "cost_savings", "pauccc"}
            if r["kind"] == "probabilistic":
                assert set(r) >= {"auc", "brier", "mean_auc", "sweep", "policy", "param", "operating_point"}
                assert len(r["auc"]) == 3 and len(r["sweep"]["cost"]) == len(r["sweep"]["accuracy"]) > 1
                v = r["value_policy"]  # the same predictions under the value policy, swept end to end
                assert set(v) == {"pauccc", "max_gap_closed", "iso_accuracy_savings", "best_gap_closed_at_savings",
                                  "frontier"}
                assert 0 <= v["pauccc"] <= 1 and v["max_gap_closed"] <= 1
    md = (Path(cfg.out) / "report.md").read_text()
    assert "45.58%" in md and "74.31%" in md and "| prefill-router" in md and "oracle" in md
    margins = out["auc_margin"]
    assert set(margins) == {"knn-minilm", "mlp-minilm", "mf-minilm"} and "95% interval" in md
    for name, m in margins.items():
        test = out["subsets"]["test"]["routers"]
        assert m["margin"] == pytest.approx(test["prefill-router"]["mean_auc"] - test[name]["mean_auc"])
        assert m["low"] <= m["margin"] <= m["high"] and 0 <= m["p_le_zero"] <= 1
    inside, margins = out["within_task_auc"], out["auc_margin_within_task"]  # tasks alpha / beta
    assert set(inside) == set(margins) | {"prefill-router"} and "## Within-task AUC (test)" in md
    for name, m in margins.items():
        assert m["margin"] == pytest.approx(inside["prefill-router"]["mean_auc"] - inside[name]["mean_auc"])
        assert m["low"] <= m["margin"] <= m["high"]
    pairwise = out["pairwise_auc"]  # which target is better for a query, pooled and per task
    assert set(pairwise) == set(inside) and set(pairwise["prefill-router"]["by_task"]) == {"alpha", "beta"}
    assert set(out["pairwise_margin"]) == set(margins) and "## Which target is better (pairwise AUC, test)" in md
    for name in ("cost_accuracy.png", "cost_accuracy_disagreement.png"):
        png = Path(cfg.out) / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Per task (all test queries)" in md and "## Per task (disagreement queries only)" in md
    assert "best gap closed at >= 74.31% savings" in md and "Semantic baselines embedded the prompt" in md
    assert "## Tolerance or value policy (same predictions)" in md and "| prefill-router | value |" in md
    points = out["policy_operating_points"]["routers"]["prefill-router"]  # chosen on val, scored on test
    assert set(points) == {"tolerance", "value"} and "Operating point chosen on val" in md
    assert out["savings_threshold"] == 0.7431 and out["skipped_routers"] == {} and out["all_rows_test"] is False


def test_prefill_router_beats_trivial_routers(evaluated):
    _, _, report = evaluated
    ours, rnd, cheap = (report.router(name) for name in ("prefill-router", "random", "always-cheapest"))
    sweep = ours.sweep
    within = np.asarray(sweep.cost) <= rnd.cost + 1e-15
    assert np.nanmax(np.asarray(sweep.accuracy)[within]) > rnd.accuracy + 0.03
    # never worse than always-cheapest at its cost; strictly better at the operating point
    within = np.asarray(sweep.cost) <= cheap.cost + 1e-15
    assert np.nanmax(np.asarray(sweep.accuracy)[within]) >= cheap.accuracy - 1e-12
    assert ours.accuracy > cheap.accuracy + 0.05
    assert ours.pauccc > rnd.pauccc and ours.mean_auc > 0.7


def test_numbers_are_consistent_with_metrics(evaluated):
    data, cfg, report = evaluated
    te = data.where("test")
    router = load_artifact(cfg.artifact)
    P = router.predict_proba({"h4_last": te.blocks["h4_last"], "h8_mean": te.blocks["h8_mean"]})
    C_route = router.costs(te.n_tokens)
    C = np.where(np.isnan(te.cost), C_route, te.cost)
    ours = report.router("prefill-router")
    acc, cost = M.routing_outcome(te.Y, C, Policy.of(ours.policy, ours.param).route(P, C_route))
    assert acc == pytest.approx(ours.accuracy) and cost == pytest.approx(ours.cost)
    best, oracle = M.best_single(te.Y, C)[1], M.oracle_accuracy(te.Y)
    assert ours.gap_closed == pytest.approx(M.gap_closed(acc, best, oracle))
    assert ours.cost_savings == pytest.approx(M.cost_savings(cost, np.max(C.mean(axis=0))))
    dis = report.subsets["disagreement"].references
    assert dis.n == int(M.disagreement_mask(te.Y).sum()) == report.n.test_disagreement
    assert dis.oracle.accuracy == pytest.approx(1.0)


def test_operating_point_written_and_artifact_still_loads(evaluated):
    _, cfg, report = evaluated
    op = report.operating_point
    assert op.status == "calibrated" and report.operating_point_written
    meta = read_meta(cfg.artifact)
    assert meta.policy.operating_point is not None
    assert meta.policy.rule() == Policy.of(op.policy, op.param) and meta.policy.tolerance == 0.2
    # 'auto': both policies calibrated on val; the kept one reaches the target at the lower val cost
    reached = [c for c in op.candidates if c.status == "calibrated"]
    assert {c.policy for c in op.candidates} == {"tolerance", "value"} and reached
    assert op.val_cost == min(c.val_cost for c in reached) and op.val_accuracy >= op.target_accuracy
    router = load_artifact(cfg.artifact)  # file hashes still valid
    assert router.meta.policy.operating_point.val_accuracy == pytest.approx(op.val_accuracy)


def tiny(Y, split=None) -> RoutingData:
    Y = np.asarray(Y, float)
    n = len(Y)
    return RoutingData(query_ids=np.array([f"t{i}" for i in range(n)]), split=np.array(split or ["train"] * n),
                       blocks={}, targets=[f"m{j}" for j in range(Y.shape[1])], Y=Y,
                       cost=np.tile([1.0, 2.0, 5.0][: Y.shape[1]], (n, 1)), input_tokens=np.zeros((n, Y.shape[1])),
                       output_tokens=np.zeros((n, Y.shape[1])))


def test_fixed_routers_and_expected_outcome():
    d = tiny([[1, 0, 1], [0, 0, 1], [1, np.nan, 1], [0, 1, 0]])
    assert AlwaysCheapest().fit(d, []).index == 0 and AlwaysBest().fit(d, []).index == 2
    acc, cost = M.expected_outcome(d.Y, d.cost, RandomRouter().choice_weights(d, []))
    assert acc == pytest.approx(6 / 11) and cost == pytest.approx(8 / 3)  # missing label excluded


def test_task_best_pools_small_tasks_and_picks_per_group():
    big = big_tasks(["a", "a", "b", "c"], 2)  # the fitting rows: b and c have 1 row each
    assert big == {"a"}
    groups = task_groups(["a", "a", "b", "c", "c"], ["s", "s", "s", "r", "r"], big)
    assert groups.tolist() == ["a", "a", "s", "r", "r"]  # small tasks pooled into their source
    # rows t0-t3: task "math" (m2 right); t4-t7: subjects of "mmlu" with 1 row each (m0 right, m2 wrong)
    Y = [[0, 0, 1]] * 4 + [[1, 0, 0]] * 4
    tasks = {f"t{i}": ("rg", "math") for i in range(4)} | {f"t{i}": ("mmlu", f"subj{i}") for i in range(4, 8)}
    ids = lambda d, idx: replace(d, query_ids=np.array([f"t{i}" for i in idx]))  # noqa: E731
    router = TaskBestRouter(tasks, min_rows=2).fit(ids(tiny(Y[:2] + Y[4:6]), [0, 1, 4, 5]), [],
                                                   ids(tiny(Y[2:4] + Y[6:8]), [2, 3, 6, 7]), [])
    assert router.choice == {"math": 2, "mmlu": 0}
    W = router.choice_weights(tiny(Y), [])
    assert W.argmax(axis=1).tolist() == [2] * 4 + [0] * 4 and np.all(W.sum(axis=1) == 1)
    assert router.groups(ids(tiny(Y[:2]), [0, 7])).tolist() == ["math", "mmlu"]
    with pytest.raises(ValueError, match="no task"):
        TaskBestRouter({}, min_rows=2).fit(tiny(Y), [])


def test_headroom_by_group_hand_case():
    # best = m1; headroom rows: 0 (m0 right, m1 wrong: 1), 2 (0.5 partial credit), row 3 has m1 missing
    Y = np.array([[1, 0], [1, 1], [0.5, 0], [1, np.nan], [0, 0]], float)
    rows = headroom_by_group(Y, ["a", "a", "b", "b", "c"], best=1, targets=["m0", "m1"])
    assert [r["group"] for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert a["headroom_share"] == pytest.approx(1 / 1.5) and b["headroom_share"] == pytest.approx(0.5 / 1.5)
    assert c["headroom_share"] == 0 and a["n"] == 2 and a["oracle"] == 1.0
    assert b["accuracy"] == {"m0": 0.75, "m1": 0.0} and b["oracle"] == pytest.approx(0.75)


def test_knn_proba_and_k_tuning():
    E = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], float)
    Y = np.array([[1, 0], [1, np.nan], [0, 1], [0, 1]], float)
    P = knn_proba(np.array([[1, 0.05], [0.05, 1]]), E, Y, k=2)
    np.testing.assert_allclose(P, [[1.0, 0.0], [0.0, 1.0]])
    rng = np.random.default_rng(0)
    E = rng.normal(size=(300, 4))
    Y = (E[:, :2] > 0).astype(float)
    d = tiny(Y[:200]); v = tiny(Y[200:])
    emb = {f"t{i}": e for i, e in enumerate(E[:200])} | {f"v{i}": e for i, e in enumerate(E[200:])}
    knn = KNNRouter(lambda ts: np.stack([emb[t] for t in ts]), ks=[1, 15, 199])
    knn.fit(d, [f"t{i}" for i in range(200)], v, [f"v{i}" for i in range(100)])
    assert knn.k == 15  # k=1 is noisy, k=199 is the prior
    assert np.all(masked_auc(v.Y, knn.predict_proba(v, [f"v{i}" for i in range(100)])) > 0.9)


def test_mf_router_learns_target_specific_directions():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(600, 8)).astype(np.float32)
    Y = np.stack([E[:, 0] > 0, E[:, 1] > 0.5, E[:, 0] + E[:, 1] > 0], axis=1).astype(float)
    Y[rng.random(Y.shape) < 0.1] = np.nan
    emb = {f"q{i}": e for i, e in enumerate(E)}
    text = [f"q{i}" for i in range(600)]
    mf = MFRouter(lambda ts: np.stack([emb[t] for t in ts]), dim=8, lr=1e-2, patience=10)
    mf.fit(tiny(Y[:400]), text[:400], tiny(Y[400:500]), text[400:500])
    P = mf.predict_proba(tiny(Y[500:]), text[500:])
    assert P.shape == (100, 3) and np.all((P >= 0) & (P <= 1))
    assert np.all(masked_auc(Y[500:], P) > 0.85)


def test_knn_with_real_minilm():
    from training.embedder import MiniLMEmbedder

    math = ["What is 7 times 8?", "Compute 12 plus 30.", "Solve 3x = 12 for x.", "What is the square root of 81?",
            "Divide 144 by 12.", "What is 15 minus 9?"]
    history = ["Who was the first Roman emperor?", "When did the French Revolution begin?",
               "Which empire built Machu Picchu?", "Who wrote the Magna Carta's demands in 1215?",
               "What year did World War II end?", "Who was Napoleon Bonaparte?"]
    texts = math[:4] + history[:4]
    train = tiny([[1, 0]] * 4 + [[0, 1]] * 4)
    knn = KNNRouter(MiniLMEmbedder(), ks=[3]).fit(train, texts)
    P = knn.predict_proba(tiny([[1, 0]] * 2 + [[0, 1]] * 2), math[4:] + history[4:])
    assert np.all(P[:2, 0] > P[:2, 1]) and np.all(P[2:, 1] > P[2:, 0])


def write_datasets(data: RoutingData, root: Path) -> dict[str, str]:
    """The synthetic data in the on-disk formats of capture, label and data build."""
    import pyarrow as pa

    from shared import storage

    acts = {"query_id": data.query_ids.tolist(), "split": data.split.tolist(), "n_tokens": data.n_tokens.tolist()}
    acts |= {k: [list(map(float, r)) for r in v] for k, v in data.blocks.items()}
    storage.write_parquet(pa.table(acts), str(root / "acts" / "shard-00000.parquet"))
    for t, name in enumerate(data.targets):
        ok = ~np.isnan(data.Y[:, t])
        rows = {"query_id": data.query_ids.tolist(), "status": np.where(ok, "ok", "failed").tolist(),
                "correct": [float(y) if k else None for y, k in zip(data.Y[:, t], ok)],
                "cost": np.nan_to_num(data.cost[:, t]).tolist(), "input_tokens": data.input_tokens[:, t].tolist(),
                "output_tokens": data.output_tokens[:, t].tolist()}
        storage.write_parquet(pa.table(rows), str(root / "labels" / name / "shard-00000.parquet"))
    messages = [[{"role": "user", "content": f"question {q}"}] for q in data.query_ids]
    queries = pa.table({"query_id": data.query_ids.tolist(), "messages": messages, "source": ["synthetic"] * len(messages),
                        "task": [f"task{i % 2}" for i in range(len(messages))]})
    storage.write_parquet(queries, str(root / "q.parquet"))
    return {"activations": str(root / "acts"), "labels": str(root / "labels"), "queries": str(root / "q.parquet")}


def test_cli_reads_datasets_and_keeps_default_tolerance(evaluated, tmp_path):
    from training.evaluate.run import main, query_texts

    data, cfg, _ = evaluated
    paths = write_datasets(data, tmp_path)
    assert query_texts(paths["queries"], ["q3", "q1"]) == ["question q3", "question q1"]
    before = (Path(cfg.artifact) / "meta.json").read_bytes()
    args = [f"{k}={v}" for k, v in paths.items()] + [f"artifact={cfg.artifact}", f"out={tmp_path / 'out'}",
                                                    "routers=[random, always-cheapest, task-best]"]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["operating_point"]["status"] == "default" and not report["operating_point_written"]
    op = report["operating_point"]
    assert Policy.of(op["policy"], op[op["policy"]]) == read_meta(cfg.artifact).policy.rule()
    after = json.loads((Path(cfg.artifact) / "meta.json").read_text())
    task_best = after["training_metrics"].pop("task_best")  # task-best's choices, for held-out checks
    assert set(task_best["groups"]) == {"task0", "task1"} and after == json.loads(before)  # nothing else moved
    assert set(task_best["means"]) == {"", "task0", "task1"}  # task-best scores by them in the pairwise AUC
    assert set(report["subsets"]["test"]["routers"]) == {"prefill-router", "random", "always-cheapest", "task-best"}
    assert set(report["pairwise_auc"]) == {"prefill-router", "task-best"} and set(report["pairwise_margin"]) == {
        "task-best"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "`task-best` is a reference" in md and "## Where the headroom is" in md
    shares = [r["headroom_share"] for r in report["headroom_by_task"]]
    assert {r["group"] for r in report["headroom_by_task"]} == {"task0", "task1"} and sum(shares) == pytest.approx(1)
    assert main(args[:-1] + ["routers=[knn-minilm]", "queries=null"]) == 2  # semantic baselines need the text


def test_block_names_have_one_spelling():
    from shared.features import block_columns, block_name, parse_block

    assert parse_block("h12_last") == (12, "last") and block_name(0, "mean") == "h0_mean"
    assert block_columns(["n_tokens", "h9_mean", "h10_last", "h9_last"]) == ["h9_last", "h9_mean", "h10_last"]
    for bad in ("L12.last", "layer12", "h3_max"):
        with pytest.raises(ValueError):
            parse_block(bad)
    with pytest.raises(ValueError):
        block_name(3, "max")


# ---------------------------------------------------------------- report additions
def _direct(cfg, data: RoutingData):
    """P, decision and outcome costs of the artifact on ``data`` (as evaluate computes them)."""
    router = load_artifact(cfg.artifact)
    P = router.predict_proba({"h4_last": data.blocks["h4_last"], "h8_mean": data.blocks["h8_mean"]})
    C_route = router.costs(data.n_tokens)
    return P, C_route, np.where(np.isnan(data.cost), C_route, data.cost)


def test_per_task_and_disagreement_rows(evaluated):
    data, cfg, report = evaluated
    te = data.where("test")
    tasks = np.array(TASKS(len(data.query_ids)))[data.split == "test"]
    P, C_route, C = _direct(cfg, te)
    ours = report.router("prefill-router")
    rule = Policy.of(ours.policy, ours.param)
    dis = M.disagreement_mask(te.Y)
    assert list(report.by_task) == ["alpha", "beta"]
    for task in ("alpha", "beta"):
        for key, m in (("test", tasks == task), ("disagreement", (tasks == task) & dis)):
            sub = report.by_task[task][key]
            acc, cost = M.routing_outcome(te.Y[m], C[m], rule.route(P[m], C_route[m]))
            _, best_acc, best_cost = M.best_single(te.Y[m], C[m])
            row, refs = sub.routers["prefill-router"], sub.references
            assert refs.n == int(m.sum()) and refs.best_single.accuracy == pytest.approx(best_acc)
            assert (row.accuracy, row.cost) == pytest.approx((acc, cost))
            assert row.gap_closed == pytest.approx(M.gap_closed(acc, best_acc, M.oracle_accuracy(te.Y[m])))
            assert row.sweep is None and row.operating_point is None  # per-task rows: no sweeps
            assert set(sub.routers) == set(report.subsets["test"].routers)
        assert report.by_task[task]["disagreement"].references.oracle.accuracy == 1.0
    md = (Path(cfg.out) / "report.md").read_text()
    assert "\n| alpha | " in md and "\n| beta | " in md


def test_iso_accuracy_savings_and_gap_at_savings_in_the_report(evaluated):
    _, _, report = evaluated
    for key in ("test", "disagreement"):
        refs, ours = report.subsets[key].references, report.router("prefill-router", key)
        best, dear, oracle = refs.best_single, refs.most_expensive.cost, refs.oracle.accuracy
        points = list(zip(ours.sweep.cost, ours.sweep.accuracy))
        reach = [c for c, a in points if a >= best.accuracy - 1e-12]
        iso = 1 - min(reach) / best.cost if reach else float("nan")
        assert ours.iso_accuracy_savings == pytest.approx(iso, nan_ok=True)
        cheap = [a for c, a in points if 1 - c / dear >= 0.7431 - 1e-12]
        gap = (max(cheap) - best.accuracy) / (oracle - best.accuracy) if cheap else float("nan")
        assert ours.best_gap_closed_at_savings == pytest.approx(gap, nan_ok=True)
        assert refs.single[best.target].iso_accuracy_savings == pytest.approx(0.0)
        fixed = report.router("always-cheapest", key)  # one point: its own gap closed when cheap enough
        if fixed.cost_savings >= 0.7431:
            assert fixed.best_gap_closed_at_savings == pytest.approx(fixed.gap_closed)

