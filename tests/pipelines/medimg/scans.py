"""Small NIfTI files for the medical pipeline's tests, written into a test's `tmp_path`."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np


def ras_affine(spacing=(2.0, 2.0, 2.0), origin=(-40.0, -50.0, -30.0)) -> np.ndarray:
    """A RAS+ affine with the given voxel sizes and origin (world of voxel 0)."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def phantom(shape=(40, 48, 36), seed=0) -> np.ndarray:
    """An asymmetric smooth test volume (float32): blobs of different sizes on a dim head."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), -1)
    head = np.exp(-np.sum((grid / [0.8, 0.85, 0.75]) ** 8, axis=-1))
    image = 100.0 * head
    for _ in range(6):
        center = rng.uniform(-0.5, 0.5, size=3)
        width = rng.uniform(0.08, 0.25)
        image += rng.uniform(50, 200) * np.exp(-np.sum((grid - center) ** 2, -1) / width**2)
    return image.astype(np.float32)


def reorient(data: np.ndarray, affine: np.ndarray, code: str):
    """The same image stored with axis codes `code` (e.g. "LPS"): `(data, affine)`."""
    start = nib.orientations.io_orientation(affine)
    end = nib.orientations.axcodes2ornt(tuple(code))
    transform = nib.orientations.ornt_transform(start, end)
    new_data = nib.orientations.apply_orientation(data, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, data.shape)
    assert "".join(nib.aff2axcodes(new_affine)) == code
    return np.ascontiguousarray(new_data), new_affine


def write(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    image_class=nib.Nifti1Image,
    dtype=None,
    endianness: str | None = None,
) -> Path:
    """Save `data` as NIfTI at `path` (NIfTI-1 by default) and return the path."""
    affine = ras_affine() if affine is None else affine
    header = image_class.header_class(endianness=endianness) if endianness else None
    if header is None and dtype is not None:
        header = image_class.header_class()
    if dtype is not None:
        header.set_data_dtype(dtype)
    image = image_class(np.asarray(data), affine, header=header)
    nib.save(image, str(path))
    return Path(path)
