"""Metrics on small cases whose expected values are worked out by hand in the comments."""

import math

import numpy as np
import pytest

from training import metrics as q
from training.evaluate import routing_metrics as m
from training.fit import separability as sep

NAN = np.nan


# ----------------------------------------------------------------------------- probes
def test_fisher_separability_hand_case_and_nan_labels_excluded():
    # + : x in {1, 3} -> mu+ = 2, sample var = ((1-2)^2 + (3-2)^2) / 1 = 2
    # - : x in {-1, -3} -> mu- = -2, sample var = 2;  second feature constant 0.
    # J = (2 - (-2))^2 / (2 + 2) = 16 / 4 = 4.
    # The row (100, 0) has a NaN label: read as 0 it would move mu- to 32 and break J = 4.
    X = np.array([[1, 0], [3, 0], [-1, 0], [-3, 0], [100, 0]], float)
    y = np.array([1, 1, 0, 0, NAN])
    assert sep.fisher_separability(X, y) == pytest.approx(4.0)


def test_fisher_separability_needs_two_per_class():
    X = np.array([[1.0], [2.0], [3.0]])
    assert math.isnan(sep.fisher_separability(X, np.array([1, 0, 0])))  # one positive
    assert math.isnan(sep.fisher_separability(X, np.array([1, 1, NAN])))  # no negatives


def test_effective_dimensionality_isotropic_and_anisotropic():
    # (+-1, 0), (0, +-1): covariance diag(2/3, 2/3) -> d_eff = (2l)^2 / (2 l^2) = 2.
    iso = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], float)
    assert sep.effective_dimensionality(iso) == pytest.approx(2.0)
    # (+-2, 0), (0, +-1): eigenvalues proportional to 8 and 2 (ratio 4:1)
    # -> d_eff = (4 + 1)^2 / (16 + 1) = 25 / 17.
    aniso = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], float)
    assert sep.effective_dimensionality(aniso) == pytest.approx(25 / 17)


def test_effective_dimensionality_n_smaller_than_d_uses_same_spectrum():
    # Embedding the 4 anisotropic points isometrically in 10-d (n = 4 < d = 10) keeps the
    # nonzero eigenvalues, so d_eff stays 25 / 17.
    aniso = np.array([[2, 0], [-2, 0], [0, 1], [0, -1]], float)
    Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(10, 2)))
    assert sep.effective_dimensionality(aniso @ Q.T + 5.0) == pytest.approx(25 / 17)
    assert math.isnan(sep.effective_dimensionality(np.ones((1, 3))))


def test_probe_auc_separable_and_missing_labels_not_zero():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = (X[:, 0] > 0).astype(float)
    # 60 rows with large positive x0 get NaN labels; read as 0 they would be mislabelled.
    X_missing = rng.normal(size=(60, 5))
    X_missing[:, 0] = 3 + np.abs(X_missing[:, 0])
    Xall = np.vstack([X, X_missing])
    yall = np.concatenate([y, np.full(60, NAN)])
    assert sep.probe_auc(Xall, yall) > 0.95
    y_as_zero = np.nan_to_num(yall, nan=0.0)
    assert sep.probe_auc(Xall, y_as_zero) < sep.probe_auc(Xall, yall)


def test_probe_auc_random_labels_near_chance_and_degenerate():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(400, 5)), rng.integers(0, 2, 400).astype(float)
    assert 0.35 < sep.probe_auc(X, y) < 0.65
    assert math.isnan(sep.probe_auc(X[:5], np.array([1, 0, 0, 0, 0.0])))  # one positive


# ----------------------------------------------------------------- prediction quality
def test_masked_auc_and_brier():
    # positives {0.9, 0.3}, negatives {0.1, 0.8}: pairs ranked right: (0.9>0.1), (0.9>0.8),
    # (0.3>0.1), wrong: (0.3<0.8) -> 3/4. The NaN row is ignored whatever its p.
    y = np.array([0, 1, 0, 1, NAN])
    p = np.array([0.1, 0.9, 0.8, 0.3, 0.0])
    assert q.masked_auc(y, p) == pytest.approx(0.75)
    Y2 = np.column_stack([y, [1, 1, 1, NAN, 1]])  # second target: one class only -> nan
    auc = q.masked_auc(Y2, np.column_stack([p, p]))
    assert auc[0] == pytest.approx(0.75) and math.isnan(auc[1])
    # brier: ((0.8-1)^2 + (0.4-0)^2) / 2 = (0.04 + 0.16) / 2 = 0.1
    assert q.brier(np.array([1, 0, NAN]), np.array([0.8, 0.4, 0.9])) == pytest.approx(0.1)


