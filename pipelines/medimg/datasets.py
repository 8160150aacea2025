"""Datasets users bring: a CSV table or a MONAI-style datalist JSON of scans and labels.

CSV (`.csv`, comma-separated, header row required)::

    image,label,mask,split,subject
    scans/a.nii.gz,1,masks/a_mask.nii.gz,train,patient-07
    scans/b.nii.gz,0,,val,patient-12

- `image` (required): path to a NIfTI scan, relative to the CSV's folder (or absolute).
- `label` (required): `0`/`1` (also `true`/`false`, `yes`/`no`, `positive`/`negative`). It may
  be empty only where a `mask` is given: the label is then 1 when the mask has any voxel > 0.
- `mask` (optional): path to a lesion mask on the scan's grid (heatmap metrics use it).
- `split` (optional): `train`, `val` or `test` (`training`, `validation`/`valid`, `testing`
  accepted). Rows without one are assigned by `assign_splits`.
- `subject` (optional): patient identifier. All scans of one subject always land in the same
  split (patient-level splits); explicit splits that disagree within a subject are an error.

JSON (MONAI datalist)::

    {"training": [{"image": "a.nii.gz", "label": 1}, ...],
     "validation": [...], "test": [...]}

The section names give the split (`training`/`train`, `validation`/`val`, `test`/`testing`);
an entry's own `split` key overrides nothing (it is an error if it disagrees). `label` may be a
number, a boolean, a one-element list, or a path to a segmentation (MONAI segmentation
datalists): then it is used as the mask and the label derived from it. Every entry needs a label
or a mask; MONAI's plain-string test entries (an image path only) are refused for that reason.

What is an error and what is skipped:

- Problems of the list itself raise `UserError` naming the file and line (CSV) or entry
  (JSON): unreadable or malformed file, missing `image`/`label` column, an empty `image`, a label
  that is not 0/1, an unknown split name, a subject split across explicit splits, or no usable
  rows at all. These are typos to fix, so nothing is guessed.
- Rows whose scan or mask file does not exist are skipped with a warning and counted in
  `Datalist.skipped` (a dataset on a shared drive often misses a few files). `strict=True`
  turns them into errors too. Files that exist but are not readable NIfTI are only found when
  they are loaded; the training loop skips and counts those.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from toolkit.errors import UserError

__all__ = [
    "SPLITS",
    "Datalist",
    "Record",
    "assign_splits",
    "read_csv_datalist",
    "read_datalist",
    "read_json_datalist",
]

SPLITS = ("train", "val", "test")
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
_TRUE = {"1", "true", "yes", "positive", "pos", "lesion"}
_FALSE = {"0", "false", "no", "negative", "neg", "normal"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One scan of a dataset.

    Attributes:
        image: Path. Absolute path of the scan.
        label: int. 0 (no lesion) or 1 (lesion).
        mask: Path or None. Absolute path of the lesion mask.
        split: str or None. `"train"`, `"val"`, `"test"`, or None before `assign_splits`.
        subject: str or None. Patient identifier.
        source: str. Where the record came from (`file:line` or `file:section[index]`).
    """

    image: Path
    label: int
    mask: Path | None = None
    split: str | None = None
    subject: str | None = None
    source: str = ""


