"""The built-in benchmark: synthetic lesions in a real brain MRI, with the true lesion masks.

Every scan starts from the MNI152 2009 T1 template that nilearn ships inside its package (with
its white-matter probability map), so nothing is downloaded. Per scan, from a seed derived from
the global seed and the scan's index:

- anatomy: a random affine (rotation up to 8 degrees, scaling 0.9-1.1 per axis, shift up to
  8 mm) and a smooth random displacement field (a few millimetres) warp the template;
- storage: voxel sizes 1.5-2.5 mm (anisotropic), a field of view around the brain with a random
  margin, and a random orientation: RAS, LPS, LAS, a random permutation of axes (e.g. PSR), or an
  oblique grid rotated up to 15 degrees;
- lesions (half the scans, chosen exactly): 1-3 blobs centred in white matter (probability
  > 0.9), radii 2.5-14 mm (log-uniform, so small lesions are common), ellipsoids with random
  axes and a smoothly perturbed boundary, hyper-intense (x1.3-1.7 the local intensity) or
  hypo-intense (x0.35-0.7), with a soft edge and a little texture; the mask is where the lesion
  covers a voxel centre, inside the brain, so every positive scan has a non-empty mask;
- acquisition: a smooth multiplicative bias field (up to about +-25 %), optional blur (thick
  slices), Rician noise (1-5 % of white-matter intensity), zero outside the brain for 60 % of
  the scans (skull-stripped style), a random intensity scale, stored as int16 (85 %) or float32.

`make_dataset` writes `images/scan_NNNN.nii.gz`, `masks/scan_NNNN_mask.nii.gz` (uint8, empty for
negative scans), `datalist.csv` (`image,label,mask,split`, paths relative to the CSV, splits
70/15/15 stratified by label), `metadata.csv` (orientation, spacing, lesion count and volume per
scan) and, last, `dataset.json` (the parameters; a folder with a matching `dataset.json` is
reused as it is). Scans are built in a process pool on all cores with a progress bar; the same
seed gives identical files.
"""

from __future__ import annotations

import concurrent.futures
import csv
import importlib.util
import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.ndimage

from pipelines.common.paths import toolkit_home
from pipelines.common.progress import progress_bar
from pipelines.medimg.preprocess import resample
from toolkit.errors import UserError

__all__ = [
    "DEFAULT_SCANS",
    "GENERATOR_VERSION",
    "dataset_is_complete",
    "default_dataset_dir",
    "make_dataset",
    "make_scan",
    "template_paths",
]

DEFAULT_SCANS = 600
#: Bumped whenever a change alters the generated files, so stale folders are rebuilt.
GENERATOR_VERSION = 1
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}
DATALIST_COLUMNS = ("image", "label", "mask", "split")
METADATA_COLUMNS = (
    "image",
    "label",
    "split",
    "orientation",
    "spacing",
    "shape",
    "dtype",
    "lesions",
    "lesion_voxels",
    "lesion_volume_mm3",
    "smallest_lesion_mm3",
    "contrast",
)

_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
_BRAIN_THRESHOLD = 0.02
_ORIENTATIONS = ("RAS", "LPS", "LAS", "RPI", "PSR", "ASL", "IRP", "SAR")


# --------------------------------------------------------------------------------------------
# The template.


