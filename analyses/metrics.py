"""Scores shared by the analyzers: one ROC AUC, so a probe's AUC and a module's AUC are the same number."""

from __future__ import annotations

import numpy as np


def rank_auc(y01: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney U statistic (ties count half); NaN with one class only.

    Why not scikit-learn's ``roc_auc_score``: this runs once per module × attribute × fold in ``layers``
    and per probe fold, where its input checks cost more than the ranking; the value is the same.
    """
    from scipy.stats import rankdata

    pos = np.asarray(y01) == 1
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
