"""predict: heatmaps in scanner space, orientation invariance, bad files, model lookup."""

from __future__ import annotations

import gzip
import json
import os
import time

import keras
import nibabel as nib
import numpy as np
import pytest

from pipelines.medimg.__main__ import main
from pipelines.medimg.model import ScanPreprocessing, preprocess_to_dict
from pipelines.medimg.predict import find_latest_model, load_model, predict
from pipelines.medimg.preprocess import PreprocessConfig
from tests.pipelines.medimg.scans import phantom, ras_affine, reorient, write
from toolkit.errors import UserError
from toolkit.layers import GatedAttentionPooling

GRID = (24, 24, 24)
PREPROCESS = PreprocessConfig(spacing=(4.0, 4.0, 4.0), shape=GRID)
CUBE = (slice(8, 18), slice(28, 38), slice(20, 30))  # 20 mm cube, off-centre on every axis


def intensity_model(path):
    """A model whose native map is known: attention pooling weights grow with intensity.

    Average pooling (2 voxels) gives one feature per 8 mm cell; `GatedAttentionPooling` with
    `V = 0.25`, `w = 20`, no gate and no biases gives the logit `20 tanh(x / 4)` per cell, so
    the softmax weights, the model's native heatmap, peak at the brightest cell.
    """
    inputs = keras.Input((*GRID, 1), name="scan")
    x = ScanPreprocessing(
        preprocess_to_dict(PREPROCESS),
        {"architecture": "intensity-test", "class_names": ["normal", "lesion"], "threshold": 0.5},
        name="scan_preprocessing",
    )(inputs)
    features = keras.layers.AveragePooling3D(2, name="features")(x)
    pool = GatedAttentionPooling(1, gated=False, use_bias=False, name="pool_0")
    pooled, _ = pool(features, return_attention_scores=True)
    logit = keras.layers.Dense(1, name="logit")(pooled)
    probability = keras.layers.Activation("sigmoid", name="probability")(logit)
    model = keras.Model(inputs, probability)
    pool._attention_v.kernel.assign(np.full((1, 1), 0.25, np.float32))
    pool._attention_w.kernel.assign(np.full((1, 1), 20.0, np.float32))
    model.get_layer("logit").set_weights([np.ones((1, 1), np.float32), np.zeros(1, np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return intensity_model(tmp_path_factory.mktemp("model") / "model.keras")


def cube_scan():
    data = phantom((40, 48, 36), seed=3)
    data[CUBE] = 2000.0
    return data


def read(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj, np.float32), image.affine


def test_planted_cube_peaks_inside_the_cube_in_scanner_space(tmp_path, model_path):
    affine = ras_affine(spacing=(1.8, 2.0, 2.2), origin=(-35.0, -48.0, -40.0))
    data, lps_affine = reorient(cube_scan(), affine, "LPS")
    truth = np.zeros_like(cube_scan(), bool)
    truth[CUBE] = True
    truth, _ = reorient(truth.astype(np.uint8), affine, "LPS")
    scan = write(tmp_path / "cube_lps.nii.gz", data, lps_affine)

    results, failures = predict([scan], model_path=model_path, out=tmp_path / "out")

    assert failures == []
    result = results[0]
    heatmap, heatmap_affine = read(tmp_path / "out" / "cube_lps_heatmap.nii.gz")
    assert heatmap.shape == data.shape
    np.testing.assert_allclose(heatmap_affine, lps_affine, atol=1e-5)
    assert heatmap.min() >= 0.0 and heatmap.max() == pytest.approx(1.0)
    peak = tuple(result["heatmap_peak_voxel"])
    assert heatmap[peak] == heatmap.max()
    assert truth[peak], f"peak {peak} is outside the cube"
    world = lps_affine[:3, :3] @ np.asarray(peak, float) + lps_affine[:3, 3]
    np.testing.assert_allclose(result["heatmap_peak_world_mm"], world, atol=1e-3)
    # The heatmap is concentrated on the cube, not merely peaking there by chance.
    assert heatmap[truth.astype(bool)].mean() > 5 * heatmap[~truth.astype(bool)].mean()


def test_lps_and_ras_copies_give_the_same_prediction_and_their_own_affines(tmp_path, model_path):
    ras_data, ras_affine_ = cube_scan(), ras_affine(origin=(-38.0, -47.0, -35.0))
    lps_data, lps_affine = reorient(ras_data, ras_affine_, "LPS")
    ras_path = write(tmp_path / "ras.nii.gz", ras_data, ras_affine_)
    lps_path = write(tmp_path / "lps.nii", lps_data, lps_affine)

    results, failures = predict([ras_path, lps_path], model_path=model_path, out=tmp_path)

    assert failures == []
    ras, lps = results
    assert ras["probability"] == pytest.approx(lps["probability"], abs=1e-5)
    ras_heat, ras_heat_affine = read(tmp_path / "ras_heatmap.nii.gz")
    lps_heat, lps_heat_affine = read(tmp_path / "lps_heatmap.nii.gz")
    np.testing.assert_allclose(ras_heat_affine, ras_affine_, atol=1e-5)
    np.testing.assert_allclose(lps_heat_affine, lps_affine, atol=1e-5)
    assert lps_heat.shape == lps_data.shape
    # The same map in world space: the LPS heatmap brought back to RAS order equals the RAS one.
    back, _ = reorient(lps_heat, lps_affine, "RAS")
    np.testing.assert_allclose(back, ras_heat, atol=1e-4)
    # On a plateau of equal maxima the two copies may pick neighbouring voxels, never farther.
    distance = np.abs(np.subtract(ras["heatmap_peak_world_mm"], lps["heatmap_peak_world_mm"]))
    assert np.all(distance <= 2.0 + 1e-3)


def test_outputs_files_json_and_tsv_line(tmp_path, model_path, capsys):
    scan = write(tmp_path / "subject.nii.gz", cube_scan())
    code = main(["predict", str(scan), "--model", str(model_path), "--out", str(tmp_path / "o")])
    assert code == 0
    line = capsys.readouterr().out.strip()
    path, label, probability = line.split("\t")
    assert path == str(scan) and label in ("normal", "lesion") and 0 <= float(probability) <= 1
    document = json.loads((tmp_path / "o" / "subject.json").read_text())
    assert document["probability"] == pytest.approx(float(probability), abs=1e-4)
    assert document["label"] == int(document["probability"] >= 0.5)
    assert document["model"] == str(model_path.resolve())
    assert set(document["timings_s"]) == {"load", "preprocess", "model", "heatmap", "writing"}
    png = (tmp_path / "o" / "subject_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    code = main(["predict", str(scan), "--model", str(model_path), "--out", str(tmp_path / "j"),
                 "--json"])  # fmt: skip
    assert code == 0
    assert (
        json.loads(capsys.readouterr().out)["heatmap_peak_voxel"] == document["heatmap_peak_voxel"]
    )


def _nifti_bytes(shape, dtype=np.int16):
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header["dim"][0] = len(shape)
    header["dim"][1 : len(shape) + 1] = shape
    header["vox_offset"] = header.single_vox_offset
    block = header.binaryblock
    return block + b"\0" * (int(header.single_vox_offset) - len(block)) + b"\0" * 64


def test_bad_files_give_one_line_each_and_the_others_are_processed(tmp_path, model_path, capsys):
    good = write(tmp_path / "good.nii.gz", cube_scan())
    raw = write(tmp_path / "plain.nii", cube_scan()).read_bytes()
    bad = {
        "text.nii": b"this is not an image\n" * 30,
        "empty.nii.gz": b"",
        "truncated.nii": raw[: len(raw) // 2],
        "truncated_gz.nii.gz": gzip.compress(raw)[:3000],
        "zero_axis.nii": _nifti_bytes((10, 0, 10)),
        "huge.nii.gz": gzip.compress(_nifti_bytes((30000, 30000, 30000))),
    }
    paths = []
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        paths.append(str(tmp_path / name))
    arguments = ["predict", paths[0], str(good), *paths[1:], "--model", str(model_path)]

    code = main([*arguments, "--out", str(tmp_path / "out")])

    captured = capsys.readouterr()
    assert code == 2
    errors = captured.err.strip().splitlines()
    assert len(errors) == len(bad)
    for name, line in zip(bad, errors):
        assert line.startswith("error: ") and name in line
    assert "Traceback" not in captured.err
    assert captured.out.strip().split("\t")[0] == str(good)
    assert (tmp_path / "out" / "good_heatmap.nii.gz").is_file()


def test_without_a_model_the_user_is_told_to_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    scan = write(tmp_path / "scan.nii.gz", cube_scan())
    assert main(["predict", str(scan)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train" in err and "runs/medimg" in err


def test_the_newest_model_in_runs_is_used_by_default(tmp_path, model_path):
    older = tmp_path / "runs" / "medimg" / "20260101-000000" / "model.keras"
    newer = tmp_path / "runs" / "medimg" / "20260102-000000" / "model.keras"
    for path, stamp in ((newer, time.time()), (older, time.time() - 100)):
        path.parent.mkdir(parents=True)
        path.write_bytes(model_path.read_bytes())
        os.utime(path, (stamp, stamp))
    assert find_latest_model(tmp_path / "runs" / "medimg") == newer


def test_a_file_that_is_not_a_model_is_a_user_error(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="cannot load the model"):
        load_model(path)
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "missing.keras")
