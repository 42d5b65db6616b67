"""Layer-probe metrics: Fisher separability J, effective dimensionality d_eff and a
cross-validated linear-probe AUC of one feature block against one target's labels.

``X`` is ``(n, d)``, ``y`` ``(n,)`` in [0, 1] (0/1 or a soft score) with NaN for a missing
label (dropped). The probe AUC uses soft labels as they are (:func:`training.metrics.soft_rows`:
a score ``y`` is a positive of weight ``y`` and a negative of weight ``1 - y``). Fisher J needs
two classes of points, so it thresholds: ``y >= 0.5`` (``training.labels.RIGHT_AT``) is "correct"; the
probe's folds are stratified by the same threshold. Formulas are in each docstring (the
paper's definitions, method notes).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from training.labels import RIGHT_AT
from training.metrics import masked_auc, soft_rows


def _labelled(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a present label, and their labels (soft scores kept)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    return X[keep], y[keep]


def fisher_separability(X: np.ndarray, y: np.ndarray) -> float:
    """Fisher separability ``J = ||mu_+ - mu_-||^2 / (tr S_+ + tr S_-)``.

    ``X`` ``(n, d)``, ``y`` ``(n,)`` (NaN rows dropped). Thresholded: ``y >= 0.5`` is +, so a
    soft score of 0.4 counts as wrong here (J compares two classes of points). ``S_+-`` are
    the unbiased (ddof=1) class covariances, so ``tr S = sum_k var_k``. Returns nan when
    a class has fewer than 2 samples (its covariance is undefined) or when both the
    numerator and denominator are 0; ``inf`` when the classes are distinct points.
    """
    X, y = _labelled(X, y)
    pos, neg = X[y >= RIGHT_AT], X[y < RIGHT_AT]
    if len(pos) < 2 or len(neg) < 2:
        return float("nan")
    num = float(np.sum((pos.mean(0) - neg.mean(0)) ** 2))
    den = float(pos.var(0, ddof=1).sum() + neg.var(0, ddof=1).sum())
    if den == 0.0:
        return float("nan") if num == 0.0 else float("inf")
    return num / den


def effective_dimensionality(X: np.ndarray) -> float:
    """Participation ratio ``d_eff = (sum_i l_i)^2 / sum_i l_i^2`` of the eigenvalues
    ``l_i`` of the covariance of ``X`` ``(n, d)``.

    The nonzero eigenvalues of ``Xc^T Xc`` (d x d) equal those of the Gram matrix
    ``Xc Xc^T`` (n x n), so the smaller one is decomposed. The ratio is scale-free, so
    the ``1/(n-1)`` factor is dropped. nan for ``n < 2`` or zero variance.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.shape[0] < 2:
        return float("nan")
    Xc = X - X.mean(axis=0)
    gram = Xc @ Xc.T if X.shape[0] < X.shape[1] else Xc.T @ Xc
    lam = np.clip(np.linalg.eigvalsh(gram), 0.0, None)
    total = lam.sum()
    return float("nan") if total <= 0 else float(total**2 / np.sum(lam**2))


def _fold_auc(X: np.ndarray, y: np.ndarray, fit: np.ndarray, held: np.ndarray, C: float) -> float:
    """Soft AUC on ``held`` of a logistic probe fitted on ``fit``: ``StandardScaler`` on the
    ``fit`` rows, then ``LogisticRegression(C)`` on their :func:`soft_rows` (the soft-target
    cross-entropy); scored on its decision function with :func:`training.metrics.masked_auc`."""
    scaler = StandardScaler().fit(X[fit])
    rows, labels, weights = soft_rows(y[fit])
    probe = LogisticRegression(C=C, max_iter=2000).fit(scaler.transform(X[fit])[rows], labels, sample_weight=weights)
    return masked_auc(y[held], probe.decision_function(scaler.transform(X[held])))


def probe_auc(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, C: float = 1.0) -> float:
    """Mean soft ROC AUC over stratified K folds of ``StandardScaler -> LogisticRegression(C)``.

    ``X`` ``(n, d)``, ``y`` ``(n,)`` in [0, 1]; rows with NaN labels are excluded (not read as 0).
    The probe is fitted on soft targets (each row as class 1 with weight ``y`` and class 0 with
    weight ``1 - y``) and scored by :func:`training.metrics.masked_auc` on the held-out fold; with
    0/1 labels this is sklearn's ``cross_val_score(..., scoring="roc_auc")`` exactly. The folds
    are stratified by ``y >= 0.5`` (the only threshold), ``folds`` lowered to the smaller side's
    size; nan when that is below 2.
    """
    X, y = _labelled(X, y)
    side = (y >= RIGHT_AT).astype(int)
    k = min(folds, int(np.bincount(side, minlength=2).min()))
    if k < 2:
        return float("nan")
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(np.mean([_fold_auc(X, y, fit, held, C) for fit, held in cv.split(X, side)]))
