"""Bad and untrusted `.keras` files through `predict`, `evaluate` and `transcribe`.

Each bad model file must give exactly one `error: <file>: ...` line with its own reason and exit
code 2, never a traceback; Keras itself reports a missing file, a non-zip and a truncated zip all
as "File not found". Models load with `safe_mode=True` always: a Lambda layer or a class this
program does not know is refused before Keras runs anything. Every case of one pipeline goes
through its real `main()` in one child process (`cli_batch.py`), so start-up is paid once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import h5py
import keras
import numpy as np
import pytest
import soundfile

from pipelines.common.model_files import load_model_file, read_model_config
from tests.pipelines.asr.test_model import tiny_model as tiny_recognizer
from tests.pipelines.medimg.scans import phantom, write
from tests.pipelines.medimg.test_predict import intensity_model
from tests.reliability.measured_run import ROOT, child_env
from toolkit.errors import UserError


class Doubler(keras.layers.Layer):
    """A custom layer standing in for third-party code the pipelines do not know."""

    def call(self, x):
        return x * 2.0


def _dense_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))


def _bad_files(folder):
    """`{name: (path, reason)}` for every kind of bad model file, shared by both pipelines."""
    folder.mkdir(parents=True, exist_ok=True)
    valid = folder / "valid_dense.keras"
    _dense_model().save(valid)
    raw = valid.read_bytes()
    files = {}

    def add(name, path, reason):
        files[name] = (path, reason)

    add("missing", folder / "missing.keras", "does not exist")
    (folder / "folder.keras").mkdir()
    add("folder", folder / "folder.keras", "is a folder")
    (folder / "empty.keras").write_bytes(b"")
    add("empty", folder / "empty.keras", "empty (0 bytes)")
    (folder / "text.keras").write_text("model: resnet50\nweights: best\n")
    add("text", folder / "text.keras", "not a zip")
    (folder / "truncated.keras").write_bytes(raw[: len(raw) * 2 // 3])
    add("truncated", folder / "truncated.keras", "truncated")
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2] ^= 0xFF
    (folder / "corrupt.keras").write_bytes(bytes(corrupt))
    add("corrupt_member", folder / "corrupt.keras", "CRC")
    with h5py.File(folder / "legacy.keras", "w") as f:
        f.attrs["keras_version"] = "2.15.0"
        f.create_dataset("weights", data=np.zeros(4))
    add("hdf5", folder / "legacy.keras", "HDF5")
    with zipfile.ZipFile(folder / "no_config.keras", "w") as archive:
        archive.writestr("README.txt", "not a model")
    add("zip_without_config", folder / "no_config.keras", "no config.json")
    with zipfile.ZipFile(folder / "bad_json.keras", "w") as archive:
        archive.writestr("config.json", "{'class_name': Functional")
    add("bad_json", folder / "bad_json.keras", "not valid JSON")
    inputs = keras.Input((3,))
    doubled = keras.layers.Lambda(lambda x: x * 2.0, name="double")(inputs)
    keras.Model(inputs, keras.layers.Dense(2)(doubled)).save(folder / "lambda.keras")
    add("lambda", folder / "lambda.keras", "Lambda layer")
    registered = keras.saving.register_keras_serializable(package="thirdparty")(Doubler)
    inputs = keras.Input((3,))
    keras.Model(inputs, registered(name="doubler")(inputs)).save(folder / "unknown.keras")
    keras.saving.get_custom_objects().pop("thirdparty>Doubler")  # unknown again from here on
    add("unknown_class", folder / "unknown.keras", "thirdparty>Doubler")
    (folder / "model.zip").write_bytes(raw)
    add("wrong_suffix", folder / "model.zip", "must end in .keras")
    return files


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    files = _bad_files(folder)
    medimg = intensity_model(folder / "medimg.keras")
    asr = folder / "asr.keras"
    tiny_recognizer().save(asr)
    scan = write(folder / "scan.nii.gz", phantom((30, 34, 28)))
    audio = folder / "tone.wav"
    t = np.arange(16000) / 16000.0
    soundfile.write(audio, (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32), 16000)
    return {"bad": files, "medimg": medimg, "asr": asr, "scan": scan, "audio": audio}


def _run_batch(module, calls, tmp_path):
    calls_path = tmp_path / f"{module}.calls.json"
    calls_path.write_text(json.dumps([[str(a) for a in call] for call in calls]))
    result = subprocess.run(
        [sys.executable, "-m", "tests.reliability.cli_batch", module, str(calls_path)],
        cwd=ROOT,
        env=child_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(outcomes) == len(calls)
    return outcomes


def _assert_one_error_line(name, path, reason, outcome):
    assert "Traceback" not in outcome["stderr"], f"{name}: {outcome['stderr'][-2000:]}"
    errors = [line for line in outcome["stderr"].splitlines() if line.startswith("error: ")]
    assert outcome["code"] == 2, f"{name}: exit {outcome['code']}, {outcome['stderr'][-500:]}"
    assert len(errors) == 1, f"{name}: {errors}"
    assert str(path) in errors[0] and reason in errors[0], f"{name}: {errors[0]}"
    return errors[0]


def test_predict_and_evaluate_give_one_line_per_bad_model_file(model_files, tmp_path):
    bad = dict(model_files["bad"])
    bad["other_pipeline"] = (model_files["asr"], "saved by pipelines.asr")
    bad["plain_keras_model"] = (bad["wrong_suffix"][0].with_name("valid_dense.keras"),
                                "not a model of this pipeline")  # fmt: skip
    scan = model_files["scan"]
    datalist = tmp_path / "datalist.csv"
    datalist.write_text(f"image,label\n{scan},1\n{scan},0\n")
    calls = [["predict", scan, "--model", path, "--out", tmp_path / "out"] for path, _ in
             bad.values()]  # fmt: skip
    evaluated = ("lambda", "truncated", "unknown_class")
    calls += [["evaluate", "--model", bad[name][0], "--data", datalist] for name in evaluated]
    calls.append(["predict", scan, "--model", model_files["medimg"], "--out", tmp_path / "ok"])

    outcomes = _run_batch("pipelines.medimg", calls, tmp_path)

    messages = {}
    for (name, (path, reason)), outcome in zip(bad.items(), outcomes):
        messages[name] = _assert_one_error_line(name, path, reason, outcome)
    for name, outcome in zip(evaluated, outcomes[len(bad) :]):
        assert _assert_one_error_line(name, *bad[name], outcome) == messages[name]
    # Every kind of bad file has its own message (beyond the file name).
    reasons = [m.split(": ", 2)[-1] for m in messages.values()]
    assert len(set(reasons)) == len(reasons)
    valid = outcomes[-1]
    assert valid["code"] == 0, valid["stderr"][-2000:]
    assert valid["stdout"].startswith(f"{scan}\t")


def test_transcribe_gives_one_line_per_bad_model_file(model_files, tmp_path):
    bad = dict(model_files["bad"])
    # transcribe takes a run folder too, and looks for the model.keras inside.
    bad["folder"] = (bad["folder"][0] / "model.keras", "does not exist")
    bad["other_pipeline"] = (model_files["medimg"], "saved by pipelines.medimg")
    bad["plain_keras_model"] = (bad["wrong_suffix"][0].with_name("valid_dense.keras"),
                                "not a speech recognizer")  # fmt: skip
    audio = model_files["audio"]
    calls = [["transcribe", audio, "--model", path] for path, _ in bad.values()]
    calls.append(["transcribe", audio, "--model", model_files["asr"], "--beam", "1"])

    outcomes = _run_batch("pipelines.asr", calls, tmp_path)

    for (name, (path, reason)), outcome in zip(bad.items(), outcomes):
        _assert_one_error_line(name, path, reason, outcome)
    valid = outcomes[-1]
    assert valid["code"] == 0, valid["stderr"][-2000:]
    assert valid["stdout"].startswith(f"{audio}\t")


def test_the_loader_refuses_code_before_keras_reads_the_file(model_files, monkeypatch):
    """The Lambda and unknown-class checks run on config.json alone, without Keras loading."""
    bad = model_files["bad"]

    def no_keras_load(*args, **kwargs):
        raise AssertionError("keras.saving.load_model must not be reached")

    monkeypatch.setattr(keras.saving, "load_model", no_keras_load)
    for name in ("lambda", "unknown_class", "text", "truncated"):
        path, reason = bad[name]
        with pytest.raises(UserError, match=reason.replace(">", ".")):
            load_model_file(path)
    config = read_model_config(model_files["medimg"])
    assert config["class_name"] == "Functional"


def test_a_real_python_entry_point_refuses_a_lambda_model(model_files, tmp_path):
    """The same refusal through `python -m pipelines.medimg predict` itself."""
    path, _ = model_files["bad"]["lambda"]
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.medimg", "predict", str(model_files["scan"]),
         "--model", str(path), "--out", str(tmp_path)],
        cwd=ROOT, env=child_env(tmp_path / "home"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: {path}: cannot load the model: it contains a Lambda layer, which could run "
        "arbitrary code; refused (models are only loaded with safe_mode=True)"
    ]
