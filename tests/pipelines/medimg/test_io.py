"""Reading NIfTI files: formats, data types, byte order, 4D, NaN, and every kind of bad file."""

from __future__ import annotations

import gzip
import re
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.medimg.io import load_scan, read_header, save_nifti
from tests.pipelines.medimg.scans import phantom, ras_affine, reorient, write
from toolkit.errors import UserError


@pytest.fixture
def volume():
    return phantom((12, 14, 10))


def test_nifti1_nifti2_plain_and_gzip_give_the_same_scan(tmp_path, volume):
    affine = ras_affine((1.5, 2.0, 2.5))
    paths = [
        write(tmp_path / "a.nii", volume, affine),
        write(tmp_path / "b.nii.gz", volume, affine),
        write(tmp_path / "c.nii", volume, affine, image_class=nib.Nifti2Image),
        write(tmp_path / "d.nii.gz", volume, affine, image_class=nib.Nifti2Image),
    ]
    assert Path(paths[2]).read_bytes()[:4] == (540).to_bytes(4, "little")
    for path in paths:
        scan = load_scan(path)
        assert scan.shape == volume.shape
        assert scan.data.dtype == np.float32
        np.testing.assert_array_equal(scan.data, volume)
        np.testing.assert_allclose(scan.affine, affine)
        assert scan.spacing == pytest.approx((1.5, 2.0, 2.5))
        assert scan.orientation == "RAS"
        assert scan.notes == [] and scan.nonfinite_count == 0


def test_content_decides_the_format_not_the_name(tmp_path, volume):
    gz = write(tmp_path / "scan.nii.gz", volume)
    renamed = tmp_path / "scan_without_gz_suffix.nii"
    renamed.write_bytes(gz.read_bytes())
    np.testing.assert_array_equal(load_scan(renamed).data, volume)


@pytest.mark.parametrize("image_class", [nib.Nifti1Image, nib.Nifti2Image])
def test_big_endian_files_load(tmp_path, volume, image_class):
    data = np.rint(volume).astype(np.int16)
    path = write(tmp_path / "be.nii", data, image_class=image_class, endianness=">")
    sizeof_hdr = 348 if image_class is nib.Nifti1Image else 540
    assert path.read_bytes()[:4] == sizeof_hdr.to_bytes(4, "big")
    scan = load_scan(path)
    np.testing.assert_array_equal(scan.data, data.astype(np.float32))


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64, np.float32, np.float64]
)
def test_any_on_disk_dtype_is_read_as_float32(tmp_path, dtype):
    data = (np.arange(6 * 5 * 4).reshape(6, 5, 4) % 97).astype(dtype)
    scan = load_scan(write(tmp_path / "t.nii.gz", data, dtype=dtype))
    assert scan.header.get_data_dtype() == np.dtype(dtype)
    assert scan.data.dtype == np.float32
    np.testing.assert_array_equal(scan.data, data.astype(np.float32))


