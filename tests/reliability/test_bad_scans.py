"""Every odd or broken scan through `predict` and a training datalist, in child processes.

The documented outcome for each file (`scan_cases.py`): a valid result, or exactly one
`error: <file>: <reason>` line on stderr, exit code 2 for the command, no traceback, the other
files of the same command still processed, and the child's peak memory under 2 GB. In training,
bad datalist entries are skipped, counted (`metrics.json`) and reported, and training goes on.
All files go through one `predict` and one `train` command (each start-up costs ~10 s).
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.medimg.__main__ import main
from tests.pipelines.medimg.scans import phantom, ras_affine, write
from tests.pipelines.medimg.test_predict import intensity_model
from tests.reliability.measured_run import child_env, run_measured
from tests.reliability.scan_cases import ANY, scan_cases, shipped_4d_cases

PEAK_RSS_LIMIT = 2 * 2**30


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return scan_cases(tmp_path_factory.mktemp("scans"))


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny model with a known heatmap (test_predict.py), built once for the module."""
    return intensity_model(tmp_path_factory.mktemp("model") / "model.keras")


def _error_lines_for(case, lines):
    return [line for line in lines if line.startswith(f"error: {case.path}: ")]


def _nibabel_image(path: Path):
    """The file as nibabel reads it, whatever its name says (gzip or not, NIfTI-1 or 2)."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    nifti2 = 540 in (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big"))
    return (nib.Nifti2Image if nifti2 else nib.Nifti1Image).from_bytes(raw)


def _check_heatmap(case, document):
    heatmap = nib.load(document["heatmap_nifti"])
    scan = _nibabel_image(case.path)
    # A 2D file is read as a volume of one slice; the heatmap has that explicit third axis.
    assert np.prod(heatmap.shape) == np.prod(scan.shape[:3]), case.name
    assert heatmap.shape[: len(scan.shape)] == scan.shape[:3], case.name
    np.testing.assert_allclose(heatmap.affine, scan.affine, atol=1e-4, err_msg=case.name)
    values = np.asarray(heatmap.dataobj)
    assert np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0


def test_predict_gives_each_scan_a_result_or_one_error_line(cases, model_path, tmp_path):
    assert sum(case.shipped for case in cases) >= 8  # nibabel's data folder was found
    out = tmp_path / "out"
    finished = run_measured(
        "pipelines.medimg",
        ["predict", *[case.path for case in cases], "--model", model_path, "--out", out,
         "--json"],
        child_env(tmp_path / "home"),
    )  # fmt: skip

    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert finished.returncode == 2, finished.stderr[-3000:]
    assert finished.peak_rss < PEAK_RSS_LIMIT, f"peak RSS {finished.peak_rss / 2**30:.2f} GB"
    results = [json.loads(line) for line in finished.stdout.splitlines() if line.strip()]
    by_path = {result["path"]: result for result in results}
    errors = finished.error_lines
    accounted = 0
    for case in cases:
        mine = _error_lines_for(case, errors)
        accounted += len(mine)
        if case.expected is None or (case.expected == ANY and not mine):
            assert not mine, f"{case.name}: {mine}"
            assert str(case.path) in by_path, f"{case.name}: no result"
            document = by_path[str(case.path)]
            assert 0.0 <= document["probability"] <= 1.0
            _check_heatmap(case, document)
        else:
            assert len(mine) == 1, f"{case.name}: expected one error line, got {mine}"
            assert str(case.path) not in by_path
            if case.expected != ANY:
                assert case.expected in mine[0], f"{case.name}: {mine[0]}"
    assert accounted == len(errors), "an error line names no file of the command"
    assert len(results) == len(by_path) == len(cases) - len(errors)


def test_4d_series_give_a_result_for_the_chosen_volume(model_path, tmp_path, capsys):
    series = shipped_4d_cases()
    assert len(series) >= 2  # nibabel ships functional.nii, example4d.nii.gz, NIfTI-2
    code = main(["predict", *[str(c.path) for c in series], "--volume", "1", "--json",
                 "--model", str(model_path), "--out", str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["path"] for r in results] == [str(c.path) for c in series]
    for case, result in zip(series, results):
        volumes = nib.load(str(case.path)).shape[3]
        assert result["notes"] == [f"used volume 1 of {volumes}"]
        heatmap = nib.load(result["heatmap_nifti"])
        assert heatmap.shape == nib.load(str(case.path)).shape[:3]


def _names(line: str, path: Path) -> bool:
    """Whether `line` names `path` itself (not merely a longer name starting like it)."""
    return re.search(re.escape(str(path)) + r"(:|$)", line) is not None


def _good_scans(folder: Path, count: int) -> list[tuple[Path, int]]:
    """Phantom scans; odd ones carry a bright 'lesion' cube."""
    scans = []
    for i in range(count):
        data = phantom((24, 28, 22), seed=100 + i)
        label = i % 2
        if label:
            data[8:13, 10:15, 8:12] = 1500.0
        scans.append((write(folder / f"good_{i}.nii.gz", data, ras_affine((2.5,) * 3)), label))
    return scans


@pytest.mark.slow
def test_training_skips_counts_and_reports_bad_datalist_entries(cases, tmp_path):
    (tmp_path / "good").mkdir()
    good = _good_scans(tmp_path / "good", 8)
    rows = [(path, label, split) for (path, label), split in
            zip(good, ["train"] * 4 + ["val"] * 2 + ["test"] * 2)]  # fmt: skip
    rows += [(case.path, i % 2, "train") for i, case in enumerate(cases)]
    extra_bad = [c for c in cases if c.name in ("truncated_nii", "random_nii")]
    rows += [(extra_bad[0].path, 1, "val"), (extra_bad[1].path, 0, "test")]
    datalist = tmp_path / "datalist.csv"
    with open(datalist, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "split"])
        writer.writerows((str(path), label, split) for path, label, split in rows)
    run_dir = tmp_path / "run"

    finished = run_measured(
        "pipelines.medimg",
        ["train", "--config", "tiny", "--data", datalist, "--out", run_dir, "--no-progress",
         "preprocess.shape=[16,16,16]", "preprocess.spacing=[5,5,5]", "model.filters=[4,8]",
         "model.gated_stages=[0]", "model.gate_dim=4", "model.pooling_dim=4", "optim.epochs=2",
         "optim.patience=5", "evaluation.bootstrap=20", "evaluation.heatmap_methods=[native]",
         "data.workers=1", "tracking=off"],
        child_env(tmp_path / "home"),
        timeout=900,
    )  # fmt: skip

    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.peak_rss < PEAK_RSS_LIMIT, f"peak RSS {finished.peak_rss / 2**30:.2f} GB"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2  # training went on to the end
    bad = [c for c in cases if c.expected is not None and c.expected != ANY]
    unknown = [c for c in cases if c.expected == ANY]
    skipped = metrics["skipped"]
    assert len(bad) + 2 <= len(skipped) <= len(bad) + 2 + len(unknown)
    warned = [line for line in finished.stderr.splitlines() if line.startswith("warning: ")]
    for case in bad:
        rows_of_case = 1 + sum(c is case for c in extra_bad)
        assert sum(_names(line, case.path) for line in skipped) == rows_of_case, case.name
        assert sum(_names(line, case.path) for line in warned) == rows_of_case, case.name
    valid = [c for c in cases if c.expected is None]
    assert metrics["train_scans"] >= 4 + len(valid)
    assert metrics["val_scans"] == 2 and metrics["test_scans"] == 2
    assert f"skipped {len(skipped)} datalist entries" in finished.stdout  # the final summary
    assert "UserWarning" not in finished.stderr  # one line per entry, not Python's warnings too
