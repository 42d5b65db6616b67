"""Layer-probe metrics: Fisher separability J, effective dimensionality d_eff and a
cross-validated linear-probe AUC of one feature block against one target's labels.

``X`` is ``(n, d)``, ``y`` ``(n,)`` with NaN for a missing label (dropped) and ``y >= 0.5``
as "correct". Formulas are in each docstring (the paper's definitions, method notes).
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def _labelled(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a present label; labels binarised (``y >= 0.5``)."""
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    return X[keep], (y[keep] >= 0.5).astype(int)


def fisher_separability(X: np.ndarray, y: np.ndarray) -> float:
    """Fisher separability ``J = ||mu_+ - mu_-||^2 / (tr S_+ + tr S_-)``.

    ``X`` ``(n, d)``, ``y`` ``(n,)`` (NaN rows dropped, ``y >= 0.5`` is +). ``S_+-`` are
    the unbiased (ddof=1) class covariances, so ``tr S = sum_k var_k``. Returns nan when
    a class has fewer than 2 samples (its covariance is undefined) or when both the
    numerator and denominator are 0; ``inf`` when the classes are distinct points.
    """
    X, y = _labelled(X, y)
    pos, neg = X[y == 1], X[y == 0]
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


def probe_auc(X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, C: float = 1.0) -> float:
    """Mean ROC AUC over stratified K folds of ``StandardScaler -> LogisticRegression(C)``.

    ``X`` ``(n, d)``, ``y`` ``(n,)``; rows with NaN labels are excluded (not read as 0).
    ``folds`` is lowered to the minority class size; nan when that is below 2.
    """
    X, y = _labelled(X, y)
    k = min(folds, int(np.bincount(y, minlength=2).min()))
    if k < 2:
        return float("nan")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(model, X, y, cv=cv, scoring="roc_auc")))
