"""Every scan the reliability suite feeds the medical pipeline, and the outcome each must get.

`scan_cases(folder)` returns one `ScanCase` per file: every NIfTI that nibabel ships in its own
test-data folder (found at run time, never copied), a few of nibabel's non-NIfTI medical files
(DICOM, MGZ, MINC, ANALYZE, AFNI), and files generated into `folder`: truncated, random, empty,
lying headers, degenerate geometry, odd data types and valid scans stored in unusual ways.

`expected` is the documented outcome without `--volume`: `None` for a valid result, else a piece
of the one error line (`error: <path>: <reason>`). Shipped files this list does not know (a newer
nibabel) get `ANY`: a valid result or one error line, nothing else.
"""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.pipelines.medimg.scans import phantom, ras_affine, reorient, write

__all__ = ["ANY", "NIBABEL_DATA", "ScanCase", "scan_cases", "shipped_4d_cases"]

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"
ANY = "<valid or one error line>"

# What nibabel 5.x ships, and what each gives without --volume.
_SHIPPED_NIFTI = {
    "anatomical.nii": (None, "NIfTI-1, big-endian int16, LAS"),
    "reoriented_anat_moved.nii": (None, "NIfTI-1, big-endian float32, moved origin"),
    "resampled_anat_moved.nii": (None, "NIfTI-1, big-endian float32, 3 slices, 153 NaN voxels"),
    "standard.nii.gz": (None, "NIfTI-1 gzip, 4x5x7 uint8, anisotropic 1x3x2 mm"),
    "functional.nii": ("holds 20 volumes", "NIfTI-1 4D series, 20 volumes"),
    "example4d.nii.gz": ("holds 2 volumes", "NIfTI-1 gzip 4D series, 2 volumes"),
    "example_nifti2.nii.gz": ("holds 2 volumes", "NIfTI-2 gzip 4D series, 2 volumes"),
    "row_major.dconn.nii": ("6-dimensional", "CIFTI-2 dense connectivity (6D NIfTI-2)"),
}
_SHIPPED_OTHER = {
    "0.dcm": ("DICOM", "DICOM slice (its preamble starts with the number 348)"),
    "test.mgz": ("MGH/MGZ", "FreeSurfer MGZ"),
    "tiny.mnc": ("MINC", "MINC-1 (NetCDF)"),
    "minc2_4d.mnc": ("MINC", "MINC-2 (HDF5)"),
    "nifti1.hdr": (".hdr/.img pair", "NIfTI-1 header of a .hdr/.img pair"),
    "analyze.hdr": ("ANALYZE", "ANALYZE 7.5 header"),
    "example4d+orig.HEAD": ("not a NIfTI file", "AFNI header (text)"),
    "tinypet.v": ("ECAT", "ECAT 7 PET"),
}


@dataclasses.dataclass(frozen=True)
class ScanCase:
    """One file and the outcome the pipeline must give it.

    Attributes:
        name: str. Short label used in test ids and the docs table.
        path: Path. The file.
        description: str. What the file is.
        expected: str or None. A piece of the error reason, `None` for a valid result, or `ANY`.
        shipped: bool. The file comes from nibabel's test data.
    """

    name: str
    path: Path
    description: str
    expected: str | None
    shipped: bool = False


def _nifti_header_bytes(shape, dtype=np.int16, nifti2=False) -> bytes:
    """A header (plus the 4-byte extension flag) declaring `shape`, without image data."""
    header = (nib.Nifti2Header if nifti2 else nib.Nifti1Header)()
    header.set_data_dtype(dtype)
    header["dim"][0] = len(shape)
    header["dim"][1 : len(shape) + 1] = shape
    header["pixdim"][1:4] = 1.0
    header["vox_offset"] = header.single_vox_offset
    block = header.binaryblock
    return block + b"\0" * (int(header.single_vox_offset) - len(block))


def _volume(seed=0) -> np.ndarray:
    return phantom((20, 24, 18), seed=seed)


