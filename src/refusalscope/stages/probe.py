"""The linear-probe baseline for Stage 3 (paper, "Stage 3: Discovering feature interactions", Eq. 2).

Eq. 2's factorization machine (Rendle 2010) without its pairwise term is logistic regression,
ŷ(x) = w0 + Σ_i w_i x_i: the probe sees the same sparse columns, and ranks features by |w_i| where the FM ranks
pairs by the cosine of their embeddings. Pure scikit-learn on the scipy sparse matrix, no I/O.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

# our choice: C from 1e-3 to 10 by decades; rows (~1k) ≪ columns (~1M), so the grid leans to strong L2
C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


@dataclass
class ProbeFit:
    weights: np.ndarray  # (n_features,)
    bias: float
    C: float
    val_accuracy: float
    grid: dict[float, float] = field(default_factory=dict)  # C -> validation accuracy


def _auroc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else float("nan")


def probe_logits(fit: ProbeFit, X) -> np.ndarray:
    return np.asarray(sp.csr_matrix(X) @ fit.weights).reshape(-1) + fit.bias


def train_probe(X_train, y_train, X_val, y_val, *, C_grid=C_GRID, seed: int = 0, max_iter: int = 1000) -> ProbeFit:
    """L2 logistic regression for each C in ``C_grid``; keeps the best validation accuracy (ties: the smaller C,
    i.e. the stronger regularization)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    X_train, X_val = sp.csr_matrix(X_train), sp.csr_matrix(X_val)
    y_train, y_val = np.asarray(y_train).reshape(-1), np.asarray(y_val).reshape(-1)
    best: ProbeFit | None = None
    grid = {}
    for C in sorted(C_grid):
        clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
        with warnings.catch_warnings():
            # a separable training set (common with 1M columns) only stops lbfgs at max_iter; the fit stays usable
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(X_train, y_train)
        fit = ProbeFit(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), float(C), float("nan"))
        logits = probe_logits(fit, X_val)
        fit.val_accuracy = float(((logits > 0) == (y_val == 1)).mean()) if len(y_val) else float("nan")
        grid[float(C)] = fit.val_accuracy
        if best is None or fit.val_accuracy > best.val_accuracy:
            best = fit
    if best is None:
        raise ValueError("empty C_grid")
    best.grid = grid
    return best


def evaluate_probe(fit: ProbeFit, X, y) -> dict:
    """Accuracy (label 1 where the logit > 0) and AUROC (nan when y has one class)."""
    logits, y = probe_logits(fit, X), np.asarray(y).reshape(-1)
    acc = float(((logits > 0) == (y == 1)).mean()) if len(y) else float("nan")
    return dict(accuracy=acc, auroc=_auroc(y, logits))


__all__ = ["C_GRID", "ProbeFit", "evaluate_probe", "probe_logits", "train_probe"]
