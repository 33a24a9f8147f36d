"""Membership inference figures from attack scores: ROC AUC and TPR at low FPR.

The standard way to report a membership attack (Carlini et al., "Membership inference
attacks from first principles", 2022): the area under the ROC curve, and the true
positive rate at 0.1 % and 1 % false positives, where an attack matters.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def membership_figures(scores: np.ndarray, members: np.ndarray) -> dict[str, float]:
    """AUC and TPR at 0.1 % / 1 % FPR of "member if the score is high"."""
    members = np.asarray(members, dtype=bool)
    fpr, tpr, _ = roc_curve(members, scores)
    return {
        "auc": float(roc_auc_score(members, scores)),
        "tpr_at_0.1%_fpr": float(np.interp(0.001, fpr, tpr)),
        "tpr_at_1%_fpr": float(np.interp(0.01, fpr, tpr)),
    }