def _generated(folder: Path) -> list[ScanCase]:
    folder.mkdir(parents=True, exist_ok=True)
    volume = _volume()
    affine = ras_affine((2.5, 2.5, 2.5), origin=(-25.0, -30.0, -22.0))
    rng = np.random.default_rng(7)
    cases = []

    def add(name, path, description, expected):
        cases.append(ScanCase(name, Path(path), description, expected))

    # Valid scans stored in unusual ways.
    add("plain", write(folder / "plain.nii", volume, affine), "NIfTI-1, float32, RAS", None)
    data, lps = reorient(volume, affine, "LPS")
    add("lps_gz", write(folder / "lps.nii.gz", data, lps), "NIfTI-1 gzip, LPS storage", None)
    data, psr = reorient(volume, affine, "PSR")
    add("psr", write(folder / "psr.nii", data, psr), "NIfTI-1, PSR storage (axes permuted)", None)
    angle = np.radians(25.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    add(
        "oblique",
        write(folder / "oblique.nii.gz", volume, rotation @ affine),
        "NIfTI-1 gzip, oblique affine (25 degrees about z)",
        None,
    )
    big = np.rint(volume).astype(np.int16)
    add(
        "big_endian_nifti2",
        write(folder / "big_endian_n2.nii", big, affine, nib.Nifti2Image, endianness=">"),
        "NIfTI-2, big-endian int16",
        None,
    )
    scaled = nib.Nifti1Image(np.rint(volume).astype(np.int16), affine)
    scaled.header.set_slope_inter(0.5, -20.0)
    nib.save(scaled, str(folder / "scaled_int16.nii"))
    add(
        "scaled_int16", folder / "scaled_int16.nii", "int16 with scl_slope 0.5, scl_inter -20", None
    )
    add(
        "float64",
        write(folder / "float64.nii.gz", volume.astype(np.float64), affine),
        "float64 data",
        None,
    )
    add(
        "uint8",
        write(folder / "uint8.nii.gz", np.clip(volume, 0, 255).astype(np.uint8), affine),
        "uint8 data",
        None,
    )
    partial = volume.copy()
    partial[:3] = np.nan
    partial[-1, -1, -1] = np.inf
    add(
        "some_nan",
        write(folder / "some_nan.nii.gz", partial, affine),
        "some NaN and inf voxels",
        None,
    )
    add(
        "slice_2d",
        write(folder / "slice_2d.nii.gz", volume[:, :, 9], affine),
        "2D image (one slice)",
        None,
    )
    add(
        "slice_coronal",
        write(folder / "slice_coronal.nii", volume[:, 12:13, :], affine),
        "one coronal slice stored as 20x1x18",
        None,
    )
    add(
        "line",
        write(folder / "line.nii", volume[10:11, 12:13, :], affine),
        "a line of voxels, 1x1x18",
        None,
    )
    add(
        "tiny_2x2x2",
        write(folder / "tiny.nii.gz", np.arange(8, dtype=np.float32).reshape(2, 2, 2), affine),
        "2x2x2 volume",
        None,
    )
    gz_named_plain = folder / "gzipped_but_named.nii"
    gz_named_plain.write_bytes(gzip.compress((folder / "plain.nii").read_bytes()))
    add("gzip_named_nii", gz_named_plain, "gzip content named .nii", None)

    # Broken files.
    raw = (folder / "plain.nii").read_bytes()
    (folder / "truncated.nii").write_bytes(raw[: len(raw) // 2])
    add("truncated_nii", folder / "truncated.nii", "first half of a .nii", "truncated")
    (folder / "header_only.nii").write_bytes(raw[:352])
    add("header_only", folder / "header_only.nii", "header without data", "truncated")
    (folder / "short_header.nii").write_bytes(raw[:200])
    add("short_header", folder / "short_header.nii", "200 bytes of a header", "truncated")
    compressed = gzip.compress(raw)
    (folder / "truncated.nii.gz").write_bytes(compressed[: len(compressed) // 2])
    add("truncated_gz", folder / "truncated.nii.gz", "first half of a .nii.gz", "truncated")
    flipped = bytearray(compressed)
    flipped[len(flipped) // 2] ^= 0xFF
    (folder / "bitflip.nii.gz").write_bytes(bytes(flipped))
    add("bitflip_gz", folder / "bitflip.nii.gz", ".nii.gz with one corrupted byte", "corrupt")
    (folder / "random.nii").write_bytes(rng.bytes(4096))
    add("random_nii", folder / "random.nii", "4 KB of random bytes named .nii", "not a NIfTI")
    (folder / "random.nii.gz").write_bytes(b"\x1f\x8b" + rng.bytes(4094))
    add("random_gz", folder / "random.nii.gz", "gzip magic then random bytes", "corrupt")
    (folder / "text.nii").write_text("subject,age\n01,34\n" * 40)
    add("text_nii", folder / "text.nii", "a CSV file named .nii", "not a NIfTI")
    (folder / "empty.nii").write_bytes(b"")
    add("empty", folder / "empty.nii", "empty file (0 bytes)", "empty")
    huge = _nifti_header_bytes((10_000, 10_000, 10_000)) + b"\0" * 1024
    (folder / "huge.nii").write_bytes(huge)
    add("huge_nii", folder / "huge.nii", "header declares 10^12 voxels (2 TB)", "declares")
    (folder / "huge.nii.gz").write_bytes(gzip.compress(huge))
    add("huge_gz", folder / "huge.nii.gz", "gzip, header declares 10^12 voxels", "declares")
    (folder / "huge_n2.nii").write_bytes(
        _nifti_header_bytes((10_000, 10_000, 10_000), nifti2=True) + b"\0" * 1024
    )
    add("huge_nifti2", folder / "huge_n2.nii", "NIfTI-2, declares 10^12 voxels", "declares")
    (folder / "zero_axis.nii").write_bytes(_nifti_header_bytes((16, 0, 16)))
    add("zero_axis", folder / "zero_axis.nii", "shape 16x0x16", "zero-length axis")
    add(
        "all_nan",
        write(folder / "all_nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32), affine),
        "every voxel NaN",
        "NaN",
    )
    add(
        "all_zero",
        write(folder / "all_zero.nii.gz", np.zeros((8, 8, 8), np.float32), affine),
        "every voxel 0",
        "constant",
    )
    add(
        "complex",
        write(folder / "complex.nii", volume.astype(np.complex64), affine),
        "complex64 data",
        "unsupported data type",
    )
    rgb = np.zeros(volume.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    rgb["R"] = np.clip(volume, 0, 255).astype(np.uint8)
    add("rgb", write(folder / "rgb.nii", rgb, affine), "RGB24 data", "unsupported data type")
    add(
        "five_d",
        write(folder / "five_d.nii.gz", np.ones((6, 6, 6, 2, 2), np.float32), affine),
        "5D data 6x6x6x2x2",
        "5-dimensional",
    )
    flat = nib.Nifti1Image(volume, None)
    flat.header["pixdim"][1:4] = 0.0
    nib.save(flat, str(folder / "zero_voxel_size.nii"))
    add(
        "zero_voxel_size",
        folder / "zero_voxel_size.nii",
        "no qform/sform and voxel sizes 0",
        "voxel sizes",
    )
    header = nib.Nifti1Header.from_header(nib.load(str(folder / "plain.nii")).header)
    header["srow_x"][0] = np.nan  # nibabel refuses to write such an affine itself
    (folder / "nan_affine.nii").write_bytes(
        header.binaryblock + b"\0" * 4 + volume.astype(np.float32).tobytes(order="F")
    )
    add("nan_affine", folder / "nan_affine.nii", "sform with a NaN entry", "degenerate affine")
    mgz = folder / "scan.mgz"
    nib.save(nib.MGHImage(volume, affine), str(mgz))
    add("mgz", mgz, "FreeSurfer .mgz written by nibabel's MGHImage", "MGH/MGZ")
    pair = folder / "pair.img"
    nib.save(nib.AnalyzeImage(volume, affine), str(pair))
    add("analyze_hdr", folder / "pair.hdr", "ANALYZE 7.5 .hdr of a .hdr/.img pair", "ANALYZE")
    add("analyze_img", pair, "raw .img of a .hdr/.img pair", "not a NIfTI")
    (folder / "folder.nii").mkdir(exist_ok=True)
    add("directory", folder / "folder.nii", "a directory named .nii", "directory")
    add("missing", folder / "missing.nii.gz", "a path that does not exist", "does not exist")
    return cases


def _shipped() -> list[ScanCase]:
    cases = []
    files = sorted(NIBABEL_DATA.glob("*.nii")) + sorted(NIBABEL_DATA.glob("*.nii.gz"))
    for path in files:
        expected, description = _SHIPPED_NIFTI.get(path.name, (ANY, "NIfTI shipped by nibabel"))
        cases.append(ScanCase(f"nibabel:{path.name}", path, description, expected, True))
    for name, (expected, description) in _SHIPPED_OTHER.items():
        if (NIBABEL_DATA / name).is_file():
            cases.append(
                ScanCase(f"nibabel:{name}", NIBABEL_DATA / name, description, expected, True)
            )
    return cases


def scan_cases(folder: Path) -> list[ScanCase]:
    """Every case: nibabel's shipped files first, then files generated into `folder`."""
    return _shipped() + _generated(Path(folder))


def shipped_4d_cases() -> list[ScanCase]:
    """nibabel's shipped NIfTI files that hold several volumes (valid with `--volume 1`)."""
    found = []
    for case in _shipped():
        if case.path.name.endswith((".nii", ".nii.gz")):
            shape = nib.load(str(case.path)).shape
            if len(shape) == 4 and shape[3] > 1:
                found.append(case)
    return found
