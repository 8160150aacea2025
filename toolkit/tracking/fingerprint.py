"""A stable fingerprint of the data a model was trained on, logged as the `data_fingerprint` tag."""

import hashlib
import json
import os
from pathlib import Path

from toolkit.errors import UserError

FINGERPRINT_LENGTH = 16


def _file_digest(path, chunk_size):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(files=(), records=(), root=None, chunk_size=1 << 20):
    """Returns a short SHA-256 fingerprint of data files and/or records.

    The same data gives the same fingerprint on any machine and in any listing order:

    - each file contributes its path relative to `root` (default: the files' common folder) and
      the SHA-256 of its content; files are sorted by that relative path, so `os.listdir` order
      and where the data set was copied to do not matter;
    - each record (a manifest row, a split definition) contributes its canonical JSON
      (`sort_keys=True`), or its bytes, in the order given.

    Args:
        files: iterable of str or path-like. Data files to hash. Defaults to `()`.
        records: iterable of JSON-serialisable objects or bytes. Defaults to `()`.
        root: str, path-like or None. Folder that file names are taken relative to. Defaults to
            `None` (the common folder of `files`).
        chunk_size: int. Bytes read at a time. Defaults to `1 MiB`.

    Returns:
        str. 16 lowercase hexadecimal characters.

    Raises:
        UserError: when a file cannot be read.

    Example:

    >>> data_fingerprint(records=[{"id": "a", "label": 1}])
    '6940fe820cb9ca6f'
    """
    paths = [Path(p) for p in files]
    if root is None and paths:
        root = os.path.commonpath([str(p.absolute().parent) for p in paths])
    entries = []
    for path in paths:
        try:
            name = path.absolute().relative_to(Path(root).absolute()).as_posix()
        except ValueError:
            name = path.as_posix()
        try:
            entries.append((name, _file_digest(path, chunk_size)))
        except OSError as e:
            raise UserError(f"cannot read data file {path}: {e.strerror}") from None
    digest = hashlib.sha256()
    for name, content in sorted(entries):
        digest.update(b"file\0" + name.encode() + b"\0" + content.encode() + b"\n")
    for record in records:
        if isinstance(record, bytes | bytearray):
            data = bytes(record)
        else:
            data = json.dumps(record, sort_keys=True, default=str).encode()
        digest.update(b"record\0" + hashlib.sha256(data).hexdigest().encode() + b"\n")
    return digest.hexdigest()[:FINGERPRINT_LENGTH]
