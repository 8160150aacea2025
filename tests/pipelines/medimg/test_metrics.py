"""Metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.medimg.metrics import (
    bootstrap_auc_ci,
    classification_metrics,
    heatmap_scores,
    pointing_game_hit,
    relevance_mass,
    roc_auc,
    roc_curve,
    size_bin,
    summarize_heatmap_scores,
    threshold_metrics,
    top_k_iou,
)


def test_auc_counts_ordered_pairs_and_half_ties():
    # Pairs (pos, neg): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, 0.1) yes, (0.8, 0.4) yes -> 3/4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # One tie counts 1/2: pairs (0.5 vs 0.5) = 0.5, (0.5 vs 0.2) = 1 -> 1.5 / 2.
    assert roc_auc([1, 0, 0], [0.5, 0.5, 0.2]) == pytest.approx(0.75)
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_auc_equals_area_under_roc_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60), 1)  # many ties
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.isinf(thresholds[0]) and np.all(np.diff(thresholds[1:]) < 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_roc_curve_points_by_hand():
    fpr, tpr, thresholds = roc_curve([1, 0, 1, 0], [0.9, 0.8, 0.4, 0.1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds[1:], [0.9, 0.8, 0.4, 0.1])


def test_bootstrap_interval_is_deterministic_and_brackets_the_auc():
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 40)
    scores = labels + rng.normal(0, 1.0, 80)
    low, high = bootstrap_auc_ci(labels, scores, n_resamples=300, seed=3)
    assert low < roc_auc(labels, scores) < high
    assert 0.5 < low and high < 1.0
    assert (low, high) == bootstrap_auc_ci(labels, scores, n_resamples=300, seed=3)
    assert bootstrap_auc_ci([0, 1, 1], [0.1, 0.5, 0.9], n_resamples=50) == (1.0, 1.0)
    assert all(math.isnan(v) for v in bootstrap_auc_ci([1, 1], [0.1, 0.2]))


def test_threshold_metrics_by_hand():
    # predicted at 0.5: [1, 0, 1, 0, 1]; tp = 2 (0.9, 0.5), fn = 1, fp = 1, tn = 1.
    result = threshold_metrics([1, 1, 0, 0, 1], [0.9, 0.4, 0.6, 0.1, 0.5], threshold=0.5)
    assert result["confusion"] == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert result["accuracy"] == pytest.approx(3 / 5)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(1 / 2)
    full = classification_metrics([0, 1], [0.2, 0.7], threshold=0.5, n_resamples=20)
    assert (full["auc"], full["accuracy"], full["scans"], full["positives"]) == (1.0, 1.0, 2, 1)
    assert math.isnan(threshold_metrics([1, 1], [0.9, 0.8])["specificity"])


def test_pointing_game_uses_a_one_voxel_tolerance():
    mask = np.zeros((10, 10, 10), bool)
    mask[5, 5, 5] = True
    heatmap = np.zeros((10, 10, 10))
    heatmap[5, 5, 5] = 1.0
    assert pointing_game_hit(heatmap, mask)
    heatmap[6, 6, 6] = 2.0  # diagonal neighbour: inside the dilated lesion
    assert pointing_game_hit(heatmap, mask)
    heatmap[7, 5, 5] = 3.0  # two voxels away
    assert not pointing_game_hit(heatmap, mask)
    assert pointing_game_hit(heatmap, mask, tolerance=2)
    with pytest.raises(ValueError, match="non-empty"):
        pointing_game_hit(heatmap, np.zeros_like(mask))


def test_relevance_mass_and_ratio_to_chance():
    mask = np.zeros((10, 10, 10), bool)
    mask[:2, :2, :2] = True  # 8 of 1000 voxels
    uniform = np.ones((10, 10, 10))
    assert relevance_mass(uniform, mask) == pytest.approx(0.008)
    scores = heatmap_scores(uniform, mask, voxel_volume_mm3=8.0)
    assert scores["chance"] == pytest.approx(0.008)
    assert scores["relevance_ratio"] == pytest.approx(1.0)
    assert scores["lesion_volume_ml"] == pytest.approx(0.064)
    focused = np.zeros((10, 10, 10))
    focused[mask] = 3.0
    focused[9, 9, 9] = 8.0  # a quarter of the mass outside
    focused[0, 0, 9] = -5.0  # negative values do not count
    assert relevance_mass(focused, mask) == pytest.approx(24 / 32)
    assert heatmap_scores(focused, mask)["relevance_ratio"] == pytest.approx(0.75 / 0.008)


def test_top_k_iou_by_hand():
    mask = np.zeros((10, 10, 10), bool)
    mask[0, 0, :10] = True  # 10 voxels
    heatmap = np.zeros((10, 10, 10))
    heatmap[0, 0, :5] = 2.0  # 5 inside
    heatmap[9, 9, :5] = 1.0  # 5 outside
    # top 1% = 10 voxels: 5 in the mask; union 15.
    assert top_k_iou(heatmap, mask, percent=1.0) == pytest.approx(5 / 15)
    # top 0.5% = 5 voxels, all in the mask; union 10.
    assert top_k_iou(heatmap, mask, percent=0.5) == pytest.approx(5 / 10)


def test_summary_breaks_down_by_lesion_size():
    assert size_bin(0.1) == "small (<0.5 mL)"
    assert size_bin(0.5) == "medium (0.5-4 mL)"
    assert size_bin(12.0) == "large (>=4 mL)"
    rows = [
        {"pointing_game": 1.0, "relevance_mass": 0.2, "chance": 0.01, "relevance_ratio": 20.0,
         "iou_top_k": 0.1, "size_bin": "small (<0.5 mL)"},
        {"pointing_game": 0.0, "relevance_mass": 0.4, "chance": 0.03, "relevance_ratio": 40 / 3,
         "iou_top_k": 0.3, "size_bin": "large (>=4 mL)"},
    ]  # fmt: skip
    summary = summarize_heatmap_scores(rows, top_k_percent=2.0)
    assert summary["scans"] == 2 and summary["pointing_game"] == 0.5
    assert summary["relevance_mass"] == pytest.approx(0.3)
    assert summary["relevance_ratio"] == pytest.approx(0.3 / 0.02)
    assert summary["relevance_ratio_per_scan"] == pytest.approx((20 + 40 / 3) / 2)
    assert set(summary["by_size"]) == {"small (<0.5 mL)", "large (>=4 mL)"}
    assert summary["by_size"]["small (<0.5 mL)"]["pointing_game"] == 1.0
    assert summary["top_k_percent"] == 2.0
    assert math.isnan(summarize_heatmap_scores([])["pointing_game"])