@pytest.mark.parametrize("name", ["scaled.nii", "scaled.nii.gz"])
def test_intensity_scaling_is_applied_in_float32(tmp_path, name):
    data = (np.arange(64**3) % 1000).astype(np.int16).reshape(64, 64, 64)
    image = nib.Nifti1Image(data, ras_affine())
    image.header.set_slope_inter(0.5, -3.0)
    path = tmp_path / name
    nib.save(image, str(path))
    tracemalloc.start()
    try:
        scan = load_scan(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(scan.data, data * 0.5 - 3.0)
    # The stored int16 array plus one float32 copy, not a float64 intermediate.
    assert peak < 1.8 * scan.data.nbytes


def test_orientation_is_reported_and_data_kept_as_stored(tmp_path, volume):
    data, affine = reorient(volume, ras_affine(), "LPS")
    scan = load_scan(write(tmp_path / "lps.nii.gz", data, affine))
    assert scan.orientation == "LPS"
    np.testing.assert_array_equal(scan.data, data)
    np.testing.assert_allclose(scan.affine, affine)


def test_4d_with_one_volume_and_trailing_singletons_is_3d(tmp_path, volume):
    for shape in [(*volume.shape, 1), (*volume.shape, 1, 1, 1)]:
        scan = load_scan(write(tmp_path / f"{len(shape)}d.nii.gz", volume.reshape(shape)))
        assert scan.shape == volume.shape
        assert scan.volume is None and scan.num_volumes == 1
        np.testing.assert_array_equal(scan.data, volume)


def test_4d_with_several_volumes_needs_a_volume_index(tmp_path, volume):
    series = np.stack([volume, 2 * volume, 3 * volume], axis=-1)
    path = write(tmp_path / "series.nii.gz", series)
    with pytest.raises(UserError) as error:
        load_scan(path)
    message = str(error.value)
    assert str(path) in message and "3 volumes" in message and "--volume N" in message
    scan = load_scan(path, volume=2)
    np.testing.assert_allclose(scan.data, 3 * volume)
    assert scan.volume == 2 and scan.num_volumes == 3
    assert scan.notes == ["used volume 2 of 3"]
    for bad in (3, -1):
        with pytest.raises(UserError, match="out of range"):
            load_scan(path, volume=bad)
    with pytest.raises(UserError, match="out of range"):
        load_scan(write(tmp_path / "single.nii.gz", volume), volume=1)


def test_2d_image_is_one_slice(tmp_path):
    data = np.arange(20, dtype=np.float32).reshape(5, 4) + 1
    scan = load_scan(write(tmp_path / "slice.nii", data))
    assert scan.shape == (5, 4, 1)
    np.testing.assert_array_equal(scan.data[..., 0], data)


def test_nan_and_inf_are_replaced_by_the_minimum_and_counted(tmp_path, volume):
    data = volume.copy() + 5.0
    data[0, 0, 0] = np.nan
    data[1, 2, 3] = np.inf
    data[2, 2, 2] = -np.inf
    scan = load_scan(write(tmp_path / "nan.nii.gz", data))
    assert scan.nonfinite_count == 3
    finite_min = np.nanmin(np.where(np.isfinite(data), data, np.nan))
    assert scan.data[0, 0, 0] == scan.data[1, 2, 3] == scan.data[2, 2, 2] == finite_min
    assert np.isfinite(scan.data).all()
    assert scan.notes == [f"replaced 3 NaN/inf voxels with {finite_min:g}"]


def _nifti_bytes(shape, dtype=np.int16, payload: bytes | None = None, image_class=nib.Nifti1Image):
    header = image_class.header_class()
    header.set_data_dtype(dtype)
    header["dim"][0] = len(shape)
    header["dim"][1 : len(shape) + 1] = shape
    header["vox_offset"] = header.single_vox_offset
    block = header.binaryblock
    extension = b"\0" * (int(header.single_vox_offset) - len(block))
    return block + extension + (payload if payload is not None else b"\0" * 64)


def _bad_files(tmp_path: Path, volume):
    good_nii = write(tmp_path / "good.nii", volume)
    good_gz = write(tmp_path / "good.nii.gz", volume)
    files = {}
    files["random bytes"] = tmp_path / "random.nii"
    files["random bytes"].write_bytes(np.random.default_rng(0).bytes(5000))
    files["empty"] = tmp_path / "empty.nii"
    files["empty"].write_bytes(b"")
    files["truncated nii"] = tmp_path / "truncated.nii"
    raw = good_nii.read_bytes()
    files["truncated nii"].write_bytes(raw[: len(raw) - 700])
    files["truncated header"] = tmp_path / "short.nii"
    files["truncated header"].write_bytes(raw[:200])
    files["truncated gz"] = tmp_path / "truncated.nii.gz"
    compressed = good_gz.read_bytes()
    files["truncated gz"].write_bytes(compressed[: len(compressed) * 2 // 3])
    files["zero-length axis"] = tmp_path / "zero.nii"
    files["zero-length axis"].write_bytes(_nifti_bytes((10, 0, 10)))
    files["huge nii"] = tmp_path / "huge.nii"
    files["huge nii"].write_bytes(_nifti_bytes((10000, 10000, 10000)))
    files["huge gz"] = tmp_path / "huge.nii.gz"
    files["huge gz"].write_bytes(gzip.compress(_nifti_bytes((10000, 10000, 10000))))
    files["huge nifti2"] = tmp_path / "huge2.nii"
    files["huge nifti2"].write_bytes(
        _nifti_bytes((10**6, 10**6, 10**6), image_class=nib.Nifti2Image)
    )
    files["all NaN"] = write(tmp_path / "allnan.nii.gz", np.full((4, 4, 4), np.nan, np.float32))
    files["all zero"] = write(tmp_path / "zeros.nii.gz", np.zeros((4, 4, 4), np.float32))
    files["mgz"] = tmp_path / "brain.mgz"
    nib.save(nib.MGHImage(volume, ras_affine()), str(files["mgz"]))
    files["complex"] = write(tmp_path / "complex.nii", volume.astype(np.complex64))
    files["missing"] = tmp_path / "does_not_exist.nii.gz"
    files["directory"] = tmp_path / "folder.nii"
    files["directory"].mkdir()
    return files


EXPECTED_REASONS = {
    "random bytes": "not a NIfTI file",
    "empty": "empty",
    "truncated nii": "truncated",
    "truncated header": "truncated: only 200 bytes",
    "truncated gz": "truncated",
    "zero-length axis": "zero-length axis",
    "huge nii": "truncated or has a corrupt header",
    "huge gz": "more than a",
    "huge nifti2": "truncated or has a corrupt header",
    "all NaN": "NaN",
    "all zero": "constant",
    "mgz": "MGH",
    "complex": "unsupported data type",
    "missing": "does not exist",
    "directory": "directory",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_REASONS))
def test_bad_files_raise_one_line_user_error_naming_the_file(tmp_path, volume, kind):
    path = _bad_files(tmp_path, volume)[kind]
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as error:
            load_scan(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert EXPECTED_REASONS[kind] in message, message
    assert peak < 50 * 2**20, f"{kind}: peak memory {peak / 2**20:.0f} MiB"


def test_constant_volume_loads_only_when_allowed(tmp_path):
    path = write(tmp_path / "empty_mask.nii.gz", np.zeros((4, 5, 6), np.float32))
    with pytest.raises(UserError, match="constant"):
        load_scan(path)
    mask = load_scan(path, allow_constant=True)
    assert mask.shape == (4, 5, 6)
    assert not mask.data.any()


def test_declared_size_beyond_max_voxels_is_refused_before_reading(tmp_path):
    payload = b"\0" * (64 * 64 * 64 * 2)
    path = tmp_path / "big.nii"
    path.write_bytes(_nifti_bytes((64, 64, 64), payload=payload))
    assert read_header(path).shape == (64, 64, 64)
    with pytest.raises(UserError, match=r"262,144 voxels, more than the 1,000"):
        load_scan(path, max_voxels=1000)


def test_every_nifti_in_nibabels_test_data_loads_or_gives_a_user_error():
    folder = Path(nib.__file__).parent / "tests" / "data"
    files = sorted(folder.glob("*.nii")) + sorted(folder.glob("*.nii.gz"))
    assert len(files) >= 5
    loaded = 0
    for path in files:
        try:
            scan = load_scan(path)
        except UserError as error:
            assert str(path) in str(error)
            continue
        assert scan.data.ndim == 3 and np.isfinite(scan.data).all()
        loaded += 1
    assert loaded >= 3


def test_save_nifti_copies_the_reference_geometry(tmp_path, volume):
    data, affine = reorient(volume, ras_affine((1.0, 1.5, 2.0)), "PSR")
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, 1)
    image.set_sform(affine, 4)
    nib.save(image, str(tmp_path / "ref.nii.gz"))
    scan = load_scan(tmp_path / "ref.nii.gz")
    heat = np.random.default_rng(0).random(scan.shape).astype(np.float32)
    out = save_nifti(tmp_path / "out" / "heat.nii.gz", heat, reference=scan)
    saved = nib.load(str(out))
    assert saved.shape == scan.shape
    np.testing.assert_allclose(saved.affine, scan.affine)
    assert int(saved.header["sform_code"]) == 4 and int(saved.header["qform_code"]) == 1
    np.testing.assert_allclose(saved.get_fdata(), heat, rtol=1e-6)
    with pytest.raises(ValueError, match="does not match"):
        save_nifti(tmp_path / "bad.nii.gz", heat[:-1], reference=scan)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("0.dcm", "is a DICOM file"),  # its free-form preamble starts with the number 348
        ("tiny.mnc", "is a MINC-1 (NetCDF) file"),
        ("minc2_4d.mnc", "is an HDF5 file (MINC-2?)"),
        ("tinypet.v", "is an ECAT 7 PET file"),
    ],
)
def test_other_medical_formats_shipped_by_nibabel_are_named(name, reason):
    path = Path(nib.__file__).parent / "tests" / "data" / name
    if not path.is_file():
        pytest.skip(f"this nibabel version does not ship {name}")
    with pytest.raises(UserError, match=re.escape(f"{path}: {reason}")):
        load_scan(path)


def test_a_corrupted_byte_inside_a_gzip_stream_is_caught_by_its_checksum(tmp_path, volume):
    compressed = bytearray(gzip.compress(write(tmp_path / "a.nii", volume).read_bytes()))
    compressed[len(compressed) // 2] ^= 0xFF
    path = tmp_path / "bitflip.nii.gz"
    path.write_bytes(bytes(compressed))
    # Without reading to the gzip trailer, this decodes to garbage voxels and no error.
    with pytest.raises(UserError, match="corrupt"):
        load_scan(path)


def test_zero_voxel_sizes_without_an_sform_are_refused_not_guessed(tmp_path, volume):
    image = nib.Nifti1Image(volume, None)  # no sform: the geometry comes from pixdim
    image.header["pixdim"][1:4] = [2.0, 0.0, 2.0]
    nib.save(image, str(tmp_path / "flat.nii"))
    with pytest.raises(UserError, match=r"voxel sizes \[2.0, 0.0, 2.0\]"):
        load_scan(tmp_path / "flat.nii")