# ---------------------------------------------------------------------------- routing
def test_route_with_tolerance_hand_cases():
    P = np.array([[0.9, 0.8, 0.5], [0.6, 0.9, 0.85]])
    costs = np.array([3.0, 2.0, 1.0])
    # tol 0: the argmax -> [0, 1]
    assert m.route_with_tolerance(P, costs, 0.0).tolist() == [0, 1]
    # tol 0.2: row0 eligible {0.9, 0.8} -> cheaper is 1; row1 {0.9, 0.85} -> 2
    assert m.route_with_tolerance(P, costs, 0.2).tolist() == [1, 2]
    # tol 0.4: row0 all eligible (0.5 = 0.9 - 0.4) -> 2
    assert m.route_with_tolerance(P, costs, 0.4).tolist() == [2, 2]
    # 0.8 - 0.6 is 0.20000000000000007 in floats; still within tolerance 0.2
    assert m.route_with_tolerance(np.array([[0.8, 0.6]]), np.array([2.0, 1.0]), 0.2).tolist() == [1]
    with pytest.raises(ValueError, match="tolerance"):
        m.route_with_tolerance(P, costs, -0.1)
    # ties in P and cost -> lower index
    assert m.route_with_tolerance(np.array([[0.5, 0.5, 0.5]]), np.array([2.0, 1.0, 1.0]), 0.0).tolist() == [1]


def test_route_by_value_weighs_the_price_difference():
    # value 10: 9 - 10 = -1 vs 6 - 1 = 5 -> 1; value 40: 36 - 10 = 26 vs 24 - 1 = 23 -> 0
    P, costs = np.array([[0.9, 0.6]]), np.array([10.0, 1.0])
    assert [m.route_by_value(P, costs, v)[0] for v in (0.0, 10.0, 29.9, 40.0, np.inf)] == [1, 1, 1, 0, 0]
    # a tie at the breakpoint (value 30: 27 - 10 = 18 - 1) goes to the cheaper target
    assert m.route_by_value(P, costs, 30.0).tolist() == [1]
    with pytest.raises(ValueError, match="value"):
        m.route_by_value(P, costs, -1.0)


def test_value_sweep_holds_every_routing_of_a_dense_grid():
    """The exact sweep against brute force: every routing met on a fine grid of values (and
    just above each breakpoint) is a point of the sweep, from the cheapest to the most likely."""
    rng = np.random.default_rng(3)
    P = rng.random((40, 4))
    C = np.array([4.0, 1.0, 2.5, 0.2]) * rng.uniform(0.5, 1.5, (40, 1))  # per-query price model
    Y = (rng.random((40, 4)) < P).astype(float)
    Y[::7, 1] = NAN
    sweep = m.value_sweep(P, Y, C)
    assert np.all(np.diff(sweep.cost) >= 0)
    points = set(zip(np.round(sweep.cost, 12), np.round(np.nan_to_num(sweep.accuracy), 12)))
    for v in np.concatenate([[0.0], np.geomspace(1e-2, 1e4, 400)]):
        acc, cost = m.routing_outcome(Y, C, m.route_by_value(P, C, v))
        assert (round(cost, 12), round(acc, 12)) in points, v
    for v, a, c in zip(*sweep):  # each point's value reproduces its routing
        assert m.routing_outcome(Y, C, m.route_by_value(P, C, v)) == pytest.approx((a, c))
    cheapest, likeliest = np.argmin(C, axis=1), m.route_by_value(P, C, np.inf)
    assert sweep.cost[0] == pytest.approx(m.routing_outcome(Y, C, cheapest)[1])
    assert (round(m.routing_outcome(Y, C, likeliest)[1], 12),
            round(m.routing_outcome(Y, C, likeliest)[0], 12)) in points


def test_routing_outcome_excludes_missing_chosen_label():
    # chosen labels: 1, 0, NaN -> accuracy (1 + 0) / 2 = 0.5; cost (2 + 2 + 1) / 3 = 5/3
    Y = np.array([[1, 0], [0, 1], [1, NAN]])
    acc, cost = m.routing_outcome(Y, np.array([2.0, 1.0]), np.array([0, 0, 1]))
    assert acc == pytest.approx(0.5) and cost == pytest.approx(5 / 3)


