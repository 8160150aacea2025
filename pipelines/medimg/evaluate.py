"""Evaluating a trained model on a datalist: classification and heatmap quality.

`evaluate(model_path, data)` reads the datalist (CSV or JSON), keeps the `test` split when the
list has one (else every row; `split=` chooses), and for every scan computes the probability and
the heatmaps of each method (`native`: the model's own attention maps, `gradcam`). Heatmaps are
mapped back onto each scan's stored grid, as `predict` writes them, and compared with the lesion
mask there (`metrics.heatmap_scores`): the quality numbers are in scanner space, not on the
model's resampled grid. It writes `roc.png`, `confusion.png` and `evaluation.json` to the output
folder and returns one dict with at least `auc`, `accuracy`, `sensitivity`, `specificity`,
`pointing_game` and `relevance_mass` (those two of the primary method: `native` where the model
has attention maps, else `gradcam`), plus `heatmaps` with every method's summary by lesion size.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from toolkit.errors import UserError

__all__ = [
    "confusion_figure",
    "read_mask",
    "evaluate",
    "evaluate_records",
    "format_summary",
    "json_ready",
    "roc_figure",
]


def json_ready(value):
    """`value` with NaN/inf floats as `None`, NumPy scalars as Python ones, paths as text."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    return value


def read_mask(path, max_voxels=None):
    """A lesion mask file as `(bool array, affine)`, or `(None, None)` for an all-zero mask.

    An empty mask is a valid "no lesion" mask, so constant volumes are accepted here.
    """
    from pipelines.medimg.io import DEFAULT_MAX_VOXELS, load_scan

    mask = load_scan(path, max_voxels=max_voxels or DEFAULT_MAX_VOXELS, allow_constant=True)
    data = mask.data > 0
    if not data.any():
        return None, None
    return data, mask.affine


def _load_mask_on_scan_grid(mask_path, scan):
    """The lesion mask (bool) on the stored grid of `scan` (resampled if its grid differs)."""
    from pipelines.medimg.preprocess import resample

    data, affine = read_mask(mask_path)
    if data is None:
        return np.zeros(scan.shape, bool)
    if data.shape == scan.shape and np.allclose(affine, scan.affine, atol=1e-4):
        return data
    return resample(data.astype(np.uint8), affine, scan.affine, scan.shape, order=0) > 0


