"""The scale benchmark: FLOP counting, the GPU peak table, and a tiny run of both pipelines.

FLOP counts are XLA's (JAX only): a matrix product `(M, K) x (K, N)` is `2 M K N`; a training
step of two Dense layers is checked against its analytic count. The end-to-end run trains both
tiny pipelines in a fresh process under the test pass's backend; under JAX with TensorFlow
unimportable, as on a GPU machine with JAX alone.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from benchmarks.scale import (
    StepRecorder,
    model_flops_utilisation,
    peak_flops,
    split_overrides,
)
from tests.pipelines.test_backends import WITHOUT_TF

ROOT = Path(__file__).resolve().parents[2]
JAX = keras.backend.backend() == "jax"
jax_only = pytest.mark.skipif(not JAX, reason="XLA FLOP counting: runs in the JAX test pass")


@pytest.mark.parametrize(
    "device, precision, tflops, label",
    [
        ("NVIDIA H100 80GB HBM3", "mixed_bfloat16", 989.4, "bf16 dense"),
        ("NVIDIA H100 80GB HBM3", "float32", 494.7, "tf32 dense"),
        ("NVIDIA H100 PCIe", "mixed_float16", 756.0, "fp16 dense"),
        ("NVIDIA H100 NVL", "mixed_bfloat16", 835.5, "bf16 dense"),
        ("NVIDIA H200", "mixed_bfloat16", 989.4, "bf16 dense"),
        ("NVIDIA H200 NVL", "float32", 417.5, "tf32 dense"),
        ("NVIDIA A100-SXM4-80GB", "mixed_bfloat16", 312.0, "bf16 dense"),
        ("NVIDIA A100-PCIE-40GB", "float32", 156.0, "tf32 dense"),
    ],
)
def test_peak_table_picks_the_device_and_the_precision(device, precision, tflops, label):
    assert peak_flops(device, precision) == (pytest.approx(tflops * 1e12), label)


def test_unknown_devices_have_no_peak_and_utilisation_scales_with_devices():
    assert peak_flops("cpu", "float32") is None
    assert peak_flops("NVIDIA GeForce RTX 4090", "mixed_bfloat16") is None
    assert model_flops_utilisation(1e12, "cpu", "float32") is None
    mfu, label = model_flops_utilisation(494.7e12, "NVIDIA H100 80GB HBM3", "mixed_bfloat16")
    assert mfu == pytest.approx(0.5) and label == "bf16 dense"
    mfu, _ = model_flops_utilisation(494.7e12, "NVIDIA H100 80GB HBM3", "mixed_bfloat16", 2)
    assert mfu == pytest.approx(0.25)


def test_overrides_go_to_every_pipeline_or_to_the_one_named():
    routed = split_overrides(["seed=3", "asr.data.batch_size=8", "medimg.model.dropout=0.1"])
    assert routed == {
        "asr": ["seed=3", "data.batch_size=8"],
        "medimg": ["seed=3", "model.dropout=0.1"],
    }


def test_an_output_folder_with_a_run_is_refused_in_one_line(tmp_path, capsys):
    from benchmarks.scale import main

    (tmp_path / "run" / "asr").mkdir(parents=True)
    (tmp_path / "run" / "asr" / "config.yaml").write_text("seed: 0\n")
    assert main(["--pipeline", "asr", "--out", str(tmp_path / "run"), "--minutes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already holds a training run" in err
    assert len(err.splitlines()) == 1


def _two_dense_layers(inputs, hidden, outputs):
    model = keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(hidden), keras.layers.Dense(outputs)]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


def test_recorder_counts_steps_and_on_jax_the_batch_shapes():
    batch, rows = 16, 40  # batches of 16, 16 and 8 rows: two shapes
    model = _two_dense_layers(32, 16, 8)
    recorder = StepRecorder()
    x = np.random.default_rng(0).normal(size=(rows, 32)).astype("float32")
    y = np.zeros((rows, 8), "float32")
    model.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=[recorder])
    assert recorder.steps == 2 * math.ceil(rows / batch)
    if not JAX:
        assert recorder.flops() is None and not recorder.shapes
        return
    by_rows = {key[1][0][0][0]: steps for key, steps in recorder.shapes.items()}  # x's rows
    assert by_rows == {16: 4, 8: 2}
    assert recorder.compile_seconds > 0
    assert model.train_function is not None and model.train_function.__name__ != "train_function"


@jax_only
def test_count_flops_of_a_matrix_product_is_2mkn():
    import jax

    from benchmarks.scale import count_flops

    a = jax.ShapeDtypeStruct((8, 64), "float32")
    b = jax.ShapeDtypeStruct((64, 32), "float32")
    assert count_flops(lambda a, b: a @ b, a, b) == 2 * 8 * 64 * 32


@jax_only
def test_count_flops_of_a_3d_convolution_is_2_per_tap_and_channel_pair():
    import jax

    from benchmarks.scale import count_flops

    x = jax.ShapeDtypeStruct((2, 17, 17, 17, 3), "float32")  # (B, X, Y, Z, C)
    kernel = jax.ShapeDtypeStruct((3, 3, 3, 3, 8), "float32")  # (3, 3, 3, C, F)
    flops = count_flops(lambda x, k: keras.ops.conv(x, k, strides=2, padding="valid"), x, kernel)
    assert flops == 2 * 2 * 8**3 * 27 * 3 * 8  # B x 8^3 outputs x 27 taps x C x F


@jax_only
def test_training_step_flops_of_two_dense_layers_match_the_analytic_count():
    from benchmarks.scale import train_step_flops

    batch, inputs, hidden, outputs = 64, 256, 128, 64
    model = _two_dense_layers(inputs, hidden, outputs)
    x = np.ones((batch, inputs), "float32")
    y = np.zeros((batch, outputs), "float32")
    recorder = StepRecorder()
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[recorder])
    forward = 2 * batch * (inputs * hidden + hidden * outputs)
    # Backward: weight gradients of both layers (= forward), the input gradient of the second
    # only (nothing asks for the gradient of x).
    analytic = forward + forward + 2 * batch * hidden * outputs
    flops = train_step_flops(model, (x, y, None))
    # The rest (biases, loss, Adam's update: ~15 per parameter) is a few percent here.
    assert 1.0 <= flops / analytic <= 1.1, (flops, analytic)
    assert recorder.flops() == pytest.approx(flops)  # one step of the same shape
    half = train_step_flops(model, (x[:32], y[:32], None))
    assert 0.45 < half / flops < 0.55  # the matrix products scale with the batch


@jax_only
def test_attention_is_traced_with_xla_so_its_flops_are_counted():
    import jax

    from benchmarks.scale import _xla_attention, count_flops

    q = jax.ShapeDtypeStruct((2, 16, 4, 8), "float32")  # (B, T, N, H)
    original = jax.nn.dot_product_attention

    def cudnn_attention(q, k, v):  # what Keras asks for on a GPU
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

    with _xla_attention():
        flops = count_flops(cudnn_attention, q, q, q)
    assert jax.nn.dot_product_attention is original
    assert flops >= 2 * (2 * 2 * 4 * 16 * 16 * 8)  # Q K^T and P V


def _env(tmp_path):
    return dict(
        os.environ,
        KERAS_BACKEND=keras.backend.backend(),
        ATTENTION_TOOLKIT_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="3",
    )


@pytest.mark.skipif(not JAX, reason="JAX without TensorFlow: runs in the JAX test pass")
def test_importing_the_benchmark_under_jax_imports_no_tensorflow(tmp_path):
    script = (
        "import contextlib, io, sys\n"
        "from benchmarks.scale import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "print('tensorflow' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow
@pytest.mark.both_backends
def test_tiny_run_of_both_pipelines_prints_the_table(tmp_path):
    backend = keras.backend.backend()
    out, markdown = tmp_path / "run", tmp_path / "benchmarks.md"
    markdown.write_text("# Benchmarks\n")
    arguments = [
        "--config", "tiny", "--minutes", "1", "--out", str(out), "--no-progress",
        "--markdown-out", str(markdown), "optim.epochs=1",
        "asr.data.builtin_utterances=12", "asr.data.max_dev_utterances=2",
        "asr.data.frame_buckets=[1024]", "asr.data.token_buckets=[128]",
        "asr.model.encoder_layers=1", "asr.model.d_model=32", "asr.model.intermediate_dim=64",
        "medimg.data.builtin_scans=12", "medimg.evaluation.bootstrap=10",
        "medimg.evaluation.heatmap_methods=[native]",
    ]  # fmt: skip
    # Under JAX, as on a GPU machine with JAX and no TensorFlow: `import tensorflow` fails.
    # (With TensorFlow installed, Keras imports it under JAX too, to seed it and when saving.)
    runner = ["-c", WITHOUT_TF] if backend == "jax" else ["-m"]
    done = subprocess.run(
        [sys.executable, *runner, "benchmarks.scale", *arguments],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr

    rows = {row["pipeline"]: row for row in json.loads((out / "scale.json").read_text())}
    assert set(rows) == {"asr", "medimg"}
    configs = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in rows}
    assert configs["asr"]["model"]["d_model"] == 32  # asr.* went to the ASR config only
    assert configs["medimg"]["data"]["builtin_scans"] == 12
    assert configs["asr"]["optim"]["epochs"] == configs["medimg"]["optim"]["epochs"] == 1
    table = [line for line in markdown.read_text().splitlines() if line.startswith(f"| {backend}")]
    assert len(table) == 2 and table[0] in done.stdout
    for name, row in rows.items():
        cells = [c.strip() for c in table[0 if name == "asr" else 1].split("|")[1:-1]]
        assert cells[2:5] == ["float32", name, "1 min"] and int(cells[5]) == row["steps"] >= 1
        assert row["train_seconds"] > 0 and row["examples_per_second"] > 0
        assert 0.0 <= row["loader_share"] <= 1.0
        assert row["mfu"] is None and cells[11] == "n/a (CPU)"
        if backend == "jax":
            # Every weight takes part in at least one multiply-add per example, forward alone.
            batch = 8 if name == "asr" else 4
            assert row["flops_per_step"] > 2 * row["parameters"] * batch
            assert row["achieved_flops"] == pytest.approx(
                row["flops_per_step"] * row["steps"] / row["train_seconds"]
            )
            assert row["compile_seconds"] > 0 and cells[9].endswith("FLOP")
        else:
            assert row["flops_per_step"] is None and cells[9:11] == ["n/a", "n/a"]
    assert rows["asr"]["quality"].startswith("dev CER ")
    assert "AUC" in rows["medimg"]["quality"]