def template_paths() -> dict[str, Path]:
    """Paths of nilearn's packaged MNI152 T1 and white-matter maps (no network, no download).

    Found in nilearn's package folder without importing nilearn (which takes seconds);
    `nilearn.datasets.load_mni152_template` and `load_mni152_wm_template` read the same files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "nilearn is not installed; it provides the MNI152 template (pip install nilearn)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    paths = {"t1": folder / _T1_FILE, "wm": folder / _WM_FILE}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise UserError(f"nilearn's MNI152 template files are missing: {', '.join(missing)}")
    return paths


class _Template:
    """The template arrays one worker keeps in memory."""

    def __init__(self, paths: dict[str, Path]):
        t1_image = nib.load(str(paths["t1"]))
        self.affine = np.asarray(t1_image.affine, np.float64)
        t1 = np.asarray(t1_image.dataobj, dtype=np.float32)
        self.t1 = t1 / t1.max()
        wm = np.asarray(nib.load(str(paths["wm"])).dataobj, dtype=np.float32)
        wm /= wm.max()
        self.brain = self.t1 > _BRAIN_THRESHOLD
        # Lesion centres: deep white matter (probability > 0.9 and away from its border).
        deep = scipy.ndimage.binary_erosion(wm > 0.9, iterations=2)
        self.wm_centres = (
            np.argwhere(deep).astype(np.float64) @ self.affine[:3, :3].T + (self.affine[:3, 3])
        )
        self.wm_intensity = float(np.median(self.t1[wm > 0.9]))
        index = np.argwhere(self.brain)
        world = np.stack([index.min(0), index.max(0)]) @ self.affine[:3, :3].T + self.affine[:3, 3]
        self.brain_box = (world.min(0), world.max(0))


_TEMPLATE: _Template | None = None


def _template() -> _Template:
    global _TEMPLATE
    if _TEMPLATE is None:
        _TEMPLATE = _Template(template_paths())
    return _TEMPLATE


# --------------------------------------------------------------------------------------------
# Random ingredients.


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation by up to `max_degrees` about a random axis."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(rng.uniform(-max_degrees, max_degrees))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _smooth_field(rng: np.random.Generator, shape, coarse=(4, 5, 4), channels=1) -> np.ndarray:
    """Smooth random field(s) `(channels, *shape)`, unit standard deviation per control point."""
    fields = []
    for _ in range(channels):
        grid = rng.normal(size=coarse)
        # Cubic zoom on the tiny grid for smoothness, then a cheap linear upsampling to full size.
        mid = scipy.ndimage.zoom(grid, 4, order=3, mode="nearest").astype(np.float32)
        source = np.eye(4)
        target = np.eye(4)
        target[:3, :3] = np.diag([(m - 1) / max(n - 1, 1) for m, n in zip(mid.shape, shape)])
        fields.append(resample(mid, source, target, tuple(shape), order=1))
    return np.stack(fields)


def _stored_grid(rng: np.random.Generator, template: _Template):
    """Pick spacing, field of view and orientation; return `(affine, shape, orientation)`."""
    spacing = rng.uniform(1.5, 2.2, size=3)
    spacing[rng.integers(3)] = rng.uniform(1.5, 2.5)  # one thicker "slice" axis now and then
    low, high = template.brain_box
    margin_low = rng.uniform(4.0, 15.0, size=3)
    margin_high = rng.uniform(4.0, 15.0, size=3)
    low = low - margin_low
    high = high + margin_high
    shape = np.ceil((high - low) / spacing).astype(int) + 1
    ras = np.eye(4)
    ras[:3, :3] = np.diag(spacing)
    ras[:3, 3] = low
    roll = rng.uniform()
    if roll < 0.30:
        code = "RAS"
    elif roll < 0.55:
        code = "LPS"
    elif roll < 0.90:
        code = _ORIENTATIONS[rng.integers(2, len(_ORIENTATIONS))]
    else:
        code = "oblique"
    if code == "oblique":
        center = ras[:3, :3] @ ((shape - 1) / 2.0) + ras[:3, 3]
        rotation = _rotation(rng, 15.0)
        affine = ras.copy()
        affine[:3, :3] = rotation @ ras[:3, :3]
        affine[:3, 3] = center - affine[:3, :3] @ ((shape - 1) / 2.0)
        return affine, tuple(int(n) for n in shape), "oblique"
    start = nib.orientations.axcodes2ornt("RAS")
    end = nib.orientations.axcodes2ornt(tuple(code))
    transform = nib.orientations.ornt_transform(start, end)
    affine = ras @ nib.orientations.inv_ornt_aff(transform, tuple(shape))
    # `transform` maps RAS axes to stored axes; the stored shape is the permuted RAS shape.
    new_shape = [0, 0, 0]
    for ras_axis, (stored_axis, _flip) in enumerate(transform):
        new_shape[int(stored_axis)] = int(shape[ras_axis])
    assert "".join(nib.aff2axcodes(affine)) == code
    return affine, tuple(new_shape), code


def _lesion_weight(points: np.ndarray, lesion: dict) -> np.ndarray:
    """Soft lesion weight in [0, 1] at template-space points `(N, 3)`; > 0.5 is inside."""
    local = (points - lesion["center"]) @ lesion["axes"].T / lesion["radii"]
    radius = np.sqrt(np.sum(local**2, axis=1))
    wobble = np.zeros(len(points))
    for direction, frequency, phase in lesion["waves"]:
        wobble += np.sin(local @ direction * frequency + phase)
    radius = radius * (1.0 + lesion["roughness"] * wobble / len(lesion["waves"]))
    edge = lesion["edge"]
    return np.clip((1.0 + edge - radius) / (2 * edge), 0.0, 1.0)


def _random_lesion(rng: np.random.Generator, template: _Template, scale: float = 1.0) -> dict:
    radius = scale * math.exp(rng.uniform(math.log(2.5), math.log(14.0)))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    hyper = bool(rng.uniform() < 0.5)
    return {
        "center": template.wm_centres[rng.integers(len(template.wm_centres))],
        "axes": q,
        "radii": radius * rng.uniform(0.65, 1.35, size=3),
        "waves": [
            (d / np.linalg.norm(d), rng.uniform(1.5, 4.0), rng.uniform(0, 2 * math.pi))
            for d in rng.normal(size=(3, 3))
        ],
        "roughness": rng.uniform(0.05, 0.25),
        "edge": rng.uniform(0.08, 0.2),
        "factor": rng.uniform(1.3, 1.7) if hyper else rng.uniform(0.35, 0.7),
        "hyper": hyper,
        "texture": rng.uniform(0.0, 0.08),
    }


# --------------------------------------------------------------------------------------------
# One scan.


def make_scan(seed: int, index: int, label: int, template: _Template | None = None):
    """Generate one scan in memory.

    Args:
        seed: int. Global dataset seed.
        index: int. Scan index; with `seed` it fixes every random choice.
        label: int. 1 to insert lesions, 0 for none.
        template: the loaded template, or None to load (and cache) it.

    Returns:
        `(image, mask, affine, info)`: the stored array (int16 or float32), the uint8 lesion
        mask on the same grid, the `(4, 4)` affine, and a dict of metadata.
    """
    template = template or _template()
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))
    affine, shape, orientation = _stored_grid(rng, template)

    # World position of every stored voxel centre, then the subject -> template warp.
    index_grid = np.indices(shape, dtype=np.float32).reshape(3, -1)  # (3, N)
    world = affine[:3, :3].astype(np.float32) @ index_grid + affine[:3, 3:4].astype(np.float32)
    warp = np.diag(rng.uniform(0.9, 1.1, size=3)) @ _rotation(rng, 8.0)
    center = np.mean(template.brain_box, axis=0)
    shift = rng.uniform(-8.0, 8.0, size=3)
    displacement = _smooth_field(rng, shape, channels=3).reshape(3, -1)
    displacement *= np.float32(rng.uniform(1.0, 3.5))
    points = (warp.astype(np.float32) @ (world - center[:, None].astype(np.float32))) + (
        center + shift
    )[:, None].astype(np.float32)
    points += displacement  # (3, N) template-space millimetres
    del world, displacement
    to_template = np.linalg.inv(template.affine)
    voxels = to_template[:3, :3].astype(np.float32) @ points + to_template[:3, 3:4].astype(
        np.float32
    )
    image = scipy.ndimage.map_coordinates(
        template.t1, voxels, order=1, mode="constant", cval=0.0, prefilter=False
    ).reshape(shape)
    # The template is skull-stripped: its brain is where it is not (almost) zero.
    brain = image > _BRAIN_THRESHOLD
    del voxels
    points = points.T.reshape(*shape, 3)

    mask = np.zeros(shape, dtype=np.uint8)
    lesion_voxels = []
    contrasts = []
    if label:
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1]))
        for _ in range(count):
            for attempt in range(6):
                lesion = _random_lesion(rng, template, scale=1.0 + 0.3 * attempt)
                reach = float(lesion["radii"].max()) * 1.6 + 2.0
                box = _box_around(affine, shape, lesion["center"], reach, points)
                if box is None:
                    continue
                sub_points = points[box].reshape(-1, 3).astype(np.float64)
                weight = _lesion_weight(sub_points, lesion).reshape(points[box].shape[:3])
                weight *= brain[box]
                inside = (weight > 0.5) & (mask[box] == 0)
                if not inside.any():
                    continue
                texture = 1.0 + lesion["texture"] * rng.normal(size=weight.shape)
                target = template.wm_intensity * lesion["factor"] * texture
                image[box] += (weight * (target - image[box])).astype(np.float32)
                mask[box][inside] = 1
                lesion_voxels.append(int(inside.sum()))
                contrasts.append("hyper" if lesion["hyper"] else "hypo")
                break
        if not lesion_voxels:  # pragma: no cover - six attempts with growing radii never fail
            raise RuntimeError(f"could not place a lesion in scan {index} (seed {seed})")
    del points

    # Acquisition: bias field, blur, Rician noise, intensity scale, storage type.
    bias = _smooth_field(rng, shape, coarse=(3, 3, 3))[0]
    image *= np.exp(rng.uniform(0.03, 0.12) * bias)
    if rng.uniform() < 0.5:
        image = scipy.ndimage.gaussian_filter(image, sigma=rng.uniform(0.3, 0.8, size=3))
    sigma = template.wm_intensity * rng.uniform(0.01, 0.05)
    noise = rng.normal(scale=sigma, size=(2, *shape)).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    if rng.uniform() < 0.6:
        # Skull-stripped style: zero outside the (slightly dilated) brain, as many datasets ship.
        image *= scipy.ndimage.binary_dilation(brain, iterations=2)
    image *= np.float32(rng.uniform(200.0, 1500.0))
    if rng.uniform() < 0.85:
        stored = np.clip(np.rint(image), 0, np.iinfo(np.int16).max).astype(np.int16)
    else:
        stored = image.astype(np.float32)
    voxel_volume = float(abs(np.linalg.det(affine[:3, :3])))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    info = {
        "orientation": orientation,
        "spacing": "x".join(f"{v:.2f}" for v in spacing),
        "shape": "x".join(str(n) for n in shape),
        "dtype": str(stored.dtype),
        "lesions": len(lesion_voxels),
        "lesion_voxels": int(sum(lesion_voxels)),
        "lesion_volume_mm3": round(sum(lesion_voxels) * voxel_volume, 1),
        "smallest_lesion_mm3": round(min(lesion_voxels) * voxel_volume, 1) if lesion_voxels else 0,
        "contrast": "+".join(sorted(set(contrasts))) if contrasts else "",
    }
    return stored, mask, affine, info


def _box_around(affine, shape, center, reach, points):
    """Slices of the stored grid covering a ball of `reach` mm around a template point."""
    # The warp is close to the identity, so search for the nearest stored voxel coarsely.
    step = 4
    coarse = points[::step, ::step, ::step]
    distance = np.sum((coarse - center) ** 2, axis=-1)
    nearest = np.unravel_index(int(np.argmin(distance)), distance.shape)
    if distance[nearest] > (reach + 8.0 * step) ** 2:
        return None
    nearest = np.asarray(nearest) * step
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    half = np.ceil(reach * 1.3 / spacing).astype(int) + step
    low = np.maximum(nearest - half, 0)
    high = np.minimum(nearest + half + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


# --------------------------------------------------------------------------------------------
# The dataset.


def _save(image: np.ndarray, affine: np.ndarray, path: Path) -> None:
    nifti = nib.Nifti1Image(image, affine)
    nifti.set_qform(affine, 1)
    nifti.set_sform(affine, 1)
    nifti.header.set_xyzt_units("mm")
    partial = path.with_name(f".{path.name[: -len('.nii.gz')]}.partial.nii.gz")
    nib.save(nifti, str(partial))
    os.replace(partial, path)


def _build_one(task):
    out, seed, index, label = task
    image, mask, affine, info = make_scan(seed, index, label)
    name = f"scan_{index:04d}"
    _save(image, affine, Path(out) / "images" / f"{name}.nii.gz")
    _save(mask, affine, Path(out) / "masks" / f"{name}_mask.nii.gz")
    return index, info


def _plan(scans: int, seed: int):
    """Labels (exactly half positive) and stratified 70/15/15 splits, from the global seed."""
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(2**31,)))
    labels = np.zeros(scans, dtype=int)
    labels[rng.permutation(scans)[: scans // 2]] = 1
    splits = [""] * scans
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        n = len(members)
        n_val = int(round(n * SPLIT_FRACTIONS["val"]))
        n_test = int(round(n * SPLIT_FRACTIONS["test"]))
        for position, scan in enumerate(members):
            if position < n - n_val - n_test:
                splits[scan] = "train"
            elif position < n - n_test:
                splits[scan] = "val"
            else:
                splits[scan] = "test"
    return labels.tolist(), splits


def _manifest(scans: int, seed: int) -> dict:
    return {
        "generator": "pipelines.medimg.synth",
        "version": GENERATOR_VERSION,
        "scans": int(scans),
        "seed": int(seed),
    }


def dataset_is_complete(out: str | Path, scans: int = DEFAULT_SCANS, seed: int = 0) -> bool:
    """True when `out` holds a finished dataset built with these parameters (and version)."""
    out = Path(out)
    try:
        manifest = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = _manifest(scans, seed)
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    return (out / "datalist.csv").is_file()


def make_dataset(
    out: str | Path,
    scans: int = DEFAULT_SCANS,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Build (or reuse) the synthetic lesion dataset in `out`; return the `datalist.csv` path.

    Args:
        out: str or Path. Output folder (created).
        scans: int. Number of scans, half of them with lesions. Defaults to `600`.
        seed: int. Global seed; the same seed gives identical files. Defaults to `0`.
        workers: int or None. Processes; `None` uses every core. Defaults to `None`.
        progress: bool. Show a progress bar on stderr. Defaults to `True`.
        force: bool. Rebuild even if `out` already holds this dataset. Defaults to `False`.

    Returns:
        Path of `datalist.csv`.

    Example:

    ```python
    datalist = make_dataset("/tmp/lesions", scans=16, seed=0)
    ```
    """
    if scans < 2:
        raise UserError(
            f"--scans must be at least 2 (one with and one without lesions), got {scans}"
        )
    out = Path(out)
    if not force and dataset_is_complete(out, scans, seed):
        return out / "datalist.csv"
    try:
        (out / "images").mkdir(parents=True, exist_ok=True)
        (out / "masks").mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"cannot create the dataset folder {out}: {error.strerror or error}"
        ) from None
    (out / "dataset.json").unlink(missing_ok=True)
    template_paths()  # fail early, in this process, if nilearn's files are missing
    labels, splits = _plan(scans, seed)
    tasks = [(str(out), seed, index, labels[index]) for index in range(scans)]
    workers = max(1, min(workers or os.cpu_count() or 1, scans))
    started = time.perf_counter()
    infos: dict[int, dict] = {}
    with progress_bar(scans, "make-dataset", unit="scan", enabled=progress) as bar:
        if workers == 1:
            for task in tasks:
                index, info = _build_one(task)
                infos[index] = info
                bar.update(1)
        else:
            # "spawn": safe even when the caller has TensorFlow's threads running.
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                futures = [pool.submit(_build_one, task) for task in tasks]
                for future in concurrent.futures.as_completed(futures):
                    index, info = future.result()
                    infos[index] = info
                    bar.update(1)
    seconds = time.perf_counter() - started

    rows = []
    for index in range(scans):
        rows.append(
            {
                "image": f"images/scan_{index:04d}.nii.gz",
                "label": labels[index],
                "mask": f"masks/scan_{index:04d}_mask.nii.gz",
                "split": splits[index],
            }
        )
    _write_csv(out / "datalist.csv", DATALIST_COLUMNS, rows)
    meta_rows = [{**rows[i], **infos[i]} for i in range(scans)]
    _write_csv(out / "metadata.csv", METADATA_COLUMNS, meta_rows)
    manifest = _manifest(scans, seed)
    manifest.update(
        {
            "positives": int(sum(labels)),
            "splits": {name: splits.count(name) for name in SPLIT_FRACTIONS},
            "workers": workers,
            "build_seconds": round(seconds, 1),
            "template": "MNI152 2009c T1 and white matter (nilearn package data)",
        }
    )
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out / "datalist.csv"


def _write_csv(path: Path, columns, rows) -> None:
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(partial, path)


def default_dataset_dir(scans: int = DEFAULT_SCANS, seed: int = 0) -> Path:
    """Where the built-in dataset lives by default, shared across runs (see `common.paths`)."""
    return toolkit_home() / "medimg" / f"synthetic-v{GENERATOR_VERSION}-n{scans}-seed{seed}"