def evaluate_records(
    model,
    records,
    methods=("native", "gradcam"),
    threshold=None,
    top_k_percent=1.0,
    n_bootstrap=1000,
    seed=0,
    batch_size=4,
    progress=True,
):
    """Evaluate `model` on datalist records; returns `(summary, per_scan)`.

    Args:
        model: a model from `model.build_model` (preprocessing parameters inside).
        records: list of `datasets.Record`.
        methods: heatmap methods to score (`"native"` is dropped for models without attention
            maps). The first one left is the primary method.
        threshold: float or None. Decision threshold; `None` uses the model's.
        top_k_percent: float. k of the top-k% IoU.
        n_bootstrap: int. Resamples of the AUC interval.
        seed: int. Seed of the bootstrap.
        batch_size: int. Scans per forward pass.
        progress: bool. Show a progress bar.

    Returns:
        The summary dict (see the module docstring) and one dict per scan.
    """
    from pipelines.common.progress import progress_bar
    from pipelines.medimg.heatmaps import compute_heatmaps, default_method
    from pipelines.medimg.metrics import (
        classification_metrics,
        heatmap_scores,
        summarize_heatmap_scores,
    )
    from pipelines.medimg.model import model_metadata, preprocess_config_of
    from pipelines.medimg.preprocess import load_and_preprocess

    preprocess = preprocess_config_of(model)
    if threshold is None:
        threshold = float(model_metadata(model).get("threshold", 0.5))
    methods = [m for m in methods if m != "native" or default_method(model) == "native"]
    if not methods:
        methods = [default_method(model)]
    per_scan, skipped = [], []
    scores = {method: [] for method in methods}
    with progress_bar(len(records), "evaluate", unit="scan", enabled=progress) as bar:
        for start in range(0, len(records), batch_size):
            chunk, items = [], []
            for record in records[start : start + batch_size]:
                try:
                    items.append(load_and_preprocess(record.image, preprocess))
                    chunk.append(record)
                except UserError as error:
                    skipped.append(f"{record.source or record.image}: skipped: {error}")
            if items:
                images = np.stack([item.image for item in items])[..., None]
                results = {m: compute_heatmaps(model, images, m, batch_size) for m in methods}
                probabilities = results[methods[0]][0]
                for j, (record, item) in enumerate(zip(chunk, items)):
                    row = {
                        "image": str(record.image),
                        "label": int(record.label),
                        "probability": float(probabilities[j]),
                    }
                    if record.label == 1 and record.mask is not None:
                        try:
                            mask = _load_mask_on_scan_grid(record.mask, item.scan)
                        except UserError as error:
                            skipped.append(f"{record.source}: mask skipped: {error}")
                            mask = None
                        if mask is not None and mask.any():
                            voxel = abs(float(np.linalg.det(item.scan.affine[:3, :3])))
                            for method in methods:
                                heatmap = item.to_original(results[method][1][j])
                                row_scores = heatmap_scores(heatmap, mask, voxel, top_k_percent)
                                scores[method].append(row_scores)
                                row[method] = row_scores
                    per_scan.append(row)
            bar.update(len(records[start : start + batch_size]))
    if not per_scan:
        raise UserError("no scan of the datalist could be evaluated (all were skipped)")
    labels = np.asarray([row["label"] for row in per_scan])
    probabilities = np.asarray([row["probability"] for row in per_scan])
    summary = classification_metrics(
        labels, probabilities, threshold=threshold, n_resamples=n_bootstrap, seed=seed
    )
    summary["heatmaps"] = {
        method: summarize_heatmap_scores(scores[method], top_k_percent) for method in methods
    }
    primary = summary["heatmaps"][methods[0]]
    summary["heatmap_method"] = methods[0]
    for key in ("pointing_game", "relevance_mass", "relevance_ratio", "chance", "iou_top_k"):
        summary[key] = primary[key]
    summary["skipped"] = skipped
    summary["labels"] = labels.tolist()
    summary["probabilities"] = probabilities.tolist()
    return summary, per_scan


# --------------------------------------------------------------------------------------------
# Figures.


