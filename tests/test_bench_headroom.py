"""The synthetic predictions of bench/routing_headroom.py: calibrated, and as good as sigma says."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def headroom():
    spec = importlib.util.spec_from_file_location("routing_headroom", ROOT / "bench" / "routing_headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("rho", [0.0, 0.5])
def test_synthetic_proba_is_calibrated_and_ranks_by_sigma(headroom, rho):
    from training.evaluate.uncertainty import rank_auc

    rng = np.random.default_rng(0)
    base = np.array([0.85, 0.4])
    Y = (rng.random((20000, 2)) < base).astype(float)
    aucs = []
    for sigma in (3.0, 1.0, 0.4):
        P = headroom.synthetic_proba(Y, base, sigma, rho, rng)
        assert P.shape == Y.shape and np.all((P > 0) & (P < 1))
        for lo in (0.1, 0.3, 0.5, 0.7):  # reliability: among P in a bin, the share right is about P
            m = (P >= lo) & (P < lo + 0.2)
            if m.sum() > 500:
                assert abs(Y[m].mean() - P[m].mean()) < 0.03
        aucs.append(rank_auc(Y, P).mean())
    assert aucs[0] < 0.7 < aucs[1] < 0.9 < aucs[2]
