"""Datalists users bring: CSV and MONAI-style JSON parsing, bad rows, patient-level splits."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest

from pipelines.medimg.datasets import (
    Record,
    assign_splits,
    read_csv_datalist,
    read_datalist,
    read_json_datalist,
)
from tests.pipelines.medimg.scans import write
from toolkit.errors import UserError


def _touch(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_csv_paths_are_relative_to_the_csv_and_labels_and_splits_are_parsed(tmp_path):
    _touch(tmp_path, "data/a.nii.gz", "data/b.nii", "data/c.nii.gz", "data/m/a_mask.nii.gz")
    csv_path = tmp_path / "data" / "list.csv"
    csv_path.write_text(
        "Image,Label,Mask,Split\n"
        "a.nii.gz,1,m/a_mask.nii.gz,training\n"
        "b.nii, false ,,Validation\n"
        "\n"
        f"{tmp_path / 'data' / 'c.nii.gz'},1.0,,test\n"
    )
    datalist = read_csv_datalist(csv_path)
    records = datalist.records
    assert [r.image for r in records] == [
        tmp_path / "data" / "a.nii.gz",
        tmp_path / "data" / "b.nii",
        tmp_path / "data" / "c.nii.gz",
    ]
    assert [r.label for r in records] == [1, 0, 1]
    assert records[0].mask == tmp_path / "data" / "m" / "a_mask.nii.gz"
    assert records[1].mask is None
    assert [r.split for r in records] == ["train", "val", "test"]
    assert records[2].source == f"{csv_path}:5"
    assert datalist.skipped == []
    assert datalist.counts() == {
        "train": {"scans": 1, "positives": 1},
        "val": {"scans": 1, "positives": 0},
        "test": {"scans": 1, "positives": 1},
    }


@pytest.mark.parametrize(
    "text, match",
    [
        ("image,split\na.nii,train\n", "missing column 'label'"),
        ("label\n1\n", "missing column 'image'"),
        ("", "the CSV is empty"),
        ("image,label\na.nii,2\n", r"list.csv:2: label must be 0 or 1"),
        ("image,label\na.nii,maybe\n", r"list.csv:2: label must be 0 or 1"),
        ("image,label,split\na.nii,1,holdout\n", r"list.csv:2: split must be train, val or test"),
        ("image,label\n,1\n", r"list.csv:2: the image path is empty"),
        ("image,label\na.nii,1,extra\n", r"list.csv:2: more values than columns"),
        ("image,label\na.nii,\n", r"list.csv:2: label is empty and there is no mask"),
        ("image,label,image\na.nii,1,b.nii\n", "duplicate column"),
    ],
)
def test_malformed_csv_rows_are_errors_naming_file_and_line(tmp_path, text, match):
    _touch(tmp_path, "a.nii", "b.nii")
    path = tmp_path / "list.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        read_csv_datalist(path)


def test_rows_with_missing_files_are_skipped_with_a_warning_or_refused_when_strict(tmp_path):
    _touch(tmp_path, "a.nii", "b.nii")
    path = tmp_path / "list.csv"
    path.write_text("image,label,mask\na.nii,1,\nlost.nii,0,\nb.nii,1,lost_mask.nii\n")
    with pytest.warns(UserWarning, match="skipped 2 of 3 entries"):
        datalist = read_csv_datalist(path)
    assert [r.image.name for r in datalist.records] == ["a.nii"]
    assert len(datalist.skipped) == 2
    assert "list.csv:3" in datalist.skipped[0] and "lost.nii" in datalist.skipped[0]
    assert "mask" in datalist.skipped[1]
    with pytest.raises(UserError, match=r"list.csv:3: file not found: image .*lost.nii"):
        read_csv_datalist(path, strict=True)
    path.write_text("image,label\nlost.nii,0\n")
    with pytest.raises(UserError, match="no usable scans"):
        read_csv_datalist(path, warn=False)
    with pytest.raises(UserError, match="does not exist"):
        read_csv_datalist(tmp_path / "nope.csv")


def _subjects_csv(tmp_path, n_subjects=40, seed=0, with_split=False):
    rng = np.random.default_rng(seed)
    lines = ["image,label,subject" + (",split" if with_split else "")]
    for s in range(n_subjects):
        label = int(rng.integers(2))
        for k in range(int(rng.integers(1, 5))):
            name = f"sub{s:02d}_scan{k}.nii.gz"
            _touch(tmp_path, name)
            lines.append(f"{name},{label},patient-{s:02d}" + ("," if with_split else ""))
    path = tmp_path / "list.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_subject_column_gives_patient_level_splits(tmp_path):
    path = _subjects_csv(tmp_path)
    datalist = read_datalist(path, seed=3)
    splits_of = defaultdict(set)
    for record in datalist.records:
        splits_of[record.subject].add(record.split)
    assert all(len(s) == 1 for s in splits_of.values())
    counts = Counter(r.split for r in datalist.records)
    total = sum(counts.values())
    assert set(counts) == {"train", "val", "test"}
    assert 0.55 < counts["train"] / total < 0.85
    assert 0.05 < counts["val"] / total < 0.3 and 0.05 < counts["test"] / total < 0.3
    # Both classes in every split (stratified by label).
    for name in ("train", "val", "test"):
        assert {r.label for r in datalist.split(name)} == {0, 1}
    # Deterministic per seed, different for another seed.
    again = read_datalist(path, seed=3)
    assert [r.split for r in again.records] == [r.split for r in datalist.records]
    other = read_datalist(path, seed=4)
    assert [r.split for r in other.records] != [r.split for r in datalist.records]


def test_explicit_split_of_one_scan_carries_its_subject_and_conflicts_are_errors(tmp_path):
    _touch(tmp_path, "a1.nii", "a2.nii", "b1.nii", "b2.nii")
    path = tmp_path / "list.csv"
    path.write_text(
        "image,label,subject,split\na1.nii,1,A,test\na2.nii,0,A,\nb1.nii,1,B,\nb2.nii,0,B,\n"
    )
    records = {r.image.name: r for r in read_datalist(path).records}
    assert records["a2.nii"].split == "test"
    assert records["b1.nii"].split == records["b2.nii"].split
    path.write_text("image,label,subject,split\na1.nii,1,A,test\na2.nii,0,A,train\n")
    with pytest.raises(UserError, match="subject 'A' appears in several splits"):
        read_datalist(path)


def test_assign_splits_without_subjects_hits_the_fractions():
    records = [Record(image=f"{i}.nii", label=i % 2) for i in range(200)]
    out = assign_splits(records, fractions=(0.7, 0.15, 0.15), seed=1)
    counts = Counter(r.split for r in out)
    assert counts == {"train": 140, "val": 30, "test": 30}
    assert [r.image for r in out] == [r.image for r in records]
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(records, fractions=(1.0, -0.5, 0.5))


def test_monai_json_datalist(tmp_path):
    _touch(tmp_path, "img/a.nii.gz", "img/b.nii.gz", "img/c.nii.gz", "img/d.nii.gz")
    positive = np.zeros((4, 4, 4), np.uint8)
    positive[1, 2, 3] = 1
    (tmp_path / "seg").mkdir()
    write(tmp_path / "seg" / "c_seg.nii.gz", positive)
    write(tmp_path / "seg" / "d_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "img/a.nii.gz", "label": 1, "subject": 7},
                    {"image": "img/b.nii.gz", "label": [0]},
                ],
                "validation": [{"image": "img/c.nii.gz", "label": "seg/c_seg.nii.gz"}],
                "test": [{"image": "img/d.nii.gz", "label": "seg/d_seg.nii.gz"}],
                "name": "ignored",
            }
        )
    )
    records = read_json_datalist(path).records
    assert [(r.image.name, r.label, r.split) for r in records] == [
        ("a.nii.gz", 1, "train"),
        ("b.nii.gz", 0, "train"),
        ("c.nii.gz", 1, "val"),
        ("d.nii.gz", 0, "test"),
    ]
    assert records[0].subject == "7"
    assert records[2].mask == tmp_path / "seg" / "c_seg.nii.gz"
    assert records[0].source == f"{path}:training[0]"
    assert read_datalist(path).records == records


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "invalid JSON"),
        ("[]", "expected an object"),
        ('{"items": []}', "no 'training', 'validation' or 'test' list"),
        ('{"training": {"image": "a.nii"}}', "'training' must be a list"),
        ('{"training": ["a.nii"]}', r"training\[0\]: missing 'label'"),
        ('{"training": [{"label": 1}]}', r"training\[0\]: 'image' must be a non-empty path"),
        ('{"training": [{"image": "a.nii", "label": 3}]}', "label must be 0 or 1"),
        ('{"test": [{"image": "a.nii", "label": 1, "split": "train"}]}', "contradicts"),
    ],
)
def test_malformed_json_datalists_are_errors(tmp_path, content, match):
    _touch(tmp_path, "a.nii")
    path = tmp_path / "list.json"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        read_json_datalist(path)


def test_unknown_datalist_suffix_is_refused(tmp_path):
    path = tmp_path / "list.xlsx"
    path.write_text("x")
    with pytest.raises(UserError, match="must be a .csv or .json"):
        read_datalist(path)
