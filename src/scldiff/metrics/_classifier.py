"""Can a classifier tell generated cells from real ones? Can one trained on them classify?"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold


def classifier_auc(
    real: np.ndarray,
    generated: np.ndarray,
    n_pcs: int = 30,
    n_folds: int = 5,
    n_estimators: int = 200,
    random_state: int = 0,
) -> float:
    """Real-vs-generated random-forest ROC AUC (0.5: indistinguishable, 1: separable).

    ``real`` and ``generated`` are log-normalised expression matrices on the same genes. The
    larger set is subsampled to the size of the smaller one, a PCA with ``n_pcs``
    components is fitted on the pooled cells (its own, not the real cells' PCA), and a
    random forest is scored by stratified ``n_folds``-fold cross-validation: the AUC of the
    out-of-fold probabilities of all cells together. Stratified folds keep both classes
    balanced in every training fold, so two samples of one distribution score about 0.5.
    Exact copies of the real cells score below 0.5 (each held-out cell's twin is in the
    training fold with the other label), so evaluate against held-out cells only.
    """
    real, generated = np.asarray(real, dtype=np.float64), np.asarray(generated, dtype=np.float64)
    rng = np.random.default_rng(random_state)
    m = min(len(real), len(generated))
    if m < n_folds:
        raise ValueError(f"classifier_auc needs at least n_folds={n_folds} cells in each set.")
    real = real[rng.choice(len(real), m, replace=False)]
    generated = generated[rng.choice(len(generated), m, replace=False)]
    pooled = np.vstack([real, generated])
    origin = np.r_[np.zeros(m, dtype=int), np.ones(m, dtype=int)]
    n_pcs = min(n_pcs, pooled.shape[0] - 1, pooled.shape[1])
    features = PCA(n_components=n_pcs, random_state=random_state).fit_transform(pooled)
    scores = np.zeros(len(origin))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=random_state)
    for train, test in folds.split(features, origin):
        forest = RandomForestClassifier(n_estimators=n_estimators, random_state=random_state,
                                        n_jobs=1).fit(features[train], origin[train])
        scores[test] = forest.predict_proba(features[test])[:, 1]
    return float(roc_auc_score(origin, scores))


def tstr_f1(
    generated: np.ndarray,
    generated_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    n_estimators: int = 200,
    random_state: int = 0,
) -> float:
    """Train on synthetic, test on real: macro-F1 of a random forest.

    The forest learns the labels of the generated cells and predicts those of the real
    cells (features: the same space for both, e.g. the real cells' PCs). The macro average
    runs over the labels of the real cells, so a label the generator gets wrong counts as
    much as a frequent one.
    """
    forest = RandomForestClassifier(n_estimators=n_estimators, random_state=random_state,
                                    n_jobs=1)
    forest.fit(np.asarray(generated), np.asarray(generated_labels))
    predicted = forest.predict(np.asarray(real))
    labels = np.unique(np.asarray(real_labels))
    return float(f1_score(real_labels, predicted, labels=labels, average="macro",
                          zero_division=0))