@dataclasses.dataclass
class Datalist:
    """Records read from a CSV or JSON datalist, plus what was skipped and why."""

    path: Path
    records: list[Record]
    skipped: list[str] = dataclasses.field(default_factory=list)

    def split(self, name: str) -> list[Record]:
        """The records of one split (`"train"`, `"val"` or `"test"`)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}. Received: {name!r}")
        return [r for r in self.records if r.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """`{split: {"scans": n, "positives": p}}` for reporting."""
        table = {}
        for name in SPLITS:
            members = self.split(name)
            table[name] = {"scans": len(members), "positives": sum(r.label for r in members)}
        return table


# --------------------------------------------------------------------------------------------
# Parsing helpers.


def _parse_label(value, where: str) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value in (0, 1):
            return int(value)
        raise UserError(f"{where}: label must be 0 or 1, got {value!r}")
    if value is None:
        return None
    text = str(value).strip().lower()
    if text == "":
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None and number in (0.0, 1.0):
        return int(number)
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise UserError(f"{where}: label must be 0 or 1 (or true/false), got {value!r}")


def _parse_split(value, where: str) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in _SPLIT_NAMES:
        raise UserError(f"{where}: split must be train, val or test, got {value!r}")
    return _SPLIT_NAMES[text]


def _resolve(base: Path, value: str) -> Path:
    path = Path(value.strip()).expanduser()
    return path if path.is_absolute() else (base / path)


def _looks_like_image_path(value) -> bool:
    return isinstance(value, str) and value.strip().lower().endswith((".nii", ".nii.gz"))


def _label_from_mask(mask: Path, where: str) -> int:
    from pipelines.medimg.io import load_scan

    try:
        scan = load_scan(mask)
    except UserError as error:
        # A constant mask is a valid "no lesion" mask.
        if "is constant" in str(error):
            return 0
        raise UserError(f"{where}: cannot derive the label from the mask: {error}") from None
    return int(np.any(scan.data > 0))


def _finish(path: Path, rows: list[dict], strict: bool, warn: bool) -> Datalist:
    """Check files, derive missing labels, validate subjects; build the `Datalist`."""
    records, skipped = [], []
    for row in rows:
        where = row["where"]
        missing = [
            f"{kind} {p}"
            for kind, p in (("image", row["image"]), ("mask", row["mask"]))
            if p is not None and not p.is_file()
        ]
        if missing:
            reason = f"{where}: skipped, file not found: {', '.join(missing)}"
            if strict:
                raise UserError(reason.replace("skipped, ", ""))
            skipped.append(reason)
            continue
        label = row["label"]
        if label is None:
            if row["mask"] is None:
                raise UserError(f"{where}: label is empty and there is no mask to derive it from")
            label = _label_from_mask(row["mask"], where)
        records.append(
            Record(
                image=row["image"],
                label=label,
                mask=row["mask"],
                split=row["split"],
                subject=row["subject"],
                source=where,
            )
        )
    if not records:
        detail = f" ({len(skipped)} rows skipped: {skipped[0]})" if skipped else ""
        raise UserError(f"{path}: no usable scans in the datalist{detail}")
    _check_subject_splits(records)
    if skipped and warn:
        warnings.warn(
            f"{path}: skipped {len(skipped)} of {len(rows)} entries whose files are missing "
            f"(first: {skipped[0]})",
            stacklevel=3,
        )
    return Datalist(path=path, records=records, skipped=skipped)


def _check_subject_splits(records: list[Record]) -> None:
    splits_of = defaultdict(set)
    first_source = {}
    for record in records:
        if record.subject is not None and record.split is not None:
            splits_of[record.subject].add(record.split)
            first_source.setdefault(record.subject, record.source)
    for subject, splits in splits_of.items():
        if len(splits) > 1:
            raise UserError(
                f"{first_source[subject]}: subject {subject!r} appears in several splits "
                f"({', '.join(sorted(splits))}); all scans of a subject must share one split"
            )


# --------------------------------------------------------------------------------------------
# Readers.


def read_csv_datalist(path: str | Path, strict: bool = False, warn: bool = True) -> Datalist:
    """Read a CSV datalist (see the module docstring for the format and the error policy)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"datalist {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read datalist {path}: {error}") from None
    # A file-like reader, not text.splitlines(): that also splits at U+2028, U+0085 and other
    # separators a quoted field (a file name) may hold; csv handles line ends itself.
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if not columns:
        raise UserError(
            f"{path}: the CSV is empty (expected a header row image,label[,mask][,split])"
        )
    if len(set(columns)) != len(columns):
        raise UserError(f"{path}: duplicate column names in the header {columns}")
    for required in ("image", "label"):
        if required not in columns:
            raise UserError(
                f"{path}: missing column '{required}' (header is {','.join(columns)}; expected "
                "image,label[,mask][,split][,subject])"
            )
    reader.fieldnames = columns
    base = path.parent
    rows = []
    for raw in reader:
        line_number = reader.line_num
        if None in raw:
            raise UserError(f"{path}:{line_number}: more values than columns")
        if all((v or "").strip() == "" for v in raw.values()):
            continue  # blank line
        where = f"{path}:{line_number}"
        image = (raw.get("image") or "").strip()
        if not image:
            raise UserError(f"{where}: the image path is empty")
        mask = (raw.get("mask") or "").strip()
        subject = (raw.get("subject") or "").strip()
        rows.append(
            {
                "where": where,
                "image": _resolve(base, image),
                "label": _parse_label(raw.get("label"), where),
                "mask": _resolve(base, mask) if mask else None,
                "split": _parse_split(raw.get("split"), where),
                "subject": subject or None,
            }
        )
    return _finish(path, rows, strict, warn)


