"""Soft labels (a score in [0, 1]: the probability of the right answer, the share of samples
that passed) are used as they are by the AUCs, Brier, log-loss, the layer probe and the trunk:
a score y counts y right and 1 - y wrong. With 0/1 labels every figure is the old one exactly."""

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from training import metrics as q
from training.fit import separability as sep

NAN = np.nan


def _binary(seed: int, n: int = 300, T: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    P = np.round(rng.random((n, T)), 2)                     # ties
    Y = (rng.random((n, T)) < 0.2 + 0.6 * P).astype(float)
    Y[rng.random((n, T)) < 0.1] = NAN
    return Y, P


def test_binary_labels_give_the_old_figures_exactly():
    """masked_auc was sklearn's roc_auc_score of ``y >= 0.5``; weighted_auc the Mann-Whitney sum
    with ``y >= 0.5`` as the positives; Brier unchanged; log-loss is sklearn's."""
    for seed in range(5):
        Y, P = _binary(seed)
        old = [roc_auc_score(Y[~np.isnan(Y[:, t]), t] >= 0.5, P[~np.isnan(Y[:, t]), t]) for t in range(3)]
        assert q.masked_auc(Y, P).tolist() == old
        keep = ~np.isnan(Y[:, 0])
        y, p = Y[keep, 0], P[keep, 0]
        W = np.random.default_rng(seed).integers(0, 3, (4, len(y))).astype(float)
        order = np.argsort(p, kind="stable")
        ps, pos, Ws = p[order], y[order] >= 0.5, W[:, order]
        starts = np.flatnonzero(np.r_[True, ps[1:] != ps[:-1]])
        neg_w, pos_w = np.add.reduceat(Ws * ~pos, starts, axis=1), np.add.reduceat(Ws * pos, starts, axis=1)
        u = (pos_w * (np.cumsum(neg_w, axis=1) - neg_w + 0.5 * neg_w)).sum(axis=1)
        assert q.weighted_auc(y, p, W).tolist() == (u / (pos_w.sum(axis=1) * neg_w.sum(axis=1))).tolist()
        assert q.log_loss(y, p) == pytest.approx(sk_log_loss(y, np.clip(p, 1e-15, 1 - 1e-15)), rel=1e-12)
    assert math.isnan(q.masked_auc(np.array([1.0, 1.0, NAN]), np.array([0.1, 0.2, 0.3])))


def test_a_score_of_0_4_counts_partly_right():
    # positives: row 0 with weight 0.4, row 2 with weight 1; negatives: row 0 with 0.6, row 1 with 1.
    # pairs: (0+, 0-) tie 0.5*0.4*0.6 = 0.12; (0+, 1-) 0.4; (2+, 0-) 0; (2+, 1-) 1 -> u = 1.52
    # AUC = 1.52 / (1.4 * 1.6) = 0.678571...; thresholded at 0.5 row 0 was wrong: AUC 0.5.
    y, p = np.array([0.4, 0.0, 1.0]), np.array([0.9, 0.1, 0.5])
    assert q.masked_auc(y, p) == pytest.approx(1.52 / 2.24)
    assert q.weighted_auc(y, p, np.ones((1, 3)))[0] == pytest.approx(1.52 / 2.24)
    assert roc_auc_score(y >= 0.5, p) == 0.5
    assert q.brier(y, np.array([0.4, 0.0, 1.0])) == 0.0                    # a perfect soft forecast
    losses = [q.log_loss(np.array([0.4, 0.4]), np.full(2, c)) for c in (0.35, 0.4, 0.45)]
    assert losses[1] < losses[0] and losses[1] < losses[2]                # minimised at p = y
    assert q.log_loss(np.array([0.4, NAN]), np.array([0.4, 0.99])) == pytest.approx(losses[1])
    assert math.isnan(q.masked_auc(np.array([0.0, 0.0]), np.array([0.1, 0.2])))  # no positive weight
    assert q.masked_auc(np.array([0.3, 0.3]), np.array([0.1, 0.2])) == pytest.approx(0.5)


def test_soft_auc_is_the_auc_of_the_samples_behind_each_share():
    """A score k/10 (k of 10 samples passed) ranks exactly like its 10 samples, bootstrapped too."""
    rng = np.random.default_rng(4)
    k, p = rng.integers(0, 11, 80), np.round(rng.random(80), 1)
    samples = np.concatenate([np.r_[np.ones(ki), np.zeros(10 - ki)] for ki in k])
    expanded = np.repeat(p, 10)
    assert q.masked_auc(k / 10, p) == pytest.approx(roc_auc_score(samples, expanded), rel=1e-12)
    W = rng.integers(0, 3, (5, 80)).astype(float)
    want = [roc_auc_score(samples, expanded, sample_weight=np.repeat(w, 10)) for w in W]
    np.testing.assert_allclose(q.weighted_auc(k / 10, p, W), want, rtol=1e-12)
    rows, labels, weights = q.soft_rows(np.array([1.0, 0.25, 0.0]))
    assert (rows.tolist(), labels.tolist(), weights.tolist()) == ([0, 1, 1, 2], [1, 1, 0, 0], [1.0, 0.25, 0.75, 1.0])


def test_probe_auc_binary_is_cross_val_score_and_soft_reads_partial_credit():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 6))
    y = (X[:, 0] + rng.normal(size=240) > 0.3).astype(float)
    y[::17] = NAN
    keep = ~np.isnan(y)
    old = np.mean(cross_val_score(make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)),
                                  X[keep], y[keep].astype(int), scoring="roc_auc",
                                  cv=StratifiedKFold(n_splits=4, shuffle=True, random_state=3)))
    assert sep.probe_auc(X, y, folds=4, seed=3, C=0.5) == old
    # Partial credit carries the signal: rows with x0 > 0 score 0.4, the rest 0; a few random rows
    # score 1. Thresholded at 0.5 only the random rows are right; soft, x0 separates the scores.
    soft = np.where(X[:, 0] > 0, 0.4, 0.0)
    soft[np.random.default_rng(1).choice(240, 12, replace=False)] = 1.0
    best = q.masked_auc(soft, X[:, 0])                  # the ranking x0 itself gives: 0.80
    assert sep.probe_auc(X, soft, folds=4) > best - 0.03 > 0.75
    assert sep.probe_auc(X, (soft >= 0.5).astype(float), folds=4) < 0.65
    assert sep.fisher_separability(X, soft) == sep.fisher_separability(X, (soft >= 0.5).astype(float))  # thresholded


def test_trunk_fits_soft_targets_not_their_rounding():
    """A target whose label is 0.3 on every row is fitted to P = 0.3 (BCE on float targets), not to
    0 (its rounding); masked (NaN) labels are never read."""
    from training.loop import TrunkConfig, build_ensemble, train_one

    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 8)).astype(np.float32)
    Y = np.column_stack([np.full(256, 0.3), np.where(np.arange(256) % 2, 0.8, NAN)])
    cfg = TrunkConfig(hidden=[8], dropout=[0.0], lr=5e-2, batch_size=64, max_epochs=30, patience=10)
    member = train_one(X[:192], Y[:192], None, X[192:], Y[192:], None, seed=0, cfg=cfg)
    P = build_ensemble([member]).predict_proba(X[192:])
    assert np.all(np.abs(P[:, 0] - 0.3) < 0.03) and np.all(np.abs(P[:, 1] - 0.8) < 0.05)
    assert q.log_loss(Y[192:], P)[0] < q.log_loss(Y[192:], np.full_like(P, 0.25))[0]
