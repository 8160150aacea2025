"""Classification and heatmap-quality metrics of the medical pipeline (NumPy only).

Classification: ROC AUC (Mann-Whitney U with tied scores counted half) with a percentile
bootstrap 95% interval, and accuracy, sensitivity (true positive rate) and specificity (true
negative rate) at a decision threshold (`probability >= threshold` is positive).

Heatmap quality, per positive scan with a lesion mask, on any grid where heatmap and mask are
aligned (the pipeline uses the scan's stored grid):

- pointing game: a hit when the heatmap's maximum lies inside the lesion dilated by one voxel
  (26-neighbourhood in 3D), as in Zhang et al. (2018) with their 15-pixel tolerance scaled to
  the voxel; ties go to the first maximum in C order;
- relevance mass: the share of the heatmap's (non-negative) mass inside the lesion, and its
  ratio to chance, the lesion's share of the voxels (a uniform map scores exactly 1x);
- IoU of the top-k% voxels of the heatmap with the lesion;

summarised over scans and by lesion volume (`SIZE_BINS`).

References:
    - Zhang et al., 2018. Top-down Neural Attention by Excitation Backprop.
      https://arxiv.org/abs/1608.00507
    - Arras et al., 2022. CLEVR-XAI: a benchmark dataset for the ground truth evaluation of
      neural network explanations (relevance mass accuracy). https://arxiv.org/abs/2003.07258
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage

__all__ = [
    "SIZE_BINS",
    "bootstrap_auc_ci",
    "classification_metrics",
    "confusion_counts",
    "heatmap_scores",
    "pointing_game_hit",
    "relevance_mass",
    "roc_auc",
    "roc_curve",
    "size_bin",
    "summarize_heatmap_scores",
    "threshold_metrics",
    "top_k_iou",
]

#: Lesion volume bins in millilitres: (name, lower bound inclusive, upper bound exclusive).
SIZE_BINS = (
    ("small (<0.5 mL)", 0.0, 0.5),
    ("medium (0.5-4 mL)", 0.5, 4.0),
    ("large (>=4 mL)", 4.0, math.inf),
)


def _labels_scores(labels, scores):
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.shape} vs {scores.shape}")
    if np.any((labels != 0) & (labels != 1)):
        raise ValueError("labels must be 0 or 1")
    return labels, scores


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve; `nan` when only one class is present.

    Equals the probability that a random positive scores higher than a random negative, ties
    counting one half (the Mann-Whitney U statistic over n_pos * n_neg).
    """
    labels, scores = _labels_scores(labels, scores)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = float(ranks[labels == 1].sum())
    u = rank_sum - positives * (positives + 1) / 2.0
    return u / (positives * negatives)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def roc_curve(labels, scores):
    """`(fpr, tpr, thresholds)` of the ROC curve, from (0, 0) to (1, 1).

    One point per distinct score (descending); `thresholds[0]` is `inf`.
    """
    labels, scores = _labels_scores(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    distinct = np.flatnonzero(np.diff(scores)) if len(scores) else np.array([], int)
    cut = np.concatenate([distinct, [len(scores) - 1]]) if len(scores) else np.array([], int)
    tps = np.cumsum(labels)[cut]
    fps = (cut + 1) - tps
    positives, negatives = max(int(labels.sum()), 1), max(int(len(labels) - labels.sum()), 1)
    fpr = np.concatenate([[0.0], fps / negatives])
    tpr = np.concatenate([[0.0], tps / positives])
    thresholds = np.concatenate([[np.inf], scores[cut]])
    return fpr, tpr, thresholds


def bootstrap_auc_ci(labels, scores, n_resamples=1000, confidence=0.95, seed=0):
    """Percentile bootstrap interval of the AUC, resampling positives and negatives separately.

    Stratified resampling keeps both classes in every resample (the AUC is always defined).

    Returns:
        `(low, high)`, or `(nan, nan)` when a class is missing.
    """
    labels, scores = _labels_scores(labels, scores)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    both = np.concatenate([np.ones(len(pos), int), np.zeros(len(neg), int)])
    for i in range(n_resamples):
        sample = np.concatenate(
            [rng.choice(pos, len(pos), replace=True), rng.choice(neg, len(neg), replace=True)]
        )
        values[i] = roc_auc(both, sample)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def confusion_counts(labels, scores, threshold=0.5) -> dict:
    """`{"tp", "fp", "tn", "fn"}` with `score >= threshold` predicted positive."""
    labels, scores = _labels_scores(labels, scores)
    predicted = scores >= threshold
    return {
        "tp": int(np.sum(predicted & (labels == 1))),
        "fp": int(np.sum(predicted & (labels == 0))),
        "tn": int(np.sum(~predicted & (labels == 0))),
        "fn": int(np.sum(~predicted & (labels == 1))),
    }


def threshold_metrics(labels, scores, threshold=0.5) -> dict:
    """Accuracy, sensitivity and specificity at `threshold` (`nan` where undefined)."""
    c = confusion_counts(labels, scores, threshold)
    total = c["tp"] + c["fp"] + c["tn"] + c["fn"]

    def ratio(a, b):
        return a / b if b else float("nan")

    return {
        "accuracy": ratio(c["tp"] + c["tn"], total),
        "sensitivity": ratio(c["tp"], c["tp"] + c["fn"]),
        "specificity": ratio(c["tn"], c["tn"] + c["fp"]),
        "threshold": float(threshold),
        "confusion": c,
    }


def classification_metrics(labels, scores, threshold=0.5, n_resamples=1000, seed=0) -> dict:
    """AUC with its bootstrap 95% interval plus `threshold_metrics`."""
    low, high = bootstrap_auc_ci(labels, scores, n_resamples=n_resamples, seed=seed)
    result = {"auc": roc_auc(labels, scores), "auc_ci95": [low, high]}
    result.update(threshold_metrics(labels, scores, threshold))
    result["scans"] = int(np.size(labels))
    result["positives"] = int(np.sum(labels))
    return result


# --------------------------------------------------------------------------------------------
# Heatmap quality.


def _check(heatmap, mask):
    heatmap = np.asarray(heatmap, dtype=np.float64)
    mask = np.asarray(mask) > 0
    if heatmap.shape != mask.shape:
        raise ValueError(f"heatmap {heatmap.shape} and mask {mask.shape} differ in shape")
    return heatmap, mask


def pointing_game_hit(heatmap, mask, tolerance=1) -> bool:
    """Whether the heatmap's maximum lies in the mask dilated by `tolerance` voxels."""
    heatmap, mask = _check(heatmap, mask)
    if not mask.any():
        raise ValueError("the pointing game needs a non-empty mask")
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    if tolerance > 0:
        structure = np.ones((3,) * mask.ndim, bool)
        mask = scipy.ndimage.binary_dilation(mask, structure, iterations=tolerance)
    return bool(mask[peak])


def relevance_mass(heatmap, mask) -> float:
    """Share of the heatmap's mass (negative values clipped to 0) inside the mask."""
    heatmap, mask = _check(heatmap, mask)
    heatmap = np.maximum(heatmap, 0.0)
    total = heatmap.sum()
    return float(heatmap[mask].sum() / total) if total > 0 else 0.0


def top_k_iou(heatmap, mask, percent=1.0) -> float:
    """IoU of the `percent`% highest heatmap voxels (at least one) with the mask."""
    heatmap, mask = _check(heatmap, mask)
    k = max(1, int(round(heatmap.size * percent / 100.0)))
    flat = heatmap.reshape(-1)
    top = np.zeros(flat.size, bool)
    top[np.argpartition(-flat, k - 1)[:k]] = True
    top = top.reshape(heatmap.shape)
    union = np.count_nonzero(top | mask)
    return float(np.count_nonzero(top & mask) / union) if union else 0.0


def size_bin(volume_ml: float) -> str:
    """The `SIZE_BINS` name of a lesion volume in millilitres."""
    for name, low, high in SIZE_BINS:
        if low <= volume_ml < high:
            return name
    return SIZE_BINS[-1][0]


def heatmap_scores(heatmap, mask, voxel_volume_mm3=1.0, top_k_percent=1.0) -> dict:
    """All heatmap-quality numbers of one positive scan (see the module docstring)."""
    heatmap, mask = _check(heatmap, mask)
    share = float(np.count_nonzero(mask) / mask.size)
    mass = relevance_mass(heatmap, mask)
    volume_ml = float(np.count_nonzero(mask) * voxel_volume_mm3 / 1000.0)
    return {
        "pointing_game": float(pointing_game_hit(heatmap, mask)),
        "relevance_mass": mass,
        "chance": share,
        "relevance_ratio": mass / share if share > 0 else float("nan"),
        "iou_top_k": top_k_iou(heatmap, mask, top_k_percent),
        "lesion_volume_ml": volume_ml,
        "size_bin": size_bin(volume_ml),
    }


def _mean(values):
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def summarize_heatmap_scores(scores: list[dict], top_k_percent=1.0) -> dict:
    """Means of `heatmap_scores` over scans, overall and per lesion-size bin.

    `relevance_ratio` is the mean relevance mass over the mean chance level (ratio of means, so
    a few tiny lesions do not dominate); `relevance_ratio_per_scan` is the mean of the ratios.
    """

    def block(rows):
        mass, chance = (
            _mean([r["relevance_mass"] for r in rows]),
            _mean([r["chance"] for r in rows]),
        )
        return {
            "scans": len(rows),
            "pointing_game": _mean([r["pointing_game"] for r in rows]),
            "relevance_mass": mass,
            "chance": chance,
            "relevance_ratio": mass / chance if rows and chance > 0 else float("nan"),
            "relevance_ratio_per_scan": _mean([r["relevance_ratio"] for r in rows]),
            "iou_top_k": _mean([r["iou_top_k"] for r in rows]),
        }

    summary = block(scores)
    summary["top_k_percent"] = float(top_k_percent)
    summary["by_size"] = {
        name: block([r for r in scores if r["size_bin"] == name])
        for name, _, _ in SIZE_BINS
        if any(r["size_bin"] == name for r in scores)
    }
    return summary
