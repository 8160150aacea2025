"""Predicting scans: probability, label and a heatmap that lines up with the scan in any viewer.

For every scan `predict` writes, into the output folder:

- `<name>_heatmap.nii.gz`: the heatmap on the scan's own stored grid, exactly its shape and
  affine (qform/sform copied), float32 values in [0, 1] (1 at the peak, in steps of 1/4096);
- `<name>_heatmap.png`: three orthogonal planes through the heatmap's maximum, the scan in grey
  and the map overlaid, with a colour bar (drawn in RAS+ order so that the planes are sagittal,
  coronal and axial whatever the storage orientation);
- `<name>.json`: probability, label, the heatmap peak in voxel and world (mm) coordinates, the
  model used, and the time spent in each step (load, preprocess, model, heatmap, writing).

`<name>` is the file name without `.nii`/`.nii.gz`. A file that cannot be read gives one error
line naming it; the other files are still processed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from toolkit.errors import UserError

__all__ = [
    "DEFAULT_RUNS_DIR",
    "find_latest_model",
    "heatmap_peak",
    "load_model",
    "predict",
    "predict_scan",
]

DEFAULT_RUNS_DIR = Path("runs") / "medimg"


def find_latest_model(runs_dir=DEFAULT_RUNS_DIR) -> Path:
    """The most recently written `runs_dir/*/model.keras`; a `UserError` if there is none."""
    runs_dir = Path(runs_dir)
    candidates = list(runs_dir.glob("*/model.keras")) if runs_dir.is_dir() else []
    if not candidates:
        raise UserError(
            f"no trained model found in {runs_dir}/: train one first with "
            "`python -m pipelines.medimg train`, or pass --model PATH"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)


def load_model(path):
    """Load a `model.keras` written by `train` (`common.model_files`: safe mode, checked first)."""
    import pipelines.medimg.model  # noqa: F401 - registers ScanPreprocessing
    import toolkit.layers  # noqa: F401 - registers the attention layers
    from pipelines.common.model_files import load_model_file

    path = Path(path)
    model = load_model_file(path, what="model", compile=False)
    from pipelines.medimg.model import model_metadata

    try:
        model_metadata(model)
    except ValueError:
        raise UserError(
            f"{path}: not a model of this pipeline (no preprocessing parameters inside)"
        ) from None
    return model


def _name_of(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return path.stem or name


def heatmap_peak(heatmap: np.ndarray) -> tuple[int, ...]:
    """The voxel of the heatmap's maximum; on a plateau, the maximum voxel nearest its centroid.

    Plain `argmax` would take the first maximum in memory order, which depends on how the scan
    is stored; the centroid rule gives the same world point for any orientation.
    """
    top = float(heatmap.max())
    candidates = np.argwhere(heatmap >= top - 1e-6 * max(abs(top), 1.0))
    if len(candidates) == 1:
        return tuple(int(i) for i in candidates[0])
    distance = np.sum((candidates - candidates.mean(axis=0)) ** 2, axis=1)
    return tuple(int(i) for i in candidates[int(np.argmin(distance))])


def _canonical(scan, volumes):
    """`volumes` (on the scan's grid) reoriented to RAS+ axis order, with voxel sizes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(scan.affine)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = scan.spacing[axis]
    reoriented = [nib.orientations.apply_orientation(v, ornt) for v in volumes]
    return reoriented, tuple(spacing)


def predict_scan(
    model, path, out_dir, method=None, volume=None, model_path=None, name=None, threshold=None
) -> dict:
    """Predict one scan and write its heatmap NIfTI, PNG and JSON; returns the JSON dict.

    Raises:
        UserError: the scan cannot be read (not NIfTI, truncated, empty, ...).
    """
    from pipelines.medimg.heatmaps import compute_heatmaps, default_method
    from pipelines.medimg.io import load_scan, save_nifti
    from pipelines.medimg.model import CLASS_NAMES, model_metadata, preprocess_config_of
    from pipelines.medimg.preprocess import preprocess

    path = Path(path)
    timings = {}
    metadata = model_metadata(model)
    config = preprocess_config_of(model)
    method = method or default_method(model)
    threshold = float(metadata.get("threshold", 0.5) if threshold is None else threshold)

    start = time.perf_counter()
    scan = load_scan(path, volume=volume, max_voxels=config.max_voxels)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    item = preprocess(scan, config)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    probabilities, maps = compute_heatmaps(model, item.image[None, ..., None], method, 1)
    timings["model"] = time.perf_counter() - start

    start = time.perf_counter()
    heatmap = np.clip(item.to_original(maps[0]), 0.0, None)
    peak_value = float(heatmap.max())
    if peak_value > 0:
        heatmap /= peak_value
    # Steps of 1/4096 are invisible in any viewer and halve the time gzip takes to write it.
    heatmap = (np.round(heatmap * 4096.0) / 4096.0).astype(np.float32)
    peak = heatmap_peak(heatmap)
    peak_world = scan.affine[:3, :3] @ np.asarray(peak, np.float64) + scan.affine[:3, 3]
    timings["heatmap"] = time.perf_counter() - start

    start = time.perf_counter()
    probability = float(probabilities[0])
    label = int(probability >= threshold)
    names = list(metadata.get("class_names", CLASS_NAMES))
    name = name or _name_of(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nifti_path = save_nifti(out_dir / f"{name}_heatmap.nii.gz", heatmap, reference=scan)
    png_path = out_dir / f"{name}_heatmap.png"
    _save_png(scan, heatmap, png_path, name, probability, names[label], method)
    result = {
        "path": str(path),
        "probability": probability,
        "label": label,
        "label_name": names[label],
        "threshold": threshold,
        "heatmap_method": method,
        "heatmap_peak_voxel": [int(i) for i in peak],
        "heatmap_peak_world_mm": [round(float(v), 3) for v in peak_world],
        "heatmap_nifti": str(nifti_path),
        "heatmap_png": str(png_path),
        "model": str(Path(model_path).resolve()) if model_path is not None else None,
        "architecture": metadata.get("architecture"),
        "scan_shape": list(scan.shape),
        "scan_orientation": scan.orientation,
        "notes": list(scan.notes),
    }
    timings["writing"] = time.perf_counter() - start
    result["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def _save_png(scan, heatmap, path, name, probability, label_name, method):
    from toolkit.interpret import plot_volume_overlay

    (image, heat), spacing = _canonical(scan, [scan.data, heatmap])
    if min(image.shape) == 1:
        # A single slice (2D file) or line: draw the one plane of its two largest axes.
        axes = sorted(int(a) for a in np.argsort(image.shape, kind="stable")[-2:])
        other = next(a for a in range(3) if a not in axes)
        image, heat = np.take(image, 0, axis=other), np.take(heat, 0, axis=other)
        spacing = tuple(spacing[a] for a in axes)
    title = f"{name}: {label_name}, p(lesion) = {probability:.3f} ({method} heatmap)"
    figure = plot_volume_overlay(image, heat, path=path, title=title, spacing=spacing)
    figure.clear()


def predict(
    scans,
    model_path=None,
    out=None,
    method=None,
    volume=None,
    threshold=None,
    on_result=None,
    on_error=None,
):
    """Predict several scans; a bad file is reported and skipped, the others go on.

    Args:
        scans: paths of NIfTI files.
        model_path: a `model.keras`, or None for the newest `runs/medimg/*/model.keras`.
        out: output folder; default `runs/medimg/predictions/<timestamp>/`.
        method: `"native"`, `"gradcam"` or None (the model's native maps where it has them).
        volume: int or None. Volume of 4D files.
        threshold: float or None (the model's).
        on_result: callable(dict) called after each scan. Defaults to `None`.
        on_error: callable(path, UserError) called for each bad file. Defaults to `None`.

    Returns:
        `(results, failures)`: the JSON dicts and the `(path, message)` of failed files.

    Raises:
        UserError: no model (none given, none trained) or an unreadable model file.
    """
    model_path = Path(model_path) if model_path is not None else find_latest_model()
    model = load_model(model_path)
    out = (
        Path(out)
        if out is not None
        else (DEFAULT_RUNS_DIR / "predictions" / time.strftime("%Y%m%d-%H%M%S"))
    )
    results, failures, used = [], [], {}
    for scan_path in scans:
        scan_path = Path(scan_path)
        name = _name_of(scan_path)
        count = used.get(name, 0)
        used[name] = count + 1
        unique = name if count == 0 else f"{name}_{count}"
        try:
            result = predict_scan(
                model,
                scan_path,
                out,
                method=method,
                volume=volume,
                model_path=model_path,
                name=unique,
                threshold=threshold,
            )
        except UserError as error:
            message = " ".join(str(error).split())
            if str(scan_path) not in message:
                message = f"{scan_path}: {message}"
            failures.append((str(scan_path), message))
            if on_error is not None:
                on_error(scan_path, message)
            continue
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results, failures


def print_result(result: dict, as_json: bool = False) -> None:
    """One line per scan: `path<TAB>label<TAB>probability`, or the JSON object."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        print(f"{result['path']}\t{result['label_name']}\t{result['probability']:.4f}", flush=True)


def print_error(path, message) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