def test_oracle_and_best_single():
    Y = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1], [NAN, 1, NAN]])
    C = np.array([3.0, 2.0, 1.0])
    # rows with a correct target: 0, 2, 3 -> 3/4
    assert m.oracle_accuracy(Y) == pytest.approx(0.75)
    # oracle picks: row0 only t0 (3); row1 nobody -> cheapest t2 (1); row2 {t1, t2} -> t2 (1);
    # row3 t1 (2) -> mean cost (3 + 1 + 1 + 2) / 4 = 7/4
    assert m.oracle_choice(Y, C).tolist() == [0, 2, 2, 1]
    assert m.oracle_outcome(Y, C) == pytest.approx((0.75, 1.75))
    # accuracies over present labels: t0 1/3, t1 2/4, t2 1/3 -> best t1 (acc .5, cost 2)
    assert m.best_single(Y, C) == (1, pytest.approx(0.5), pytest.approx(2.0))
    # tie in accuracy -> the cheaper one
    assert m.best_single(np.array([[1, 1], [0, 0]]), np.array([5.0, 4.0]))[0] == 1
    # the rule itself: accuracy, then the lower cost, then the earlier target; no label ranks last
    assert q.best_target([0.5, 0.7, 0.7, 0.7], [1.0, 3.0, 2.0, 2.0]) == 2
    assert q.best_target([NAN, 0.1], [0.0, 9.0]) == 1


def test_gap_closed_and_cost_savings():
    assert m.gap_closed(0.7, 0.6, 0.8) == pytest.approx(0.5)  # 0.1 / 0.2
    assert m.gap_closed(0.5, 0.6, 0.8) == pytest.approx(-0.5)
    assert math.isnan(m.gap_closed(0.6, 0.6, 0.6))
    assert m.cost_savings(2.5, 10.0) == pytest.approx(0.75)  # 1 - 2.5/10


SWEEP_P = np.array([[0.9, 0.6], [0.7, 0.65]])
SWEEP_Y = np.array([[1, 0], [1, 1]], float)
SWEEP_C = np.array([2.0, 1.0])


