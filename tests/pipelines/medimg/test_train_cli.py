"""Training: configuration, augmentation, batches, and the tiny config end to end via the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from pipelines.medimg.__main__ import main
from pipelines.medimg.train import (
    AugmentConfig,
    VolumeBatches,
    Volumes,
    augment_volume,
    class_weights,
    resolve_config,
    resolve_datalist,
)

ROOT = Path(__file__).resolve().parents[3]


def test_print_config_resolves_defaults_yaml_and_overrides(capsys):
    assert main(["train", "--config", "tiny", "--print-config", "optim.epochs=7"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["optim"]["epochs"] == 7
    assert config["preprocess"]["shape"] == [32, 40, 32]  # tiny.yaml
    assert config["preprocess"]["normalization"] == "zscore"  # default.yaml
    assert config["model"]["name"] == "attention-gated"
    assert resolve_config("vit").model.name == "vit"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs=0", "epochs must be positive"),
        ("model.name=resnet", "model.name"),
        ("optim.learning_rat=1", "unknown config key"),
        ("augment.flip_axes=[3]", "flip_axes"),
        ("optim.lr_schedule=cosine", "lr_schedule must be one of"),
        ("optim.final_lr_fraction=0", "final_lr_fraction must be in (0, 1]"),
    ],
)
def test_bad_config_values_are_one_line_errors(capsys, override, message):
    assert main(["train", "--config", "tiny", "--print-config", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_without_data_the_builtin_dataset_is_built_or_reused(monkeypatch, tmp_path):
    calls = []

    def fake_make_dataset(folder, scans, seed, progress):
        calls.append((Path(folder), scans, seed))
        return Path(folder) / "datalist.csv"

    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path))
    monkeypatch.setattr("pipelines.medimg.synth.make_dataset", fake_make_dataset)
    config = resolve_config("tiny", ["data.builtin_seed=3"])
    path = resolve_datalist(config, progress=False)
    assert calls == [(tmp_path / "medimg" / "synthetic-v1-n16-seed3", 16, 3)]
    assert path == tmp_path / "medimg" / "synthetic-v1-n16-seed3" / "datalist.csv"


def test_augmentation_flips_scales_and_rotates():
    volume = np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32)
    config = AugmentConfig(
        flip_axes=[0, 2], flip_probability=1.0, rotation_probability=0.0,
        intensity_scale=0.0, intensity_shift=0.0,
    )  # fmt: skip
    out = augment_volume(volume, np.random.default_rng(1), config)
    np.testing.assert_allclose(out, volume[::-1, :, ::-1])
    config = AugmentConfig(flip_axes=[], intensity_scale=0.2, intensity_shift=0.3,
                           rotation_probability=0.0)  # fmt: skip
    out = augment_volume(volume, np.random.default_rng(2), config)
    scale, shift = np.polyfit(volume.ravel(), out.ravel(), 1)
    assert 0.8 <= scale <= 1.2 and -0.3 <= shift <= 0.3 and abs(scale - 1) + abs(shift) > 0
    config = AugmentConfig(flip_axes=[], rotation_degrees=8.0, rotation_probability=1.0,
                           intensity_scale=0.0, intensity_shift=0.0)  # fmt: skip
    cube = np.zeros((16, 16, 16), np.float32)
    cube[4:12, 4:12, 4:12] = 1.0
    rotated = augment_volume(cube, np.random.default_rng(3), config)
    assert rotated.shape == cube.shape and not np.allclose(rotated, cube)
    assert abs(rotated.sum() - cube.sum()) < 0.05 * cube.sum()  # a small rotation keeps mass


def test_batches_are_deterministic_weighted_and_cover_every_scan():
    images = np.arange(5 * 8, dtype=np.float16).reshape(5, 2, 2, 2)
    labels = np.array([0, 0, 0, 1, 1])
    volumes = Volumes(images, labels, np.zeros_like(images, np.uint8), np.zeros(5, bool), [])
    weights = class_weights(labels)
    assert weights == {0: pytest.approx(5 / 6), 1: pytest.approx(5 / 4)}
    batches = VolumeBatches(volumes, batch_size=2, class_weight=weights, seed=4)
    again = VolumeBatches(volumes, batch_size=2, class_weight=weights, seed=4)
    assert len(batches) == 3
    seen = []
    for i in range(len(batches)):
        x, y, w = batches[i]
        np.testing.assert_array_equal(x, again[i][0])
        assert x.shape[1:] == (2, 2, 2, 1) and x.dtype == np.float32
        for volume, label, weight in zip(x, y, w):
            index = int(volume.ravel()[0]) // 8
            assert label == labels[index] and weight == pytest.approx(weights[labels[index]])
            seen.append(index)
    assert sorted(seen) == [0, 1, 2, 3, 4]
    first = batches.order.copy()
    batches.on_epoch_end()
    assert sorted(batches.order) == [0, 1, 2, 3, 4] and batches.epoch == 1
    assert not np.array_equal(first, batches.order) or len(first) < 3


def _run(arguments, cwd, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.medimg", *arguments],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.both_backends
def test_tiny_config_trains_end_to_end_then_predicts_and_evaluates(tmp_path):
    env = dict(os.environ)
    env.update(
        {
            "ATTENTION_TOOLKIT_HOME": str(tmp_path / "home"),
            "PYTHONPATH": str(ROOT),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "MLFLOW_TRACKING_URI": "",
        }
    )
    data = tmp_path / "data"
    built = _run(["make-dataset", "--out", str(data), "--scans", "16", "--no-progress"],
                 tmp_path, env)  # fmt: skip
    assert built.returncode == 0, built.stderr
    # Two bad rows: a file that is not NIfTI and a missing file. Both are skipped and counted.
    (data / "images" / "broken.nii.gz").write_bytes(b"not a scan")
    with open(data / "datalist.csv", "a", newline="") as f:
        csv.writer(f).writerows(
            [["images/broken.nii.gz", 1, "", "train"], ["images/missing.nii.gz", 0, "", "train"]]
        )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "runs" / "medimg" / "tiny"
    trained = _run(
        ["train", "--config", "tiny", "--data", str(data / "datalist.csv"), "--out",
         str(run_dir), "--no-progress", "--tracking-uri", uri, "optim.epochs=2",
         "evaluation.heatmap_methods=[native]"],
        tmp_path, env,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Traceback" not in trained.stderr
    for name in ("model.keras", "config.yaml", "metrics.json", "roc.png", "confusion.png"):
        assert (run_dir / name).is_file(), name
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optim"]["epochs"] == 2 and config["preprocess"]["shape"] == [32, 40, 32]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and metrics["train_scans"] == 12
    assert len(metrics["skipped"]) == 2
    assert any("broken.nii.gz" in line for line in metrics["skipped"])
    assert any("missing.nii.gz" in line for line in metrics["skipped"])
    assert "skipped 2 datalist entries" in trained.stdout + trained.stderr
    test = metrics["test"]
    for key in ("auc", "accuracy", "sensitivity", "specificity", "pointing_game",
                "relevance_mass"):  # fmt: skip
        assert key in test
    assert set(test["heatmaps"]) == {"native"}  # Grad-CAM: test_heatmaps.py

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "attention-gated"
    for key in ("loss", "val_auc", "val_pointing_game", "learning_rate"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [0, 1], key
    rates = [m.value for m in client.get_metric_history(run_id, "learning_rate")]
    start = float(run.data.params["optim.learning_rate"])
    assert rates[0] == pytest.approx(start) and rates[1] < rates[0]  # the linear decay
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"images", "plots"} <= artifacts
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {
        "plots/roc.png", "plots/confusion.png"
    }  # fmt: skip
    assert client.get_registered_model("medimg").latest_versions

    scan = data / "images" / "scan_0000.nii.gz"
    predicted = _run(["predict", str(scan), "--out", str(tmp_path / "pred")], tmp_path, env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    path, label, probability = predicted.stdout.strip().split("\t")
    assert path == str(scan) and label in ("normal", "lesion") and 0 <= float(probability) <= 1
    source = nib.load(str(scan))
    heatmap = nib.load(str(tmp_path / "pred" / "scan_0000_heatmap.nii.gz"))
    assert heatmap.shape == source.shape
    np.testing.assert_allclose(heatmap.affine, source.affine, atol=1e-5)
    values = np.asarray(heatmap.dataobj)
    assert values.min() >= 0 and values.max() == pytest.approx(1.0)
    document = json.loads((tmp_path / "pred" / "scan_0000.json").read_text())
    assert Path(document["model"]).resolve() == (run_dir / "model.keras").resolve()

    evaluated = _run(
        ["evaluate", "--model", str(run_dir / "model.keras"), "--data",
         str(data / "datalist.csv"), "--json", "--methods", "native"],
        tmp_path, env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    summary = json.loads(evaluated.stdout)
    assert summary["scans"] == 2 and summary["split"] == "test"
    assert summary["auc"] == pytest.approx(test["auc"])
    for key in ("accuracy", "sensitivity", "specificity", "pointing_game", "relevance_mass"):
        assert key in summary
    assert (run_dir / "evaluation" / "roc.png").is_file()
    assert (run_dir / "evaluation" / "confusion.png").is_file()
