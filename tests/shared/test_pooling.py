"""The learned token pooling (``h{layer}_attn``): masking, the soft masked loss, and a toy where only one
token of each prompt carries the label, so attention pooling must beat mean pooling."""

import numpy as np
import pytest
import torch

from shared.features import is_attn, parse_block
from shared.pooling import AttentionPool, PooledTrunkNet, TokenTransform, assemble_window, pad_windows
from training.loop import TrunkConfig, train_one
from training.metrics import masked_auc
from training.pooled import PoolConfig, ensemble_proba, fit_inputs, take, train_pooled_one


def toy(n=900, W=24, D=8, seed=0):
    """Token states ``(n, W, D)`` of random length ``8..W``: one real token per row carries a marker
    (dim 0 = 4) and the label (``y = dim 1 > 0`` on that token); all other tokens are N(0, 1) noise."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, W + 1, size=n)
    states = rng.normal(size=(n, W, D)).astype(np.float32)
    states[:, :, 0] = np.clip(states[:, :, 0], -2, 2)
    mask = np.arange(W)[None, :] < lengths[:, None]
    key = (rng.random(n) * lengths).astype(int)
    states[np.arange(n), key, 0] = 4.0
    y = (states[np.arange(n), key, 1] > 0).astype(np.float32)
    states[~mask] = np.nan  # padding is never read
    return states, mask, y[:, None]


def test_block_names_and_window_assembly():
    assert parse_block("h12_attn") == (12, "attn") and is_attn("h12_attn") and not is_attn("h12_last")
    own, prefix = np.arange(6).reshape(3, 2), np.arange(100, 110).reshape(5, 2)
    np.testing.assert_array_equal(assemble_window(own, prefix, 5)[:, 0], [106, 108, 0, 2, 4])
    np.testing.assert_array_equal(assemble_window(own, prefix, 2), own[-2:])
    assert assemble_window(own, None, 5).shape == (3, 2)
    states, mask = pad_windows([own, own[:1]], 4)
    assert states.shape == (2, 4, 2) and mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3]


def test_attention_never_reads_padding():
    torch.manual_seed(0)
    pool = AttentionPool(k=4, n_queries=2)
    z = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]).bool()
    out = pool(z, mask)
    poisoned = z.masked_fill(~mask.unsqueeze(-1), float("nan"))
    torch.testing.assert_close(pool(poisoned, mask), out)
    a = pool.weights(poisoned, mask)
    assert torch.all(a[~mask] == 0)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(3, 2))
    torch.testing.assert_close(out[2, :4], z[2, 0])  # one real token: the pooled vector is that token
    with torch.no_grad():
        pool.queries.zero_()  # zero queries: mean pooling over the real tokens
    torch.testing.assert_close(pool(poisoned, mask)[0, :4], z[0, :3].mean(dim=0))


def test_masked_soft_loss_keeps_soft_labels_and_skips_missing():
    """Target 0 carries a soft score 0.7 everywhere, target 1 only NaN (missing) on half the rows: training
    is finite, P(target 0) is the soft score, not a thresholded 1, and the missing labels pull nothing."""
    states, mask, _ = toy(n=300)
    Y = np.stack([np.full(300, 0.7), np.where(np.arange(300) % 2 == 0, np.nan, 0.2)], axis=1).astype(np.float32)
    rows = np.arange(300)
    inputs = fit_inputs({}, {"h1_attn": (states, mask)}, rows, 8, PoolConfig(n_components=8))
    assert inputs[0].shape == (300, 0) and inputs[1].shape == (300, 24, 8) and np.isfinite(inputs[1]).all()
    cfg = TrunkConfig(lr=1e-2, max_epochs=60, patience=60)
    res = train_pooled_one((take(inputs, rows[:250]), Y[:250]), (take(inputs, rows[250:]), Y[250:]), 0, cfg,
                           PoolConfig(n_components=8))
    assert np.isfinite(res.val_loss)
    P = ensemble_proba([res], inputs)
    assert abs(P[:, 0].mean() - 0.7) < 0.05 and abs(P[:, 1].mean() - 0.2) < 0.05


@pytest.mark.parametrize("n_queries", [1, 2])
def test_attention_pooling_beats_mean_pooling_when_one_token_carries_the_label(n_queries):
    states, mask, Y = toy()
    tr, te = np.arange(600), np.arange(600, 900)
    fit, es = tr[:500], tr[500:]
    cfg = TrunkConfig(lr=3e-3, max_epochs=150, patience=20, hidden=[32], dropout=[0.1])
    pool = PoolConfig(n_components=8, n_queries=n_queries)
    inputs = fit_inputs({}, {"h1_attn": (states, mask)}, fit, 8, pool)
    res = train_pooled_one((take(inputs, fit), Y[fit]), (take(inputs, es), Y[es]), 0, cfg, pool)
    attn_auc = masked_auc(Y[te], ensemble_proba([res], take(inputs, te)))[0]

    mean = (np.where(mask[:, :, None], np.nan_to_num(states), 0).sum(1) / mask.sum(1, keepdims=True)).astype(np.float32)
    member = train_one(mean[fit], Y[fit], None, mean[es], Y[es], None, seed=0, cfg=cfg)
    with torch.no_grad():
        mean_auc = masked_auc(Y[te], torch.sigmoid(member.build()(torch.as_tensor(mean[te]))).numpy())[0]
    assert attn_auc > 0.8 and attn_auc > mean_auc + 0.15, (attn_auc, mean_auc)


def test_token_transform_standardises_then_projects():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 6)) * np.array([100, 1, 1, 1, 1, 1]) + 50
    tt = TokenTransform.fit(x, k=3)
    z = tt.apply(x[None].astype(np.float16), np.ones((1, 500), bool))[0]
    assert z.shape == (500, 3) and abs(z.mean()) < 0.05 and 0.5 < z.std() < 2
    back = TokenTransform.from_arrays("t", tt.to_arrays("t"))
    np.testing.assert_allclose(back.components, tt.components)


def test_pooled_net_takes_dense_features_beside_tokens():
    net = PooledTrunkNet(d_dense=5, token_dims=[4, 3], n_targets=2, n_queries=2, hidden=[8], dropout=[0.0])
    x = torch.randn(2, 5)
    out = net(x, torch.randn(2, 7, 4), torch.ones(2, 7, dtype=torch.bool), torch.randn(2, 3, 3),
              torch.ones(2, 3, dtype=torch.bool))
    assert out.shape == (2, 2) and net.trunk.d_in == 5 + 8 + 6
    with pytest.raises(ValueError, match="pairs"):
        net(x, torch.randn(2, 7, 4))
    assert PooledTrunkNet(**net.spec()).spec() == net.spec()


def test_position_bias_can_express_last_token_pooling_and_the_pooling_gets_its_own_rate():
    torch.manual_seed(0)
    pool = AttentionPool(k=4, n_queries=1, window=6)
    z = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool()
    with torch.no_grad():
        pool.queries.zero_()
        torch.testing.assert_close(pool(z, mask)[0], z[0, :3].mean(dim=0))  # zero bias: mean pooling
        pool.bias[0, 0] = 50.0  # distance 0 from the last real token
    torch.testing.assert_close(pool(z, mask), torch.stack([z[0, 2], z[1, 5]]), atol=1e-6, rtol=1e-5)
    assert not AttentionPool(k=4).bias.requires_grad  # window 0: content only
    net = PooledTrunkNet(0, [4], 1, window=6, pool_lr_scale=30, hidden=[8], dropout=[0.0])
    trunk, pools = net.param_groups(1e-3)
    assert pools["lr"] == pytest.approx(3e-2) and trunk["lr"] == 1e-3
    assert {id(p) for p in pools["params"]} == {id(net.pools[0].queries), id(net.pools[0].bias)}



def test_training_on_inputs_that_are_never_finite_stops_with_a_clear_error_not_a_crash():
    """A NaN or inf input makes every loss NaN: early stopping never keeps a state; training says so and what to
    do, instead of failing later on a missing state dict (as tune did on a Gemma capture with fp16 overflow)."""
    from shared.errors import BadInput

    states, mask, Y = toy(n=200)
    pool = PoolConfig(n_components=4)
    inputs = list(fit_inputs({}, {"h1_attn": (states, mask)}, np.arange(150), 4, pool))
    inputs[1][mask.nonzero()[0][0], 0, 0] = np.inf
    inputs = tuple(inputs)
    cfg = TrunkConfig(max_epochs=3, patience=1, hidden=[8], dropout=[0.0])
    with pytest.raises(BadInput, match="validation loss was never finite .* capture again"):
        train_pooled_one((take(inputs, np.arange(150)), Y[:150]), (take(inputs, np.arange(150, 200)), Y[150:]), 0,
                         cfg, pool)