def test_tolerance_sweep_hand_case():
    # gaps: row0 [0, 0.3], row1 [0, 0.05] -> tolerances 0, 0.05, 0.3
    # tol 0   : choices [0, 0] -> acc 1,   cost 2
    # tol 0.05: choices [0, 1] -> acc 1,   cost 1.5
    # tol 0.3 : choices [1, 1] -> acc 0.5, cost 1
    s = m.tolerance_sweep(SWEEP_P, SWEEP_Y, SWEEP_C)
    np.testing.assert_allclose(s.tolerance, [0.3, 0.05, 0.0])
    np.testing.assert_allclose(s.accuracy, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(s.cost, [1.0, 1.5, 2.0])


def test_tolerance_sweep_matches_direct_routing_with_missing_labels():
    rng = np.random.default_rng(3)
    P = rng.uniform(size=(40, 4))
    Y = rng.integers(0, 2, size=(40, 4)).astype(float)
    Y[rng.uniform(size=Y.shape) < 0.2] = NAN
    C = rng.uniform(1, 5, size=(40, 4))
    s = m.tolerance_sweep(P, Y, C)
    assert np.all(np.diff(s.cost) >= 0) and len(s.tolerance) > 10
    for tol, acc, cost in zip(*s):
        assert (acc, cost) == pytest.approx(m.routing_outcome(Y, C, m.route_with_tolerance(P, C, tol)))


def test_pauccc_step_and_linear():
    # points (1, .5), (2, .7), (3, .6); floor .5 on [1, 3]. Pareto corners (1,.5), (2,.7).
    # step:   f = .5 on [1,2), .7 on [2,3] -> area 0 + .2*1 = .2 -> / 2 = 0.1
    # linear: [1,2] triangle .5*1*.2 = .1, [2,3] .2 -> .3 -> / 2 = 0.15
    c, a = [1, 2, 3], [0.5, 0.7, 0.6]
    assert m.pauccc(c, a, 1, 3, 0.5) == pytest.approx(0.1)
    assert m.pauccc(c, a, 1, 3, 0.5, interpolation="linear") == pytest.approx(0.15)
    # a curve below the floor contributes nothing
    assert m.pauccc([1, 2], [0.3, 0.4], 1, 2, 0.5) == pytest.approx(0.0)
    # linear crossing the floor: (1, .4) -> (2, .6): positive part is the triangle on
    # [1.5, 2] of height .1 -> area .025; then flat .1 on [2, 3] -> .1; total .125 / 2
    assert m.pauccc([1, 2], [0.4, 0.6], 1, 3, 0.5, "linear") == pytest.approx(0.0625)
    assert math.isnan(m.pauccc(c, a, 2, 2, 0.5))


def test_single_model_hull_and_its_pauccc():
    # (2, .6) lies under the chord (1,.5)-(4,.9) (value .6333 at c=2); (5, .8) is dominated.
    costs, accs = [1, 2, 4, 5], [0.5, 0.6, 0.9, 0.8]
    hc, ha = m.single_model_hull(costs, accs)
    assert hc.tolist() == [1, 4] and ha.tolist() == [0.5, 0.9]
    # over [1, 5], floor .5: triangle .5*3*.4 = .6 plus .4*1 -> 1.0 / 4 = 0.25
    assert m.hull_pauccc(costs, accs) == pytest.approx(0.25)
    # (2, .8) is a hull vertex: slopes .3 then .05 (concave)
    hc, ha = m.single_model_hull([1, 2, 4], [0.5, 0.8, 0.9])
    assert hc.tolist() == [1, 2, 4]


def test_calibrate_operating_point():
    s = m.tolerance_sweep(SWEEP_P, SWEEP_Y, SWEEP_C)  # (tol, acc, cost): (.3,.5,1) (.05,1,1.5) (0,1,2)
    assert m.calibrate_operating_point(s, target_cost=1.6) == pytest.approx(0.05)
    assert m.calibrate_operating_point(s, target_cost=1.2) == pytest.approx(0.3)
    assert m.calibrate_operating_point(s, target_accuracy=0.9) == pytest.approx(0.05)  # cheapest at acc 1
    with pytest.raises(ValueError, match="no operating point"):
        m.calibrate_operating_point(s, target_cost=0.5)
    with pytest.raises(ValueError, match="no operating point"):
        m.calibrate_operating_point(s, target_accuracy=1.1)
    with pytest.raises(ValueError, match="exactly one"):
        m.calibrate_operating_point(s, target_cost=1.0, target_accuracy=0.5)


def test_disagreement_share():
    # labelled rows: 4 (the all-NaN row is dropped); only row 2 mixes right and wrong
    Y = np.array([[1, 1], [0, 0], [1, 0], [1, NAN], [NAN, NAN]])
    assert m.disagreement_mask(Y).tolist() == [False, False, True, False, False]
    assert m.disagreement_share(Y) == pytest.approx(0.25)


def test_paired_bootstrap_auc_margin():
    from training.evaluate.uncertainty import paired_bootstrap_auc_margin, rank_auc

    rng = np.random.default_rng(0)
    Y = (rng.random((400, 2)) < 0.5).astype(float)
    Y[::7, 1] = np.nan
    ties = np.round(rng.random(Y.shape), 1)  # many tied scores
    np.testing.assert_allclose(rank_auc(Y, ties), q.masked_auc(Y, ties))
    good = np.where(np.isnan(Y), 0.5, 0.7 * np.nan_to_num(Y) + 0.3 * rng.random(Y.shape))  # AUC well above 0.5
    noise = rng.random(Y.shape)                                                           # AUC about 0.5
    out = paired_bootstrap_auc_margin(Y, good, noise, n_boot=200)
    assert 0.3 < out["low"] < out["margin"] < out["high"] and out["p_le_zero"] == 0.0
    same = paired_bootstrap_auc_margin(Y, good, good, n_boot=50)
    assert same["margin"] == 0.0 and same["low"] == 0.0 == same["high"] and same["p_le_zero"] == 1.0
    # hand case: P ranks perfectly (AUC 1), Q inverts (AUC 0): margin 1 on every replicate that has both classes
    y = np.array([[0.0], [1.0], [0.0], [1.0]])
    assert paired_bootstrap_auc_margin(y, y, 1 - y, n_boot=100)["low"] == 1.0
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap_auc_margin(Y, good[:, :1], noise)


def test_bootstrap_operating_point_matches_the_point_and_brackets_it():
    from training.evaluate.uncertainty import bootstrap_operating_point

    rng = np.random.default_rng(1)
    Y = (rng.random((300, 3)) < [0.6, 0.7, 0.9]).astype(float)
    Y[::11, 0] = np.nan                                   # missing labels are excluded, not wrong
    C = np.tile([1.0, 2.0, 10.0], (300, 1)) * rng.uniform(0.5, 1.5, (300, 1))
    choice = rng.integers(0, 3, 300)
    out = bootstrap_operating_point(Y, C, choice, best=2, dear=2, n_boot=300)
    acc, cost = m.routing_outcome(Y, C, choice)
    np.testing.assert_allclose(out["accuracy"][0], acc)
    np.testing.assert_allclose(out["cost_savings"][0], m.cost_savings(cost, C[:, 2].mean()))
    np.testing.assert_allclose(out["accuracy_minus_best"][0], acc - np.nanmean(Y[:, 2]))
    for v, lo, hi in out.values():
        assert lo < v < hi and hi - lo < 0.2
    assert out["accuracy_minus_best"][2] < 0 and 0.4 < out["cost_savings"][1]   # clearly worse, clearly cheaper
    same = bootstrap_operating_point(Y, C, np.full(300, 2), best=2, dear=2, n_boot=50)
    assert same["accuracy_minus_best"] == [0.0, 0.0, 0.0] and same["cost_savings"] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="one choice per row"):
        bootstrap_operating_point(Y, C, choice[:10], best=2, dear=2)


