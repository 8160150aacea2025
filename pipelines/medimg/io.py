"""Reading and writing NIfTI scans, with every bad file turned into one clear `UserError`.

`load_scan` reads a single-file NIfTI-1 or NIfTI-2 image (`.nii` or `.nii.gz`, recognised by
content, not by name) of any on-disk data type, byte order and orientation, and returns a
`Scan`: the voxel array exactly as stored (float32, no reorientation yet), its affine and enough
of its header to write outputs that line up with it in any viewer (`save_nifti`). Geometry
(reorientation to RAS, resampling to the model grid, mapping back) lives in `preprocess.py`.

What happens with unusual input:

- A 4D file with one volume (or trailing singleton dimensions) is read as 3D. With several
  volumes the caller must pick one (`volume=N`, the CLIs' `--volume N`); without it a
  `UserError` lists how many volumes there are. A 2D image is read as a volume of one slice.
- NaN and infinite voxels are replaced by the smallest finite value of the volume (the
  background of MRI and CT alike) and counted in `Scan.nonfinite_count`; `Scan.notes` says so
  in words. An all-NaN or constant volume is refused (there is nothing to analyse).
- The header is checked before any image data is read: the declared data size is compared with
  the file size (and with what a gzip file of that size can possibly hold) and with
  `max_voxels`, so a corrupt header that declares 10^12 voxels fails at once with bounded
  memory. Not NIfTI, empty, truncated (`.nii` and `.nii.gz`), zero-length axes, unsupported data
  types (complex, RGB) and degenerate affines each give one line naming the file and the reason.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from toolkit.errors import UserError

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "Scan",
    "load_scan",
    "orientation_code",
    "read_header",
    "save_nifti",
]

#: Largest 3D volume accepted: 2^27 voxels (e.g. 512 x 512 x 512), 512 MB as float32.
DEFAULT_MAX_VOXELS = 2**27

# Deflate cannot expand data by more than about 1032:1, so a gzip file of N bytes holds at most
# ~1032 N bytes; a header declaring more is corrupt (or the file truncated).
_MAX_DEFLATE_RATIO = 1100
_NIFTI2_MAGIC = (b"n+2\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n")
_ALLOWED_KINDS = "iufb"


@dataclasses.dataclass
class Scan:
    """A scan as stored on disk: voxels, affine and the header fields outputs need.

    Attributes:
        path: Path. The file it was read from.
        data: float32 array `(X, Y, Z)` in the stored voxel order (not reoriented), with
            intensity scaling (`scl_slope`, `scl_inter`) applied and non-finite voxels replaced.
        affine: float64 array `(4, 4)`: voxel index -> world (RAS+ millimetres), as nibabel
            reads it (sform if set, else qform, else from the voxel sizes).
        header: the nibabel header (NIfTI-1 or NIfTI-2) of the file.
        volume: int or None. The index of the volume read from a 4D file, else `None`.
        num_volumes: int. Number of volumes in the file (1 for 3D).
        nonfinite_count: int. How many NaN/inf voxels were replaced.
        notes: list of str. Human-readable remarks (volume used, voxels replaced, ...).
    """

    path: Path
    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    volume: int | None = None
    num_volumes: int = 1
    nonfinite_count: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        """The stored shape `(X, Y, Z)`."""
        return tuple(int(n) for n in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel sizes in millimetres along the stored axes (from the affine)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def orientation(self) -> str:
        """Closest axis codes of the stored axes, e.g. `"RAS"` or `"LPS"`."""
        return orientation_code(self.affine)


def orientation_code(affine: np.ndarray) -> str:
    """Return the closest anatomical axis codes of an affine, e.g. `"LPS"`."""
    return "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# Header checks (no image data read).


@dataclasses.dataclass(frozen=True)
class HeaderInfo:
    """What `read_header` learns from a file's header alone."""

    header: nib.Nifti1Header
    image_class: type
    gzipped: bool
    shape: tuple[int, ...]
    dtype: np.dtype
    vox_offset: int
    file_size: int


def _fail(path: Path, reason: str) -> UserError:
    return UserError(f"{path}: {reason}")


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # pragma: no cover


_NOT_NIFTI = "is not a NIfTI file (no NIfTI-1 or NIfTI-2 header found)"


