"""Task-averaged accuracy (RouterDC's metric), its task-stratified bootstrap, published reference
figures, the task-aware reference on unseen tasks, and reports at equal prices (scoring -> report
markdown -> plot, with an accuracy-only headline)."""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest

from shared.policy import Policy
from training.metrics import best_target
from training.dataset import RoutingData
from training.evaluate import task_metrics as TM
from training.evaluate.baselines import KNNRouter, RandomRouter, RouterModel, TaskBestRouter
from training.evaluate.uncertainty import bootstrap_task_averaged

# --------------------------------------------------------------------------- the metric by hand
Y = np.array([[1.0, 0.0], [0.5, 1.0], [0.0, 0.25], [np.nan, 1.0], [0.75, 0.0]])
TASKS = np.array(["a", "a", "b", "b", "c"])


def test_task_averaged_accuracy_by_hand():
    choice = np.array([0, 1, 1, 0, 0])  # row 3's chosen label is missing: task b counts row 2 only
    # a: (1 + 1) / 2 = 1; b: 0.25; c: 0.75 -> (1 + 0.25 + 0.75) / 3; pooled would be 3 / 4
    assert TM.task_averaged(Y, TM.one_hot(choice, 2), TASKS) == pytest.approx(2.0 / 3)
    W = np.full((5, 2), 0.5)  # random: expected score, missing labels carry no mass
    # a: (1 + 0 + .5 + 1) / 4; b: (0 + .25 + 1) / 3; c: .75 / 2
    assert TM.task_averaged(Y, W, TASKS) == pytest.approx((2.5 / 4 + 1.25 / 3 + 0.375) / 3)
    # per target: m0 a .75, b 0 (its row 3 is missing), c .75; m1 a .5, b .625, c 0
    np.testing.assert_allclose(TM.task_averaged_singles(Y, TASKS), [0.5, 1.125 / 3])
    # oracle rows: 1, 1, .25, 1, .75 -> a 1, b .625, c .75
    assert TM.task_averaged_oracle(Y, TASKS) == pytest.approx(2.375 / 3)
    assert TM.task_count(Y, TASKS) == 3 and best_target([0.5, 0.5, 0.4], [2.0, 1.0, 0.0]) == 1


def test_a_task_without_a_chosen_label_counts_in_no_mean():
    both = np.array([[np.nan, 1.0], [0.0, 1.0]])
    assert TM.task_averaged(both, TM.one_hot([0, 0], 2), ["x", "y"]) == 0.0  # x: no label chosen
    assert math.isnan(TM.task_averaged(both[:1], TM.one_hot([0], 2), ["x"]))


def test_task_stratified_bootstrap():
    rng = np.random.default_rng(0)
    tasks = np.repeat(["big", "small"], [200, 20])
    ours = np.where(tasks == "big", rng.random(220) < 0.7, rng.random(220) < 0.4).astype(float)
    best = np.where(tasks == "big", rng.random(220) < 0.6, rng.random(220) < 0.4).astype(float)
    out = bootstrap_task_averaged(ours, {"best": best, "same": ours}, tasks, n_boot=300)
    value, low, high = out["accuracy"]
    assert value == pytest.approx(TM.task_averaged_rows(ours, tasks)[0]) and low <= value <= high
    assert value == pytest.approx((ours[:200].mean() + ours[200:].mean()) / 2)  # not the pooled mean
    assert out["minus"]["same"] == [0.0, 0.0, 0.0]  # paired: the same redrawn queries
    diff = out["minus"]["best"]
    assert diff[0] == pytest.approx(value - TM.task_averaged_rows(best, tasks)[0]) and diff[1] <= diff[0] <= diff[2]
    # each replicate redraws within each task: a task of constant scores keeps its mean exactly
    flat = np.where(tasks == "big", 1.0, 0.0)
    assert bootstrap_task_averaged(flat, {}, tasks, n_boot=50)["accuracy"] == [0.5, 0.5, 0.5]


