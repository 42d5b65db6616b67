"""SharedTrunkNet seed ensemble on a real local Ray cluster with Ray Train (2 CPU workers)."""

import numpy as np
import pytest

from training.metrics import masked_auc
from training.fit.train_ray import TrainRunConfig, train_ensemble


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from shared.ray_boot import ensure_ray

    ensure_ray("local", num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


def problem(seed=0, n=600, d=24):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    Y = np.stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0, X[:, 3] > 0.5], axis=1).astype(np.float32)
    Y[rng.random(Y.shape) < 0.1] = np.nan  # missing labels are masked, not read as 0
    return X, Y


@pytest.mark.slow
def test_two_worker_fit_learns_and_resumes(ray_cluster, tmp_path):
    X, Y = problem()
    tr, va = slice(0, 450), slice(450, 600)
    cfg = TrainRunConfig(seeds=2, keep=2, num_workers=2, storage_path=str(tmp_path), name="run",
                         trunk={"max_epochs": 40, "patience": 5, "batch_size": 128})
    members, metrics = train_ensemble(X[tr], Y[tr], X[va], Y[va], cfg)
    assert sorted(m.seed for m in members) == [0, 1]
    assert metrics["members"] == 2 and metrics["round"] == 0  # 2 seeds on 2 workers: one round
    probs = np.mean([1 / (1 + np.exp(-m.build()(__import__("torch").as_tensor(X[va])).detach().numpy()))
                     for m in members], axis=0)
    assert np.nanmean(masked_auc(Y[va], probs)) > 0.85

    # Same storage path and name: the two finished seeds come from the checkpoint.
    more = cfg.model_copy(update={"seeds": 4})
    again, metrics = train_ensemble(X[tr], Y[tr], X[va], Y[va], more)
    assert sorted(m.seed for m in again) == [0, 1, 2, 3]
    assert metrics["round"] == 0, "only the two new seeds should have been trained (one round)"
    old = {m.seed: m.val_loss for m in members}
    assert all(m.val_loss == old[m.seed] for m in again if m.seed in old)
