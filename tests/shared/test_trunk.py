"""SharedTrunkNet, the masked loss, the numpy feature transform and the ensemble."""

import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shared.trunk import Ensemble, FeatureTransform, SharedTrunkNet, masked_bce_loss
from training.loop import TrainResult, TrunkConfig, build_ensemble, select_ensemble, train_one

FAST = TrunkConfig(batch_size=64, max_epochs=60, patience=10)


def synthetic(n, seed, missing=0.0):
    """Three targets, each a simple function of the first features; some labels missing."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 20)).astype(np.float32)
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0, X[:, 3] > 0.5]).astype(np.float32)
    Y[rng.uniform(size=Y.shape) < missing] = np.nan
    return X, Y


def test_architecture_matches_reference_recipe():
    net = SharedTrunkNet(40, 3)
    kinds = [type(layer).__name__ for layer in net.net]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [net.net[i].p for i in (2, 5)] == [0.3, 0.2]
    assert net.net[0].out_features == 256 and net.net[3].out_features == 128
    assert net(torch.zeros(5, 40)).shape == (5, 3)


def test_masked_loss_hand_value_and_ignores_masked_entries():
    # present entries: bce(0, 1) = log 2 = 0.693147; bce(-1, 0) = log(1 + e^-1) = 0.313262
    # mean = 0.503204. The masked entries (one holds NaN) must not matter.
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]], requires_grad=True)
    y = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    loss = masked_bce_loss(logits, y, mask)
    assert float(loss.detach()) == pytest.approx(0.503204, abs=1e-6)
    loss.backward()
    assert logits.grad[0, 1] == 0 and logits.grad[1, 1] == 0
    y_other = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # different values where masked
    assert float(masked_bce_loss(logits, y_other, mask).detach()) == pytest.approx(float(loss.detach()))
    # mask=None derives the mask from NaN: only (1, 1) added -> bce(0, 1) = log 2
    expected = (0.693147 + 0.313262 + 0.693147) / 3
    assert float(masked_bce_loss(logits, y).detach()) == pytest.approx(expected, abs=1e-6)


def test_train_one_learns_separable_targets_with_missing_labels():
    Xtr, Ytr = synthetic(600, 0, missing=0.2)
    Xva, Yva = synthetic(200, 1, missing=0.2)
    Xte, Yte = synthetic(400, 2)
    res = train_one(Xtr, Ytr, None, Xva, Yva, None, seed=0, cfg=FAST)
    assert math.isfinite(res.val_loss) and 0 <= res.best_epoch < res.epochs_run <= FAST.max_epochs
    P = build_ensemble([res]).predict_proba(Xte)
    aucs = [roc_auc_score(Yte[:, j], P[:, j]) for j in range(3)]
    assert min(aucs) > 0.9, aucs


def test_train_one_is_deterministic_and_leaves_global_rng_alone():
    Xtr, Ytr = synthetic(200, 0)
    Xva, Yva = synthetic(100, 1)
    cfg = TrunkConfig(batch_size=64, max_epochs=3, patience=2)
    state = torch.random.get_rng_state()
    a = train_one(Xtr, Ytr, None, Xva, Yva, None, seed=5, cfg=cfg)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_one(Xtr, Ytr, None, Xva, Yva, None, seed=5, cfg=cfg)
    assert a.val_loss == b.val_loss
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_select_ensemble_keeps_k_lowest_val_loss():
    results = [TrainResult(seed=s, val_loss=v, best_epoch=0, epochs_run=1, state_dict={})
               for s, v in [(0, 0.5), (1, 0.2), (2, 0.3), (3, 0.9)]]
    assert [r.seed for r in select_ensemble(results, 2)] == [1, 2]
    with pytest.raises(ValueError):
        select_ensemble(results, 0)


def test_ensemble_averages_sigmoids():
    torch.manual_seed(0)
    nets = [SharedTrunkNet(4, 2, hidden=[8], dropout=[0.5]) for _ in range(2)]
    X = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    with torch.no_grad():
        expected = sum(torch.sigmoid(n.eval()(torch.from_numpy(X))) for n in nets).numpy() / 2
    np.testing.assert_allclose(Ensemble(nets).predict_proba(X), expected, rtol=1e-6)


def test_transform_fitted_on_train_only_matches_sklearn_and_round_trips():
    rng = np.random.default_rng(0)
    train = {"L3.last": rng.normal(2, 3, size=(80, 12)), "L6.mean": rng.normal(size=(80, 7))}
    test = {"L3.last": rng.normal(5, 1, size=(30, 12)), "L6.mean": rng.normal(size=(30, 7))}
    ft = FeatureTransform.fit(train, n_components=5)
    assert ft.d_out == 10 and ft.spec()[0] == {"name": "L3.last", "d_in": 12, "d_out": 5}
    # the scaler statistics are the TRAIN ones (test has a different mean)
    np.testing.assert_allclose(ft.blocks[0].mean, train["L3.last"].mean(0))
    np.testing.assert_allclose(ft.blocks[0].scale, train["L3.last"].std(0))
    # numpy application == an sklearn pipeline fitted on the same train data
    # (compared up to each component's sign, which SVD leaves free)
    z = ft.transform(test)
    for i, name in enumerate(train):
        ref = make_pipeline(StandardScaler(), PCA(5, svd_solver="full")).fit(train[name]).transform(test[name])
        part = z[:, 5 * i: 5 * (i + 1)].astype(np.float64)
        signs = np.sign(np.sum(part * ref, axis=0))
        np.testing.assert_allclose(part * signs, ref, rtol=1e-4, atol=1e-4)
    # arrays round trip without sklearn objects
    again = FeatureTransform.from_arrays(ft.names, ft.to_arrays())
    np.testing.assert_array_equal(again.transform(test), z)
    # a transform fitted on train + test differs (so fitting on train only is observable)
    both = {k: np.vstack([train[k], test[k]]) for k in train}
    assert not np.allclose(FeatureTransform.fit(both, n_components=5).blocks[0].mean, ft.blocks[0].mean)


def test_transform_clips_components_and_checks_blocks():
    rng = np.random.default_rng(1)
    ft = FeatureTransform.fit({"a": rng.normal(size=(10, 50))}, n_components=30)
    assert ft.d_out == 10  # min(30, n=10, d=50)
    with pytest.raises(ValueError, match="missing"):
        ft.transform({"b": rng.normal(size=(2, 50))})
    with pytest.raises(ValueError, match="expected"):
        ft.transform({"a": rng.normal(size=(2, 49))})