# --------------------------------------------------------------------------- task-best and published
def test_task_best_sends_a_task_it_never_saw_to_the_best_single_target():
    # train: task t1 (m0 best), t2 (m2 best); m1 the best single overall (right on both, partly)
    Y = np.array([[1, 0.6, 0]] * 3 + [[0, 0.6, 1]] * 3, float)
    ids = np.array([f"r{i}" for i in range(6)] + ["n0", "n1", "n2"])
    tasks = {f"r{i}": ("bench", "t1" if i < 3 else "t2") for i in range(6)}
    tasks |= {"n0": ("bench", "unseen"), "n1": ("other", "unseen2"), "n2": ("bench", "t2")}

    def data(idx):
        n = len(idx)
        return RoutingData(query_ids=ids[idx], split=np.array(["train"] * n), blocks={}, targets=["m0", "m1", "m2"],
                           Y=np.vstack([Y, np.zeros((3, 3))])[idx], cost=np.ones((n, 3)),
                           input_tokens=np.zeros((n, 3)), output_tokens=np.zeros((n, 3)))

    router = TaskBestRouter(tasks, min_rows=2).fit(data(list(range(6))), [])
    assert router.choice == {"t1": 0, "t2": 2} and router.default == 1
    W = router.choice_weights(data([6, 7, 8, 0]), [])
    assert W.argmax(axis=1).tolist() == [1, 1, 2, 0]  # unseen tasks (same source or not): the best single
    # the record evaluate writes into the artifact gives the same choices without any train rows
    record = json.loads(json.dumps(router.record(["m0", "m1", "m2"])))
    means = record.pop("means")  # each group's mean score per target ("" pooled): task-best as a scorer
    assert record == {"groups": {"t1": "m0", "t2": "m2"}, "default": "m1", "big": ["t1", "t2"], "min_rows": 2}
    assert means == {"": {"m0": 0.5, "m1": 0.6, "m2": 0.5}, "t1": {"m0": 1.0, "m1": 0.6, "m2": 0.0},
                     "t2": {"m0": 0.0, "m1": 0.6, "m2": 1.0}}
    again = TaskBestRouter.from_record(tasks, record | {"means": means}, ["m0", "m1", "m2"])
    assert again.from_artifact and np.array_equal(again.choice_weights(data([6, 7, 8, 0]), []), W)
    # scores: an unseen task gets the pooled means; an older record without means scores nothing
    assert again.scores(data([6, 8])).tolist() == [[0.5, 0.6, 0.5], [0.0, 0.6, 1.0]]
    assert TaskBestRouter.from_record(tasks, record, ["m0", "m1", "m2"]).scores(data([6])) is None


def test_published_figures_are_checked():
    from training.evaluate.run import EvalConfig

    base = {"artifact": "a", "activations": "b", "labels": "c"}
    cfg = EvalConfig(**base, published=[{"label": "RouterDC", "task_averaged_accuracy": 0.527}])
    assert cfg.published[0].task_averaged_accuracy == 0.527 and cfg.published[0].accuracy is None
    assert EvalConfig(**base).published == []
    for bad in ({"label": "x"}, {"label": "x", "accuracy": 52.7}, {"label": "x", "accuracy": 0.5, "extra": 1}):
        with pytest.raises(ValueError):
            EvalConfig(**base, published=[bad])


# --------------------------------------------------------------------------- equal prices, end to end
TARGETS = ["t0", "t1", "t2"]
SKILL = {"math": [0.3, 0.8, 0.5], "code": [0.6, 0.2, 0.7], "facts": [0.7, 0.5, 0.4]}