def roc_figure(summary: dict, title: str = "ROC curve"):
    """ROC curve of an evaluation summary (needs `labels` and `probabilities`)."""
    from matplotlib.figure import Figure

    from pipelines.medimg.metrics import roc_curve

    fpr, tpr, _ = roc_curve(summary["labels"], summary["probabilities"])
    figure = Figure(figsize=(5, 5))
    ax = figure.add_subplot(1, 1, 1)
    low, high = summary.get("auc_ci95", [float("nan")] * 2)
    ax.plot(fpr, tpr, lw=2, label=f"AUC = {summary['auc']:.3f} (95% CI {low:.3f}-{high:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="chance")
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return figure


def confusion_figure(summary: dict, title: str = "Confusion matrix"):
    """Confusion matrix at the summary's threshold, with counts, and a colour bar."""
    from matplotlib.figure import Figure

    c = summary["confusion"]
    matrix = np.asarray([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
    figure = Figure(figsize=(5, 4.2))
    ax = figure.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=14)
    ax.set_xticks([0, 1], labels=["normal", "lesion"])
    ax.set_yticks([0, 1], labels=["normal", "lesion"])
    ax.set_xlabel(f"Predicted (p >= {summary['threshold']:g})")
    ax.set_ylabel("True label")
    ax.set_title(title)
    figure.colorbar(image, ax=ax).set_label("scans")
    return figure


# --------------------------------------------------------------------------------------------
# Command.


def evaluate(
    model_path,
    data,
    split="auto",
    methods=("native", "gradcam"),
    threshold=None,
    out=None,
    top_k_percent=1.0,
    batch_size=4,
    progress=True,
):
    """Evaluate a saved model on a datalist; write plots and `evaluation.json`.

    Args:
        model_path: str or Path of a `model.keras`.
        data: str or Path of a CSV or JSON datalist.
        split: `"auto"` (the `test` rows if the list has any, else all rows), `"all"`, `"train"`,
            `"val"` or `"test"`.
        methods: heatmap methods to score.
        threshold: float or None (the model's threshold).
        out: folder for `roc.png`, `confusion.png`, `evaluation.json`; default
            `<model folder>/evaluation/`.
        top_k_percent: float. k of the top-k% IoU.
        batch_size: int.
        progress: bool.

    Returns:
        The summary dict.
    """
    from pipelines.medimg.datasets import read_csv_datalist, read_json_datalist
    from pipelines.medimg.predict import load_model

    model_path = Path(model_path)
    model = load_model(model_path)
    data = Path(data)
    reader = read_json_datalist if data.suffix.lower() == ".json" else read_csv_datalist
    if data.suffix.lower() not in (".csv", ".json"):
        raise UserError(f"{data}: datalist must be a .csv or .json file")
    datalist = reader(data, warn=False)
    records = datalist.records
    if split == "auto":
        test = [r for r in records if r.split == "test"]
        records, split = (test, "test") if test else (records, "all")
    elif split != "all":
        records = [r for r in records if r.split == split]
    if not records:
        raise UserError(f"{data}: no scans in split '{split}'")
    summary, per_scan = evaluate_records(
        model,
        records,
        methods=methods,
        threshold=threshold,
        top_k_percent=top_k_percent,
        batch_size=batch_size,
        progress=progress,
    )
    summary["skipped"] = list(datalist.skipped) + summary["skipped"]
    for line in summary["skipped"]:
        print(f"warning: {line}", file=sys.stderr)
    summary["model"] = str(model_path)
    summary["data"] = str(data)
    summary["split"] = split
    out = Path(out) if out is not None else model_path.parent / "evaluation"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the output folder {out}: {error.strerror}") from None
    roc_figure(summary, title=f"ROC: {data.name} ({split})").savefig(
        out / "roc.png", dpi=100, bbox_inches="tight"
    )
    confusion_figure(summary, title=f"Confusion matrix: {data.name} ({split})").savefig(
        out / "confusion.png", dpi=100, bbox_inches="tight"
    )
    summary["out"] = str(out)
    document = {**summary, "per_scan": per_scan}
    (out / "evaluation.json").write_text(
        json.dumps(json_ready(document), indent=2) + "\n", encoding="utf-8"
    )
    return summary


def format_summary(summary: dict) -> str:
    """Human-readable lines of an evaluation summary."""
    low, high = summary["auc_ci95"]

    def num(value):
        return (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (f"{value:.3f}")
        )

    lines = [
        f"scans: {summary['scans']} ({summary['positives']} with lesions), "
        f"threshold {summary['threshold']:g}",
        f"AUC: {num(summary['auc'])} (95% CI {num(low)}-{num(high)})",
        f"accuracy: {num(summary['accuracy'])}  sensitivity: {num(summary['sensitivity'])}  "
        f"specificity: {num(summary['specificity'])}",
    ]
    for method, block in summary["heatmaps"].items():
        lines.append(
            f"heatmap {method}: pointing game {num(block['pointing_game'])}, relevance mass "
            f"{num(block['relevance_mass'])} ({num(block['relevance_ratio'])}x chance), "
            f"IoU top-{block['top_k_percent']:g}% {num(block['iou_top_k'])} "
            f"[{block['scans']} lesion scans]"
        )
        for name, row in block["by_size"].items():
            lines.append(
                f"  {name}: {row['scans']} scans, pointing game {num(row['pointing_game'])}, "
                f"relevance mass {num(row['relevance_mass'])} "
                f"({num(row['relevance_ratio'])}x chance)"
            )
    if summary.get("out"):
        lines.append(f"plots: {summary['out']}")
    return "\n".join(lines)