def _sniff_other_format(path: Path, head: bytes, gzipped: bool) -> str | None:
    """The reason to give for a file of another known format, or None."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "is a DICOM file, not NIfTI (convert it with dcm2niix)"
    if head[:4] == b"NRRD":
        return "is an NRRD file, not NIfTI"
    if head[:4] in (b"CDF\x01", b"CDF\x02"):
        return "is a MINC-1 (NetCDF) file, not NIfTI (convert it with mnc2nii)"
    if head[:8] == b"\x89HDF\r\n\x1a\n":
        return "is an HDF5 file (MINC-2?), not NIfTI (convert it with mnc2nii)"
    if head[:7] == b"MATRIX7":
        return "is an ECAT 7 PET file, not NIfTI"
    if len(head) >= 4 and int.from_bytes(head[:4], "big") == 1 and gzipped:
        return "looks like a FreeSurfer MGH/MGZ volume, not NIfTI (convert it with mri_convert)"
    return None


def read_header(path: str | Path, max_voxels: int = DEFAULT_MAX_VOXELS) -> HeaderInfo:
    """Read and check a NIfTI header without reading any image data.

    Args:
        path: str or Path. The file.
        max_voxels: int. Largest accepted 3D volume. Defaults to `DEFAULT_MAX_VOXELS`.

    Returns:
        A `HeaderInfo`.

    Raises:
        UserError: the file is missing, empty, not NIfTI, has a bad or inconsistent header,
            or declares more data than it holds.
    """
    path = Path(path)
    try:
        file_size = path.stat().st_size
    except FileNotFoundError:
        raise _fail(path, "file does not exist") from None
    except OSError as error:
        raise _fail(path, f"cannot read file ({error.strerror or error})") from None
    if path.is_dir():
        raise _fail(path, "is a directory, not a NIfTI file")
    if file_size == 0:
        raise _fail(path, "file is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        opener = gzip.open if gzipped else open
        with opener(path, "rb") as f:
            block = f.read(540)
    except (OSError, EOFError, zlib.error) as error:
        if gzipped:
            raise _fail(path, f"is a corrupt or truncated gzip file ({error})") from None
        raise _fail(path, f"cannot read file ({error})") from None

    if len(block) < 348:
        if len(block) >= 4 and int.from_bytes(block[:4], "little") in (348, 540):
            raise _fail(path, f"is truncated: only {len(block)} bytes, less than a NIfTI header")
        if len(block) >= 4 and int.from_bytes(block[:4], "big") in (348, 540):
            raise _fail(path, f"is truncated: only {len(block)} bytes, less than a NIfTI header")
        raise _fail(path, _sniff_other_format(path, block, gzipped) or _NOT_NIFTI)

    klass = endianness = None
    for order, code in (("little", "<"), ("big", ">")):
        sizeof_hdr = int.from_bytes(block[:4], order)
        if sizeof_hdr == 348 and block[344:348] in (b"n+1\0", b"ni1\0"):
            klass, image_class, endianness = nib.Nifti1Header, nib.Nifti1Image, code
            magic = block[344:348]
        elif sizeof_hdr == 540 and block[4:12] in _NIFTI2_MAGIC:
            if len(block) < 540:
                raise _fail(path, f"is truncated: only {len(block)} bytes, less than a header")
            klass, image_class, endianness = nib.Nifti2Header, nib.Nifti2Image, code
            magic = block[4:7]
        if klass is not None:
            break
    if klass is None:
        # Other formats first: a DICOM preamble is free-form and may well start with 348.
        other = _sniff_other_format(path, block, gzipped)
        if other is not None:
            raise _fail(path, other)
        if int.from_bytes(block[:4], "little") == 348 or int.from_bytes(block[:4], "big") == 348:
            raise _fail(
                path,
                "is an ANALYZE 7.5 header or a NIfTI header with a bad magic string, not a "
                "single-file NIfTI",
            )
        raise _fail(path, _NOT_NIFTI)
    if magic.startswith(b"ni"):
        raise _fail(
            path,
            "is the header of a .hdr/.img pair; only single-file NIfTI (.nii, .nii.gz) is "
            "supported (convert it, e.g. with nibabel: nib.save(nib.load(p), 'scan.nii.gz'))",
        )

    header = klass(binaryblock=block[: klass.sizeof_hdr], endianness=endianness, check=False)
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        raise _fail(path, f"has an invalid header: dim[0] = {ndim} (must be 1 to 7)")
    shape = tuple(int(n) for n in header["dim"][1 : ndim + 1])
    if any(n < 0 for n in shape):
        raise _fail(path, f"has an invalid header: negative size in shape {shape}")
    if any(n == 0 for n in shape):
        raise _fail(path, f"has a zero-length axis (shape {shape}): no image data")
    try:
        dtype = header.get_data_dtype()
    except (KeyError, ValueError, nib.spatialimages.HeaderDataError):
        raise _fail(
            path, f"has an unknown data type code {int(header['datatype'])} in its header"
        ) from None
    if dtype.kind not in _ALLOWED_KINDS or dtype.fields is not None:
        raise _fail(
            path,
            f"has unsupported data type {header.get_value_label('datatype')} "
            "(only real-valued scalar images are supported)",
        )
    if int(header["sform_code"]) == 0:
        # Without an sform the voxel sizes come from pixdim; nibabel would silently make zeros 1 mm.
        sizes = [float(v) for v in header["pixdim"][1 : min(ndim, 3) + 1]]
        if not all(math.isfinite(v) and v != 0 for v in sizes):
            raise _fail(
                path,
                f"has no sform and voxel sizes {sizes} in pixdim: zero or non-finite voxel sizes "
                "leave the scan's geometry unknown",
            )
    vox_offset = int(header["vox_offset"])
    if vox_offset < 0:
        raise _fail(path, f"has an invalid header: negative vox_offset {vox_offset}")

    volume_voxels = math.prod(shape[:3])
    data_bytes = math.prod(shape) * dtype.itemsize
    shape_text = "x".join(str(n) for n in shape)
    if gzipped:
        if data_bytes > _MAX_DEFLATE_RATIO * file_size + vox_offset:
            raise _fail(
                path,
                f"header declares {shape_text} voxels ({_human_bytes(data_bytes)}), more than a "
                f"gzip file of {_human_bytes(file_size)} can hold (corrupt header or truncated "
                "file)",
            )
    elif vox_offset + data_bytes > file_size:
        raise _fail(
            path,
            f"is truncated or has a corrupt header: it declares {shape_text} voxels "
            f"({_human_bytes(data_bytes)} from byte {vox_offset}) but the file has only "
            f"{_human_bytes(file_size)}",
        )
    if volume_voxels > max_voxels:
        raise _fail(
            path,
            f"declares a volume of {shape_text} = {volume_voxels:,} voxels, more than the "
            f"{max_voxels:,} this loader accepts (max_voxels)",
        )
    return HeaderInfo(
        header=header,
        image_class=image_class,
        gzipped=gzipped,
        shape=shape,
        dtype=dtype,
        vox_offset=vox_offset,
        file_size=file_size,
    )


# --------------------------------------------------------------------------------------------
# Loading.


def _spatial_shape(path: Path, shape: tuple[int, ...], volume: int | None):
    """Return `(num_volumes, volume_used)` for a file of `shape`, checking the `volume` choice."""
    shape = list(shape)
    # Trailing singleton dimensions beyond the 4th carry no data.
    while len(shape) > 4 and shape[-1] == 1:
        shape.pop()
    if len(shape) > 4:
        raise _fail(
            path,
            f"has {len(shape)}-dimensional data (shape {tuple(shape)}); only 3D volumes and "
            "4D series are supported",
        )
    if len(shape) == 1:
        raise _fail(path, f"has 1-dimensional data (shape {tuple(shape)}), not an image volume")
    num_volumes = shape[3] if len(shape) == 4 else 1
    if num_volumes > 1:
        if volume is None:
            raise _fail(
                path,
                f"holds {num_volumes} volumes (4D shape {tuple(shape)}); choose one with "
                f"--volume N (0 to {num_volumes - 1})",
            )
        if not 0 <= volume < num_volumes:
            raise _fail(
                path, f"--volume {volume} is out of range: the file holds {num_volumes} volumes"
            )
    elif volume not in (None, 0):
        raise _fail(path, f"--volume {volume} is out of range: the file holds 1 volume")
    used = volume if num_volumes > 1 else None
    return num_volumes, used


def _read_float32(image, index) -> np.ndarray:
    """Read (a slice of) the image data as float32 with scaling applied, in float32.

    nibabel applies `scl_slope`/`scl_inter` in float64; scaling the stored integers in float32
    ourselves keeps peak memory at the stored array plus one float32 copy.
    """
    proxy = image.dataobj
    if not hasattr(proxy, "_get_unscaled"):  # pragma: no cover - other nibabel proxies
        return np.asarray(proxy[index] if index else proxy[...], dtype=np.float32)
    data = np.array(proxy._get_unscaled(slicer=index), dtype=np.float32)
    # The proxy holds the file's scaling (nibabel resets the loaded header's scl_* fields).
    slope, inter = float(proxy.slope), float(proxy.inter)
    if slope != 1.0:
        data *= np.float32(slope)
    if inter != 0.0:
        data += np.float32(inter)
    return data


def _check_gzip_end(path: Path, fileobj) -> None:
    """Read a gzip stream to its end, so that its CRC-32 and length are checked.

    nibabel stops reading at the last voxel, before the gzip trailer: a corrupted byte inside
    the deflate stream would otherwise give garbage voxels without any error.
    """
    try:
        while fileobj.read(1 << 16):
            pass
    except gzip.BadGzipFile as error:
        raise _fail(path, f"is corrupt: the gzip data fails its integrity check ({error})") from None
    except (EOFError, zlib.error) as error:
        raise _fail(path, f"is truncated or corrupt: the gzip data ends early ({error})") from None


def load_scan(
    path: str | Path,
    volume: int | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    allow_constant: bool = False,
) -> Scan:
    """Read one 3D volume of a NIfTI file.

    Args:
        path: str or Path. A single-file NIfTI-1/NIfTI-2 image, gzipped or not.
        volume: int or None. Which volume of a 4D file to read (0-based). Required when the
            file holds more than one volume. Defaults to `None`.
        max_voxels: int. Largest accepted 3D volume. Defaults to `DEFAULT_MAX_VOXELS`.
        allow_constant: bool. Accept a volume whose voxels all have one value (an empty lesion
            mask); scans are refused then, since there is nothing to analyse. Defaults to `False`.

    Returns:
        A `Scan` with float32 data in the stored voxel order.

    Raises:
        UserError: a bad file (see the module docstring), naming the file and the reason.

    Example:

    ```python
    scan = load_scan("sub-01_T1w.nii.gz")
    scan.shape, scan.orientation, scan.spacing
    ```
    """
    path = Path(path)
    info = read_header(path, max_voxels=max_voxels)
    num_volumes, used = _spatial_shape(path, info.shape, volume)
    ndim = len(info.shape)

    opener = gzip.open if info.gzipped else open
    try:
        with opener(path, "rb") as fileobj:
            holder = nib.FileHolder(filename=str(path), fileobj=fileobj)
            image = info.image_class.from_file_map({"image": holder, "header": holder})
            affine = np.asarray(image.affine, dtype=np.float64)
            index = (slice(None),) * 3 + (used or 0,) + (0,) * (ndim - 4) if ndim >= 4 else ()
            data = _read_float32(image, index)
            header = image.header.copy()
            if info.gzipped:
                _check_gzip_end(path, fileobj)
    except UserError:
        raise
    except MemoryError:
        raise _fail(path, "not enough memory to read the image data") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise _fail(path, f"is truncated or corrupt: the image data ends early ({error})") from None
    except Exception as error:  # noqa: BLE001 - any failure to parse a user's file is theirs
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise _fail(path, f"cannot read the NIfTI image data ({message})") from None

    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise _fail(path, f"has unexpected data shape {data.shape}")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _fail(path, "has a degenerate affine (zero or non-finite voxel sizes in the header)")

    notes = []
    if num_volumes > 1:
        notes.append(f"used volume {used} of {num_volumes}")
    finite = np.isfinite(data)
    nonfinite = int(data.size - np.count_nonzero(finite))
    if nonfinite == data.size:
        raise _fail(path, "every voxel is NaN or infinite: no image data")
    if nonfinite:
        fill = float(data[finite].min())
        np.copyto(data, np.float32(fill), where=~finite)
        notes.append(f"replaced {nonfinite} NaN/inf voxels with {fill:g}")
    low, high = float(data.min()), float(data.max())
    if low == high and not allow_constant:
        raise _fail(path, f"is constant (every voxel is {low:g}): no image content")
    return Scan(
        path=path,
        data=data,
        affine=affine,
        header=header,
        volume=used,
        num_volumes=num_volumes,
        nonfinite_count=nonfinite,
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Writing.


def save_nifti(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    reference: Scan | None = None,
    dtype=np.float32,
) -> Path:
    """Write a 3D array as NIfTI so that it lines up with `reference` in any viewer.

    With a `reference`, its affine and its qform/sform codes are copied (so viewers that
    prefer one or the other agree); `data` must then have the reference's shape.

    Args:
        path: str or Path. Output file, `.nii` or `.nii.gz`; parent folders are created.
        data: array `(X, Y, Z)`.
        affine: array `(4, 4)` or None. Used when no `reference` is given.
        reference: `Scan` or None. The scan `data` lives on.
        dtype: on-disk data type. Defaults to `np.float32`.

    Returns:
        The path written.
    """
    path = Path(path)
    data = np.asarray(data)
    if reference is not None:
        if tuple(data.shape) != reference.shape:
            raise ValueError(
                f"data shape {data.shape} does not match the reference scan {reference.shape}"
            )
        affine = reference.affine
    if affine is None:
        raise ValueError("save_nifti needs an affine or a reference scan")
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    image.header.set_data_dtype(dtype)
    if reference is not None:
        header = reference.header
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
        if qform_code:
            image.set_qform(qform, int(qform_code))
        else:
            image.set_qform(None, 0)
        if sform_code:
            image.set_sform(sform, int(sform_code))
        elif qform_code:
            image.set_sform(None, 0)
        else:
            image.set_sform(reference.affine, 1)
        image.header.set_xyzt_units(*header.get_xyzt_units())
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path