def equal_price_data(n: int = 360, seed: int = 0) -> tuple[RoutingData, list[str]]:
    """Soft scores whose best target differs by task; every target costs the same on each query."""
    rng = np.random.default_rng(seed)
    tasks = [list(SKILL)[i % 3] for i in range(n)]
    prob = np.clip(np.array([SKILL[t] for t in tasks]) + rng.normal(scale=0.25, size=(n, 3)), 0.02, 0.98)
    Y = np.round((rng.random((n, 3, 10)) < prob[:, :, None]).mean(axis=2), 1)  # a share of 10 samples
    Y[rng.random((n, 3)) < 0.03] = np.nan
    tokens = rng.integers(20, 400, size=n).astype(float)
    cost = np.repeat((tokens * 0.2e-6)[:, None], 3, axis=1)
    cost[np.isnan(Y)] = np.nan
    split = np.array(["train", "val", "test", "test", "train"] * (n // 5))
    data = RoutingData(query_ids=np.array([f"q{i}" for i in range(n)]), split=split, blocks={"p": prob},
                       targets=list(TARGETS), Y=Y, cost=cost, input_tokens=np.repeat(tokens[:, None], 3, axis=1),
                       output_tokens=np.zeros((n, 3)), n_tokens=tokens)
    return data, tasks


class Oracle(RouterModel):
    """A stand-in for the artifact: predicts the true probabilities, routes at equal prices."""

    name = "prefill-router"

    def __init__(self, price: float):
        costs = lambda tokens: np.repeat((np.asarray(tokens) * price)[:, None], len(TARGETS), axis=1)  # noqa: E731
        self.router = SimpleNamespace(costs=costs, meta=SimpleNamespace(
            policy=SimpleNamespace(rule=lambda: Policy.of("tolerance", 0.0))))

    def predict_proba(self, data, text):
        return data.blocks["p"]


def _floats(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _floats(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _floats(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.parametrize("price", [0.2e-6, 0.0])
def test_equal_prices_give_an_accuracy_only_report(price, tmp_path, monkeypatch):
    from training.evaluate import plot_accuracy
    from training.evaluate.report import markdown, summary_table
    from training.evaluate.report_accuracy import EQUAL_COSTS
    from training.evaluate.results import EvalReport
    from training.evaluate.run import EvalConfig
    from training.evaluate.scoring import evaluate_routers

    data, tasks = equal_price_data()
    if price == 0:
        data = replace(data, cost=np.where(np.isnan(data.cost), np.nan, 0.0))
    embed = lambda texts: data.blocks["p"][[int(t[1:]) for t in texts]]  # noqa: E731
    models = [RandomRouter(), KNNRouter(embed, ks=[15]),
              TaskBestRouter({q: ("bench", t) for q, t in zip(data.query_ids, tasks)}, min_rows=10)]
    cfg = EvalConfig(artifact="a", activations="b", labels="c", bootstrap=40,
                     published=[{"label": "Someone", "task_averaged_accuracy": 0.55}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero anywhere in the scoring
        scores = evaluate_routers(Oracle(price), models, data, list(data.query_ids), cfg, tasks)
    report = EvalReport.model_validate({**scores, "published": cfg.published})
    refs = report.subsets["test"].references
    assert refs.equal_costs and refs.n_tasks == 3 and refs.best_single_task_averaged is not None
    assert not any(math.isinf(x) for x in _floats(report.model_dump()))
    assert EvalReport.model_validate(json.loads(report.json_text())).to_json() == report.to_json()
    test_rows = data.where("test")
    ours = report.router("prefill-router")
    C_route = Oracle(price).router.costs(test_rows.n_tokens)
    choice = Policy.of(ours.policy, ours.param).route(test_rows.blocks["p"], C_route)
    test_tasks = np.array(tasks)[data.split == "test"]
    assert ours.task_averaged_accuracy == pytest.approx(
        TM.task_averaged(test_rows.Y, TM.one_hot(choice, 3), test_tasks))
    iv = report.task_averaged_interval
    assert iv.accuracy[0] == pytest.approx(ours.task_averaged_accuracy) and iv.minus_task_best is not None

    md = markdown(report.to_json())
    assert not re.search(r"-0\.0+(?!\d)", md) and not re.search(r"\b(nan|inf)\b", md, re.IGNORECASE)  # no -0.00
    assert EQUAL_COSTS in md and "| router | accuracy | task-averaged accuracy | gap closed |" in md
    assert "| published: Someone | — | 55.00% |" in md and "minus task-best's" in md
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    for word in ("cost", "savings", "P-AUCCC", "no point", "not reached"):
        assert not any(word in line for line in table_lines), word
    assert "## Policies" in md and "value policy" not in md

    drawn = []
    real = plot_accuracy.accuracy_plot
    monkeypatch.setattr(plot_accuracy, "accuracy_plot", lambda r, s: drawn.append(s) or real(r, s))
    from training.evaluate.plots import plot

    for subset in report.subsets:
        assert plot(report.to_json(), subset)[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn == list(report.subsets)  # the accuracy bars, not a cost axis of zero width
    assert summary_table(report.to_json()).columns[2].header == "task-averaged accuracy"


def test_without_tasks_the_metric_is_said_to_be_unavailable():
    from training.evaluate.report import markdown
    from training.evaluate.report_accuracy import UNAVAILABLE
    from training.evaluate.results import EvalReport
    from training.evaluate.run import EvalConfig
    from training.evaluate.scoring import evaluate_routers

    data, _ = equal_price_data(n=120)
    cfg = EvalConfig(artifact="a", activations="b", labels="c", bootstrap=20)
    report = EvalReport.model_validate(evaluate_routers(Oracle(1e-6), [RandomRouter()], data,
                                                        list(data.query_ids), cfg, None))
    assert report.subsets["test"].references.n_tasks is None and report.task_averaged_interval is None
    assert report.router("prefill-router").task_averaged_accuracy is None
    md = markdown(report.to_json())
    assert UNAVAILABLE in md and "| — | " in md
    assert "| prefill-router (tol 0) ◀ artifact's operating point | " in md


def test_a_report_from_before_the_metric_says_so():
    """A committed report evaluated before task-averaged accuracy existed (per-task rows, no task
    count) says to re-run evaluate, not that it had no tasks."""
    from tests.procs import ROOT
    from training.evaluate.report import markdown
    from training.evaluate.report_accuracy import PREDATES, UNAVAILABLE
    from training.evaluate.results import EvalReport

    report = EvalReport.read(str(ROOT / "data" / "routerbench-qwen" / "eval" / "report.json")).to_json()
    assert report["by_task"] and report["subsets"]["test"]["references"].get("n_tasks") is None
    md = markdown(report)
    assert PREDATES in md and UNAVAILABLE not in md
