"""Model-grid geometry: orientation invariance, mapping back, resampling and normalisation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pipelines.medimg
from pipelines.medimg.io import Scan, load_scan
from pipelines.medimg.preprocess import (
    Geometry,
    PreprocessConfig,
    load_and_preprocess,
    normalize,
    preprocess,
    resample,
)
from tests.pipelines.medimg.scans import phantom, ras_affine, reorient, write

SMALL = PreprocessConfig(spacing=(3.0, 3.0, 3.0), shape=(32, 36, 30))
ORIENTATIONS = ("RAS", "LPS", "PSR", "ILA")


def _scan(data, affine) -> Scan:
    return Scan(
        path=Path("memory.nii"),
        data=data.astype(np.float32),
        affine=affine,
        header=nib.Nifti1Header(),
    )


def _scipy_resample(data, source_affine, target_affine, shape, order, cval):
    transform = np.linalg.inv(source_affine) @ target_affine
    return scipy.ndimage.affine_transform(
        data.astype(np.float32),
        transform[:3, :3],
        offset=transform[:3, 3],
        output_shape=shape,
        order=order,
        mode="grid-constant",
        cval=cval,
        prefilter=False,
    )


def test_same_scan_in_any_orientation_gives_the_same_model_array(tmp_path):
    volume = phantom((40, 48, 36))
    affine = ras_affine((2.5, 2.0, 3.0), origin=(-50.0, -47.0, -52.5))
    results = {}
    for code in ORIENTATIONS:
        data, stored_affine = reorient(volume, affine, code)
        path = write(tmp_path / f"{code}.nii.gz", data, stored_affine)
        item = load_and_preprocess(path, SMALL)
        assert item.scan.orientation == code
        assert item.image.shape == SMALL.shape and item.image.dtype == np.float32
        results[code] = (item, data)
    reference = results["RAS"][0]
    # The model sees the head, not background: the z-scored foreground has unit spread.
    assert reference.image.std() > 0.5
    for code, (item, data) in results.items():
        np.testing.assert_allclose(item.image, reference.image, atol=1e-4, err_msg=code)
        np.testing.assert_allclose(item.geometry.model_affine, reference.geometry.model_affine)
        # A model-space map goes back onto each file's own grid, with its own shape.
        heat = np.linspace(0, 1, item.image.size, dtype=np.float32).reshape(item.image.shape)
        back = item.to_original(heat)
        assert back.shape == data.shape
        back_ras, _ = reorient(back, item.scan.affine, "RAS")
        ras_back = reference.to_original(heat)
        np.testing.assert_allclose(back_ras, ras_back, atol=1e-5, err_msg=code)


def test_a_planted_bright_cube_is_found_in_model_space_and_after_mapping_back():
    rng = np.random.default_rng(3)
    ras = 10.0 + rng.random((60, 50, 44)).astype(np.float32)
    ras[8:52, 6:44, 5:40] += 40.0  # head
    cube = (slice(40, 46), slice(12, 17), slice(28, 33))
    ras[cube] = 400.0
    affine = ras_affine((1.2, 1.5, 2.0), origin=(-30.0, -40.0, -35.0))
    data, stored_affine = reorient(ras, affine, "LPS")
    cube_mask, _ = reorient(
        np.pad(np.ones((6, 5, 5)), [(40, 14), (12, 33), (28, 11)]), affine, "LPS"
    )
    item = preprocess(
        _scan(data, stored_affine), PreprocessConfig(spacing=(2.0, 2.0, 2.0), shape=(48, 48, 48))
    )
    bright = item.image > 0.5 * item.image.max()
    peak = np.argwhere(bright).mean(axis=0)  # centre of the bright region on the model grid
    # In world coordinates it is the cube's centre...
    world = item.geometry.model_index_to_world(peak)
    corners = np.array([[40, 12, 28], [45, 16, 32]], float) @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(world, corners.mean(0), atol=0.5)
    # ...only the cube is bright...
    # (7.2 x 7.5 x 10 mm covers 3-4 x 3-4 x 5-6 voxels of 2 mm.)
    assert 3 * 3 * 5 <= bright.sum() <= 4 * 4 * 6
    # ...and on the stored grid it is a cube voxel.
    index = np.rint(item.geometry.model_index_to_original(peak)).astype(int)
    assert cube_mask[tuple(index)] == 1
    # A heatmap peaking there, mapped back, peaks inside the cube.
    grid = np.indices(item.image.shape).astype(np.float32)
    heat = np.exp(-np.sum((grid - peak[:, None, None, None]) ** 2, axis=0) / 4.0)
    back = item.to_original(heat.astype(np.float32))
    assert back.shape == data.shape
    assert cube_mask[np.unravel_index(np.argmax(back), back.shape)] == 1


@pytest.mark.parametrize("oblique", [False, True])
@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("cval", [0.0, -3.0])
def test_resample_matches_scipy_affine_transform(oblique, order, cval):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(17, 21, 13)).astype(np.float32)
    source = ras_affine((1.3, 0.9, 2.2), origin=(-8.0, -9.0, -12.0))
    (source,) = [reorient(data, source, "PIL")[1]]
    target = np.eye(4)
    target[:3, :3] = np.diag([1.7, 1.1, 1.4])
    if oblique:
        angle = np.radians(12.0)
        rotation = np.array(
            [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
        )
        target[:3, :3] = rotation @ target[:3, :3]
    target[:3, 3] = [-14.0, -11.0, -15.0]
    shape = (19, 23, 24)
    ours = resample(data, source, target, shape, order=order, cval=cval)
    reference = _scipy_resample(data, source, target, shape, order, cval)
    assert ours.shape == shape
    if order == 0:
        # Nearest neighbour: ties at exactly half a voxel may round differently.
        assert np.mean(ours == reference) > 0.999
    else:
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.any(ours == cval)  # the target grid reaches outside the source


orientation_codes = st.sampled_from(["RAS", "LPS", "LAS", "PSR", "ILA", "SAR", "RPI", "AIL"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    code=orientation_codes,
    shape=st.tuples(*[st.integers(6, 18)] * 3),
    spacing=st.tuples(*[st.floats(0.7, 3.0)] * 3),
    model_spacing=st.tuples(*[st.floats(0.6, 2.5)] * 3),
    center_shift=st.tuples(*[st.floats(-3.0, 3.0)] * 3),
)
def test_round_trip_to_model_and_back_is_the_identity_within_half_a_voxel(
    code, shape, spacing, model_spacing, center_shift
):
    ras_shape = shape
    affine = ras_affine(spacing, origin=(-10.0, 5.0, 2.0))
    coords = np.indices(ras_shape, dtype=np.float32)
    fields = [reorient(c, affine, code)[0] for c in coords]
    stored_affine = reorient(coords[0], affine, code)[1]
    stored_shape = fields[0].shape
    extent = np.asarray(spacing) * np.asarray(ras_shape)
    model_shape = tuple(int(n) for n in np.ceil(extent / np.asarray(model_spacing)) + 2)
    center = stored_affine[:3, :3] @ ((np.asarray(stored_shape) - 1) / 2) + stored_affine[:3, 3]
    geometry = Geometry.centered(
        stored_shape, stored_affine, center + np.asarray(center_shift), model_spacing, model_shape
    )
    ones = geometry.to_original(geometry.to_model(np.ones(stored_shape, np.float32)))
    covered = np.abs(ones - 1.0) < 1e-5
    # A small scan under a coarse, shifted model grid is legitimately covered only in part (a
    # 6 mm cube of 1 mm voxels under a 1 x 2 x 1.375 mm grid shifted by 1 mm: 11% of its
    # voxels, found by Hypothesis in a JAX test pass); such examples say little
    # about the round trip and are discarded. If too many are (a bug that shrinks the covered
    # region everywhere), Hypothesis fails the test as unsatisfiable.
    assume(covered.mean() > 0.2)
    index = np.indices(stored_shape, dtype=np.float32)
    for axis in range(3):
        # The stored-grid coordinate field, through the model grid and back.
        back = geometry.to_original(geometry.to_model(index[axis]))
        error = np.abs(back - index[axis])[covered]
        assert error.max() < 0.5
    # Index maps are exact inverses.
    point = np.array([1.25, 2.5, 3.75])
    np.testing.assert_allclose(
        geometry.model_index_to_original(geometry.original_index_to_model(point)), point, atol=1e-9
    )
    del fields


def test_to_original_keeps_maps_in_range_and_accepts_a_channel_axis():
    affine = ras_affine((1.0, 1.0, 1.0))
    geometry = Geometry.centered(
        (30, 31, 29), affine, [-26.0, -35.0, -16.0], (2.0, 2.0, 2.0), (12, 12, 12)
    )
    heat = np.random.default_rng(1).random((12, 12, 12, 1)).astype(np.float32)
    back = geometry.to_original(heat)
    assert back.shape == (30, 31, 29)
    assert back.min() >= 0.0 and back.max() <= 1.0
    labels = geometry.to_original(np.arange(12**3).reshape(12, 12, 12), order=0, cval=-1)
    assert set(np.unique(labels)) <= set(range(-1, 12**3))
    with pytest.raises(ValueError, match="model grid"):
        geometry.to_original(np.zeros((11, 12, 12)))
    assert Geometry.from_dict(geometry.to_dict()).to_dict() == geometry.to_dict()


def test_zscore_window_and_none_normalisation():
    rng = np.random.default_rng(0)
    image = np.zeros((20, 20, 20), np.float32)
    image[4:16, 4:16, 4:16] = rng.normal(500.0, 50.0, size=(12, 12, 12))
    image[10, 10, 10] = 1e6  # a spike: outside the percentiles, bounded by max_abs_z
    image[5, 5, 5] = 800.0  # a bright voxel keeps its contrast
    out = normalize(image, PreprocessConfig(), threshold=100.0)
    values = image[image > 100]
    clipped = np.clip(values, *np.percentile(values, [0.5, 99.5]))
    mean, std = clipped.mean(), clipped.std()
    expected = np.clip((image - mean) / std, -8.0, 8.0)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert out[10, 10, 10] == 8.0
    assert out[5, 5, 5] == pytest.approx((800.0 - mean) / std, rel=1e-4)
    assert out[5, 5, 5] > out[image > 100].reshape(-1)[np.argsort(values)[-3]]
    assert abs(np.mean(clipped - mean) / std) < 1e-4

    hu = np.array([-1000.0, 0.0, 40.0, 80.0, 1000.0], np.float32).reshape(1, 1, 5)
    window = PreprocessConfig(normalization="window", hu_window=(0.0, 80.0))
    np.testing.assert_allclose(normalize(hu, window, 0.0).ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    none = PreprocessConfig(normalization="none")
    np.testing.assert_array_equal(normalize(hu, none, 0.0), hu)


def test_ct_window_mode_end_to_end():
    ct = np.full((40, 40, 40), -1000.0, np.float32)
    ct[8:32, 8:32, 8:32] = 35.0  # brain
    ct[18:22, 18:22, 18:22] = 75.0  # bleed
    item = preprocess(
        _scan(ct, ras_affine((1.0, 1.0, 1.0))),
        PreprocessConfig(normalization="window", spacing=(1.0, 1.0, 1.0), shape=(40, 40, 40)),
    )
    values = np.unique(np.round(item.image, 4))
    assert values.min() == 0.0 and values.max() == pytest.approx(75 / 80, abs=1e-4)
    assert pytest.approx(35 / 80, abs=1e-4) in values.tolist()


def test_default_yaml_preprocess_section_matches_the_dataclass():
    path = Path(pipelines.medimg.__file__).parent / "configs" / "default.yaml"
    section = yaml.safe_load(path.read_text())["preprocess"]
    assert PreprocessConfig(**section) == PreprocessConfig()
    assert set(section) == {f.name for f in dataclasses.fields(PreprocessConfig)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spacing": (2.0, 0.0, 2.0)}, "spacing"),
        ({"shape": (96, 112)}, "shape"),
        ({"center": "middle"}, "center"),
        ({"normalization": "minmax"}, "normalization"),
        ({"clip_percentiles": (99.0, 1.0)}, "clip_percentiles"),
        ({"hu_window": (80.0, 0.0)}, "hu_window"),
        ({"max_voxels": 0}, "max_voxels"),
        ({"max_abs_z": 0.0}, "max_abs_z"),
    ],
)
def test_invalid_preprocess_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**kwargs)


def test_volume_centre_option_and_background_padding(tmp_path):
    volume = phantom((20, 24, 18)) + 7.0
    path = write(tmp_path / "p.nii", volume, ras_affine((2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)))
    config = PreprocessConfig(
        center="volume", normalization="none", spacing=(2.0, 2.0, 2.0), shape=(30, 30, 30)
    )
    item = load_and_preprocess(path, config)
    centre = item.geometry.model_index_to_world((np.asarray(config.shape) - 1) / 2)
    np.testing.assert_allclose(centre, (np.asarray(volume.shape) - 1) / 2 * 2.0)
    # Outside the stored field of view the model sees the scan's background value.
    assert item.image[0, 0, 0] == pytest.approx(volume.min())
    scan = load_scan(path)
    np.testing.assert_allclose(item.to_original(item.image), scan.data, atol=1e-4)
