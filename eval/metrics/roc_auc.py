"""ROC-AUC of a binary classifier's scores (HatefulMemes: the probability of "yes"), x100.

Computed as the Mann-Whitney statistic: the probability that a random positive outscores a random negative, with
ties counting one half. That equals the area under the ROC curve with tied scores joined by straight segments, which
is what scikit-learn's ``roc_auc_score`` (and so the HatefulMemes leaderboard) reports.
"""

from __future__ import annotations

from collections.abc import Sequence


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve x100. ``labels`` are 0/1, ``scores`` any reals (higher means more likely 1).

    O(n log n): sort once and give tied scores their average rank.
    """
    labels, scores = list(labels), [float(s) for s in scores]
    if len(labels) != len(scores):
        raise ValueError(f"roc_auc: {len(labels)} labels but {len(scores)} scores")
    if any(label not in (0, 1) for label in labels):
        raise ValueError(f"roc_auc: labels must be 0 or 1, got {sorted(set(labels) - {0, 1})[:5]}")
    if any(s != s for s in scores):
        raise ValueError("roc_auc: scores contain NaN")
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError(f"roc_auc is undefined with {positives} positive and {negatives} negative examples")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    # Ranks are 1-based; a run of tied scores shares the mean of its ranks, which is what makes ties count 1/2.
    rank_sum_positive = 0.0
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and scores[order[end + 1]] == scores[order[start]]:
            end += 1
        mean_rank = (start + end) / 2 + 1
        rank_sum_positive += mean_rank * sum(labels[order[i]] for i in range(start, end + 1))
        start = end + 1
    wins = rank_sum_positive - positives * (positives + 1) / 2
    return 100.0 * wins / (positives * negatives)