def read_json_datalist(path: str | Path, strict: bool = False, warn: bool = True) -> Datalist:
    """Read a MONAI-style datalist JSON (see the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"datalist {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: invalid JSON (line {error.lineno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read datalist {path}: {error}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object with 'training'/'validation'/'test' lists")
    sections = [key for key in data if str(key).lower() in _SPLIT_NAMES]
    if not sections:
        raise UserError(
            f"{path}: no 'training', 'validation' or 'test' list found (keys: {list(data)})"
        )
    base = path.parent
    rows = []
    for section in sections:
        entries = data[section]
        split = _SPLIT_NAMES[section.lower()]
        if not isinstance(entries, list):
            raise UserError(f"{path}: '{section}' must be a list of entries")
        for i, entry in enumerate(entries):
            where = f"{path}:{section}[{i}]"
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict):
                raise UserError(f"{where}: each entry must be an object with 'image' and 'label'")
            image = entry.get("image")
            if not isinstance(image, str) or not image.strip():
                raise UserError(f"{where}: 'image' must be a non-empty path")
            mask = entry.get("mask")
            label_value = entry.get("label")
            if _looks_like_image_path(label_value):
                if mask is not None:
                    raise UserError(f"{where}: 'label' is a path and a 'mask' is given too")
                mask, label_value = label_value, None
            if "label" not in entry and mask is None:
                raise UserError(f"{where}: missing 'label'")
            if mask is not None and not (isinstance(mask, str) and mask.strip()):
                raise UserError(f"{where}: 'mask' must be a path")
            own_split = _parse_split(entry.get("split"), where)
            if own_split is not None and own_split != split:
                raise UserError(f"{where}: split {own_split!r} contradicts section '{section}'")
            subject = entry.get("subject")
            rows.append(
                {
                    "where": where,
                    "image": _resolve(base, image),
                    "label": _parse_label(label_value, where),
                    "mask": _resolve(base, mask) if mask else None,
                    "split": split,
                    "subject": str(subject) if subject is not None else None,
                }
            )
    return _finish(path, rows, strict, warn)


def read_datalist(
    path: str | Path,
    strict: bool = False,
    warn: bool = True,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
) -> Datalist:
    """Read a `.csv` or `.json` datalist and give every record a split.

    Rows that already name a split keep it; the others are assigned by `assign_splits`
    (patient-level when a subject is known, stratified by label, deterministic per `seed`).

    Args:
        path: str or Path. A `.csv` or `.json` file.
        strict: bool. Raise instead of skipping rows with missing files. Defaults to `False`.
        warn: bool. Emit a warning when rows are skipped. Defaults to `True`.
        fractions: three floats. Train/val/test shares for unassigned rows.
        seed: int. Seed of the assignment. Defaults to `0`.

    Returns:
        A `Datalist`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        datalist = read_json_datalist(path, strict=strict, warn=warn)
    elif suffix == ".csv":
        datalist = read_csv_datalist(path, strict=strict, warn=warn)
    else:
        raise UserError(f"{path}: datalist must be a .csv or .json file")
    datalist.records = assign_splits(datalist.records, fractions=fractions, seed=seed)
    return datalist


def assign_splits(
    records: list[Record], fractions=(0.7, 0.15, 0.15), seed: int = 0
) -> list[Record]:
    """Give records without a split one, keeping every subject inside a single split.

    Scans of a subject with an explicit split (on any of its rows) all take that split. The
    remaining groups (a subject's scans, or a single scan without a subject) are shuffled with
    `seed` and dealt, positives and negatives separately (a group counts as positive if any scan
    is), each to the split furthest below its target share of scans.

    Args:
        records: list of `Record`.
        fractions: three non-negative floats for train, val, test (normalised to sum 1).
        seed: int. Defaults to `0`.

    Returns:
        A new list of `Record`s, in the input order, all with a split.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers. Received: {fractions}")
    fractions = fractions / fractions.sum()
    subject_split = {}
    for r in records:
        if r.subject is not None and r.split is not None:
            subject_split[r.subject] = r.split
    groups: dict[object, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.split is None and r.subject not in subject_split:
            key = ("subject", r.subject) if r.subject is not None else ("row", i)
            groups[key].append(i)
    decided = {}
    rng = np.random.default_rng(seed)
    keys = sorted(groups, key=lambda k: (k[0], str(k[1])))
    for positive in (True, False):
        members = [k for k in keys if any(records[i].label for i in groups[k]) == positive]
        order = rng.permutation(len(members))
        counts = np.zeros(3)
        for j in order:
            key = members[j]
            size = len(groups[key])
            total = counts.sum() + size
            deficit = fractions * total - counts
            choice = int(np.argmax(deficit))
            counts[choice] += size
            for i in groups[key]:
                decided[i] = SPLITS[choice]
    out = []
    for i, r in enumerate(records):
        if r.split is not None:
            out.append(r)
        elif r.subject is not None and r.subject in subject_split:
            out.append(dataclasses.replace(r, split=subject_split[r.subject]))
        else:
            out.append(dataclasses.replace(r, split=decided[i]))
    return out
