"""The built-in synthetic lesion benchmark and the `make-dataset` / `inspect` commands."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage

from pipelines.medimg import synth
from pipelines.medimg.io import load_scan
from tests.pipelines.medimg.scans import phantom, write

REPO = Path(__file__).resolve().parents[3]


def _cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.medimg", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_template_ships_with_nilearn_and_loads_offline():
    paths = synth.template_paths()
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 100_000
    assert nib.load(str(paths["t1"])).shape == (197, 233, 189)


def test_make_scan_inserts_a_visible_lesion_exactly_where_the_mask_is():
    image, mask, affine, info = synth.make_scan(seed=0, index=1, label=1)
    assert image.shape == mask.shape and mask.dtype == np.uint8
    assert image.dtype in (np.int16, np.float32)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    assert np.all((spacing >= 1.5) & (spacing <= 2.5))
    if info["orientation"] != "oblique":
        assert "".join(nib.aff2axcodes(affine)) == info["orientation"]
    assert mask.sum() == info["lesion_voxels"] > 0
    assert 1 <= info["lesions"] <= 3
    # The lesion differs from the tissue right around it (a ring of 2 voxels).
    inside = mask.astype(bool)
    ring = scipy.ndimage.binary_dilation(inside, iterations=2) & ~inside & (image > 0)
    lesion_mean, ring_mean = image[inside].mean(), image[ring].mean()
    assert abs(lesion_mean - ring_mean) > 0.15 * ring_mean, (lesion_mean, ring_mean)
    # The lesion lies in the brain, not in the background.
    assert np.all(image[inside] > 0)


def test_make_scan_negative_has_an_empty_mask_and_scans_are_deterministic_per_seed():
    image, mask, affine, info = synth.make_scan(seed=0, index=2, label=0)
    assert mask.sum() == 0 and info["lesions"] == 0 and info["contrast"] == ""
    again = synth.make_scan(seed=0, index=2, label=0)
    np.testing.assert_array_equal(again[0], image)
    np.testing.assert_array_equal(again[2], affine)
    other_seed = synth.make_scan(seed=1, index=2, label=0)
    assert other_seed[0].shape != image.shape or not np.array_equal(other_seed[0], image)


def test_plan_has_exactly_half_positives_and_stratified_splits():
    labels, splits = synth._plan(40, seed=3)
    assert sum(labels) == 20
    for name, expected in (("train", 28), ("val", 6), ("test", 6)):
        members = [label for label, split in zip(labels, splits) if split == name]
        assert len(members) == expected and sum(members) == expected // 2
    assert synth._plan(40, seed=3) == (labels, splits)
    assert synth._plan(40, seed=4)[0] != labels


@pytest.mark.slow
def test_make_dataset_cli_builds_a_complete_deterministic_dataset(tmp_path):
    out = tmp_path / "built"
    result = _cli("make-dataset", "--out", out, "--scans", 16, "--seed", 5, "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{out / 'datalist.csv'}\t16 scans built in")
    assert "Traceback" not in result.stderr

    with open(out / "datalist.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["image", "label", "mask", "split"]
        rows = list(reader)
    assert len(rows) == 16
    assert sum(int(r["label"]) for r in rows) == 8
    splits = {name: [r for r in rows if r["split"] == name] for name in ("train", "val", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 12, "val": 2, "test": 2}
    for members in splits.values():
        assert {r["label"] for r in members} == {"0", "1"}

    orientations = set()
    for row in rows:
        scan = load_scan(out / row["image"])
        mask = nib.load(str(out / row["mask"]))
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
        assert (np.asarray(mask.dataobj).sum() > 0) == (row["label"] == "1"), row
        assert all(1.5 <= s <= 2.5 for s in scan.spacing)
        orientations.add(scan.orientation)
    assert len(orientations) >= 3

    meta = list(csv.DictReader(open(out / "metadata.csv", newline="")))
    assert [m["image"] for m in meta] == [r["image"] for r in rows]
    assert all((int(m["lesions"]) > 0) == (m["label"] == "1") for m in meta)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["scans"] == 16 and manifest["seed"] == 5 and manifest["positives"] == 8

    # A second build with the same seed (in-process, one worker) gives identical files.
    again = synth.make_dataset(tmp_path / "again", scans=16, seed=5, workers=1, progress=False)
    for name in ("datalist.csv", "metadata.csv"):
        assert (again.parent / name).read_bytes() == (out / name).read_bytes()
    for row in rows:
        for key in ("image", "mask"):
            assert (again.parent / row[key]).read_bytes() == (out / row[key]).read_bytes(), row

    # Running the command again reuses the finished folder.
    rerun = _cli("make-dataset", "--out", out, "--scans", 16, "--seed", 5, "--no-progress")
    assert rerun.returncode == 0 and "16 scans reused" in rerun.stdout


def test_make_dataset_cli_rejects_bad_arguments_with_one_line():
    result = _cli("make-dataset", "--out", "/tmp/unused-never-created", "--scans", 1)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --scans must be at least 2, got 1"]


def test_inspect_cli_reports_good_files_and_one_error_line_per_bad_file(tmp_path):
    good = write(tmp_path / "good.nii.gz", phantom((8, 9, 10)))
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    result = _cli("inspect", empty, good, junk, "--json")
    assert result.returncode == 2
    info = json.loads(result.stdout)
    assert info["path"] == str(good) and info["shape"] == [8, 9, 10]
    assert info["orientation"] == "RAS" and info["spacing"] == [2.0, 2.0, 2.0]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "Traceback" not in result.stderr
    assert errors[0] == f"error: {empty}: file is empty (0 bytes)"
    assert errors[1].startswith(f"error: {junk}: is a corrupt or truncated gzip file")