def test_weighted_auc_is_the_auc_of_the_resampled_rows():
    from training.evaluate.uncertainty import rank_auc
    from training.metrics import weighted_auc

    rng = np.random.default_rng(2)
    y, p = (rng.random(60) < 0.4).astype(float), np.round(rng.random(60), 1)  # ties
    draws = [rng.integers(0, 60, size=60) for _ in range(5)]
    W = np.stack([np.bincount(d, minlength=60) for d in draws])
    expected = [rank_auc(y[d, None], p[d, None])[0] for d in draws]
    np.testing.assert_allclose(weighted_auc(y, p, W), expected)
    assert np.isnan(weighted_auc(y, p, (y >= 0.5)[None].astype(float)))[0]  # only positives weighted
    assert np.isnan(weighted_auc(y[:0], p[:0], np.ones((2, 0)))).all()


def test_within_group_auc_ignores_ranking_across_groups():
    from training.evaluate.uncertainty import paired_bootstrap_auc_margin, rank_auc
    from training.metrics import within_group_auc

    rng = np.random.default_rng(1)
    groups = np.array(["easy"] * 300 + ["hard"] * 200, dtype=object)
    Y = (rng.random((500, 2)) < np.where(groups == "easy", 0.9, 0.2)[:, None]).astype(float)
    task_only = np.where(groups == "easy", 0.9, 0.2)[:, None] + 0.001 * rng.random((500, 2))  # knows the task only
    within = task_only + 0.3 * Y  # also ranks the queries inside each task
    assert rank_auc(Y, task_only).min() > 0.8  # pooled, knowing the task looks good ...
    assert np.abs(within_group_auc(Y, task_only, groups) - 0.5).max() < 0.1  # ... inside a task it is chance
    assert within_group_auc(Y, within, groups).min() > 0.95
    # hand case: AUC 1 in group a (3 rows), 0 in group b (1 positive, 1 negative): (3 * 1 + 2 * 0) / 5
    y = np.array([[0.0], [1.0], [1.0], [0.0], [1.0]])
    p = np.array([[0.1], [0.2], [0.3], [0.9], [0.8]])
    assert within_group_auc(y, p, np.array(list("aaabb"), dtype=object))[0] == pytest.approx(0.6)
    assert np.isnan(within_group_auc(np.ones((4, 1)), p[:4], np.array(list("aabb"), dtype=object))[0])
    pooled = paired_bootstrap_auc_margin(Y, task_only, rng.random(Y.shape), n_boot=100)
    inside = paired_bootstrap_auc_margin(Y, task_only, rng.random(Y.shape), n_boot=100, groups=groups)
    assert pooled["low"] > 0.3 and inside["low"] < 0 < inside["high"]
    better = paired_bootstrap_auc_margin(Y, within, task_only, n_boot=100, groups=groups)
    assert better["margin"] == pytest.approx(np.mean(within_group_auc(Y, within, groups)
                                                     - within_group_auc(Y, task_only, groups)))
    assert better["low"] > 0.3 and better["p_le_zero"] == 0.0
    with pytest.raises(ValueError, match="groups has 3 entries"):
        paired_bootstrap_auc_margin(Y, within, task_only, groups=groups[:3])


