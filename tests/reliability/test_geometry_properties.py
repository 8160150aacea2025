"""Property test of the NIfTI loader's geometry: to the model grid and back is the identity.

For random affines (any permutation and flip of the axes, voxel sizes, origins, optionally an
oblique rotation), written to disk in random ways (NIfTI-1 or NIfTI-2, either byte order, gzip
or not, sform or qform only), the file is read by `io.load_scan` and brought onto the RAS+ model
grid by `preprocess.preprocess`; mapping the model-grid image back with `Geometry.to_original`
must give back the stored voxels. The image is the stored voxel index along each axis (three
volumes of a 4D file), so "identity within half a voxel" is checked directly on coordinates.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipelines.medimg.io import load_scan
from pipelines.medimg.preprocess import PreprocessConfig, preprocess


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@st.composite
def stored_grids(draw):
    """`(affine, shape)`: stored axis k runs along world axis perm[k], flipped or not."""
    perm = draw(st.permutations([0, 1, 2]))
    signs = draw(st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3))
    spacing = draw(st.tuples(*[st.floats(0.5, 4.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-150.0, 150.0)] * 3))
    shape = draw(st.tuples(*[st.integers(5, 14)] * 3))
    matrix = np.zeros((3, 3))
    for k in range(3):
        matrix[perm[k], k] = signs[k] * spacing[k]
    if draw(st.booleans()):  # oblique: rotate about a random world axis
        matrix = _rotation(draw(st.integers(0, 2)), draw(st.floats(-30.0, 30.0))) @ matrix
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine, shape


@st.composite
def storage(draw):
    return {
        "nifti2": draw(st.booleans()),
        "big_endian": draw(st.booleans()),
        "gzip": draw(st.booleans()),
        "qform_only": draw(st.booleans()),
    }


def _write_index_fields(folder: Path, affine, shape, how) -> Path:
    """A 4D file whose volume k holds each voxel's stored index along axis k."""
    fields = np.stack(np.indices(shape, dtype=np.float32), axis=-1)  # (X, Y, Z, 3)
    image_class = nib.Nifti2Image if how["nifti2"] else nib.Nifti1Image
    header = image_class.header_class(endianness=">" if how["big_endian"] else "<")
    image = image_class(fields, affine, header=header)
    if how["qform_only"]:
        image.set_qform(affine, code=1)
        image.set_sform(None, code=0)
    else:
        image.set_sform(affine, code=1)
    path = folder / ("scan.nii.gz" if how["gzip"] else "scan.nii")
    nib.save(image, str(path))
    return path


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    grid=stored_grids(),
    how=storage(),
    model_spacing=st.tuples(*[st.floats(0.6, 3.0)] * 3),
)
def test_load_reorient_resample_and_map_back_is_the_identity_within_half_a_voxel(
    grid, how, model_spacing
):
    affine, shape = grid
    # A model grid big enough for the whole stored field of view plus a margin.
    corners = np.stack(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij"), -1)
    world = corners.reshape(-1, 3) @ affine[:3, :3].T + affine[:3, 3]
    extent = world.max(0) - world.min(0)
    # At least 4 model voxels across on every axis, so the grids share an interior.
    assume(np.all(extent >= 4 * np.asarray(model_spacing)))
    model_shape = tuple(int(n) for n in np.ceil(extent / np.asarray(model_spacing)) + 3)
    config = PreprocessConfig(
        spacing=model_spacing, shape=model_shape, center="volume", normalization="none"
    )
    with tempfile.TemporaryDirectory() as folder:
        path = _write_index_fields(Path(folder), affine, shape, how)
        scans = [load_scan(path, volume=k) for k in range(3)]
    scan = scans[0]
    assert scan.shape == shape and scan.num_volumes == 3
    # qform stores a float32 quaternion: equal to the written affine to float32 precision.
    np.testing.assert_allclose(scan.affine, affine, atol=1e-3 * max(1.0, np.abs(affine).max()))

    items = [preprocess(s, config) for s in scans]
    geometry = items[0].geometry
    assert geometry.model_shape == model_shape
    # The model grid is RAS+: positive diagonal voxel sizes, whatever the storage.
    np.testing.assert_allclose(geometry.model_affine[:3, :3], np.diag(model_spacing))
    # normalization "none": the model image is the resampled stored image, nothing more.
    for k, item in enumerate(items):
        assert item.geometry.to_dict() == geometry.to_dict()
        np.testing.assert_allclose(item.image, geometry.to_model(scans[k].data), atol=1e-4)

    ones = geometry.to_original(geometry.to_model(np.ones(shape, np.float32)))
    covered = np.abs(ones - 1.0) < 1e-4  # not blended with the outside of either grid
    # A thin oblique volume may share little interior with the model grid: not a useful case.
    assume(covered.mean() > 0.2)
    index = np.indices(shape, dtype=np.float32)
    for k, item in enumerate(items):
        back = item.to_original(item.image)
        assert back.shape == shape
        error = np.abs(back - index[k])[covered]
        assert error.max() < 0.5, f"axis {k}: error {error.max():.3f} voxels"
    # Index maps between the grids are exact inverses and agree with world coordinates.
    point = np.asarray(shape, np.float64) / 3.0
    model_point = geometry.original_index_to_model(point)
    np.testing.assert_allclose(geometry.model_index_to_original(model_point), point, atol=1e-6)
    np.testing.assert_allclose(
        geometry.model_index_to_world(model_point),
        scan.affine[:3, :3] @ point + scan.affine[:3, 3],
        atol=1e-6,
    )