# ------------------------------------------------------------------- report metrics
def test_iso_accuracy_savings_hand_case():
    from training.evaluate.report_metrics import iso_accuracy_savings

    # reference (best single): accuracy .8 at cost 10. Points (cost, acc): (2, .6) too weak,
    # (4, .8) reaches it -> 1 - 4/10 = .6, (6, .9) -> .4, (12, .95) -> -.2. Largest: .6.
    costs, accs = [2, 4, 6, 12], [0.6, 0.8, 0.9, 0.95]
    assert iso_accuracy_savings(costs, accs, 0.8, 10) == pytest.approx(0.6)
    # only the point dearer than the reference reaches .94: a negative saving
    assert iso_accuracy_savings(costs, accs, 0.94, 10) == pytest.approx(-0.2)
    # none reaches .99 ("not reached"); a NaN accuracy never counts; a zero-cost reference is undefined
    assert math.isnan(iso_accuracy_savings(costs, accs, 0.99, 10))
    assert math.isnan(iso_accuracy_savings([1], [NAN], 0.0, 10))
    assert math.isnan(iso_accuracy_savings(costs, accs, 0.8, 0.0))
    # a sweep point equal to the reference up to rounding still counts (1e-12 slack)
    assert iso_accuracy_savings([10], [0.8 - 1e-15], 0.8, 10) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="aligned"):
        iso_accuracy_savings([1, 2], [0.5], 0.5, 1)


def test_best_gap_at_savings_hand_case():
    from training.evaluate.report_metrics import best_gap_at_savings

    # best single .8, oracle 1.0 (headroom .2); most expensive costs 100; threshold 74.31%
    # -> points must cost <= 25.69. (20, .7): gap -.5; (25, .75): -.25; (30, .9): too dear.
    costs, accs = [20, 25, 30], [0.7, 0.75, 0.9]
    assert best_gap_at_savings(costs, accs, 0.8, 1.0, 100, 0.7431) == pytest.approx(-0.25)
    # at 50% savings (cost <= 50) the (30, .9) point counts: gap (.9 - .8) / .2 = .5
    assert best_gap_at_savings(costs, accs, 0.8, 1.0, 100, 0.5) == pytest.approx(0.5)
    # exactly at the threshold counts (1 - 25.69/100 = .7431)
    assert best_gap_at_savings([25.69], [0.8], 0.8, 1.0, 100, 0.7431) == pytest.approx(0.0)
    assert math.isnan(best_gap_at_savings(costs, accs, 0.8, 1.0, 100, 0.9))   # nothing that cheap
    assert math.isnan(best_gap_at_savings(costs, accs, 0.8, 0.8, 100, 0.5))   # no headroom
    assert math.isnan(best_gap_at_savings([10], [NAN], 0.8, 1.0, 100, 0.5))   # no labelled point


def test_hull_gap_at_savings_hand_case():
    from training.evaluate.report_metrics import hull_gap_at_savings

    # hull (1, .5) -> (5, .9) -> (10, .95); most expensive 10, best .95, oracle 1.0.
    # 60% savings: budget 4 -> accuracy .5 + .4 * 3/4 = .8 -> gap (.8 - .95) / .05 = -3
    hc, ha = [1, 5, 10], [0.5, 0.9, 0.95]
    assert hull_gap_at_savings(hc, ha, 0.95, 1.0, 10, 0.6) == pytest.approx(-3.0)
    assert hull_gap_at_savings(hc, ha, 0.95, 1.0, 10, 0.0) == pytest.approx(0.0)  # budget 10: the best model
    assert math.isnan(hull_gap_at_savings(hc, ha, 0.95, 1.0, 10, 0.95))           # budget .5 < cheapest
    # the hull ends before the budget: its last (most accurate) vertex
    assert hull_gap_at_savings([1, 2], [0.5, 0.7], 0.7, 0.9, 10, 0.5) == pytest.approx(0.0)


def test_group_masks():
    from training.evaluate.report_metrics import group_masks

    masks = group_masks(["b", "a", "b", "c"])
    assert list(masks) == ["a", "b", "c"]
    assert masks["b"].tolist() == [True, False, True, False] and masks["a"].sum() == 1
