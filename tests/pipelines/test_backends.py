"""The pipelines under JAX need no TensorFlow: not to import, not to save, load and predict.

Checked in fresh `KERAS_BACKEND=jax` processes: importing every pipeline module and running both
CLIs' `--help` leaves `tensorflow` out of `sys.modules`; with TensorFlow made unimportable (as on
a GPU machine with only JAX installed), an untrained tiny model of each pipeline is saved, then
`python -m pipelines.asr transcribe` and `python -m pipelines.medimg predict` run on it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="JAX without TensorFlow: runs in the JAX test pass"
)

IMPORTS = """
import contextlib, io, json, sys
import pipelines.asr.__main__, pipelines.asr.train, pipelines.asr.transcribe
import pipelines.asr.evaluate, pipelines.asr.decode, pipelines.asr.model
import pipelines.medimg.__main__, pipelines.medimg.train, pipelines.medimg.predict
import pipelines.medimg.evaluate, pipelines.medimg.heatmaps, pipelines.medimg.model
import pipelines.common.scale, toolkit.layers, toolkit.ops, toolkit.interpret, toolkit.tracking
codes = []
for main in (pipelines.asr.__main__.main, pipelines.medimg.__main__.main):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main(["--help"])
        except SystemExit as e:
            codes.append((e.code, "usage" in out.getvalue()))
print(json.dumps({"tensorflow": "tensorflow" in sys.modules, "help": codes}))
"""

# Makes `import tensorflow` fail, then runs argv[1], a script or (like `python -m`) a module.
WITHOUT_TF = """
import runpy, sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("TensorFlow is not installed (test)")
sys.meta_path.insert(0, NoTensorFlow())
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

MAKE_MODELS = """
import sys
from pathlib import Path
import keras, nibabel as nib, numpy as np, soundfile as sf
from pipelines.asr.features import FeatureParams
from pipelines.asr.model import ModelConfig, build_recognizer
from pipelines.medimg.model import build_model
from pipelines.medimg.train import resolve_config

out = Path(sys.argv[1])
asr = build_recognizer(
    ModelConfig(d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1, intermediate_dim=32,
                conv_channels=4, dropout=0.0),
    feature_params=FeatureParams().get_config(),
    feature_stats={"mean": [0.0] * 80, "std": [1.0] * 80, "frames": 1},
)
asr.save(out / "asr.keras")
sf.write(out / "a.wav", 0.1 * np.sin(np.arange(8000) / 5.0).astype("float32"), 16000)
config = resolve_config("tiny", ["preprocess.shape=[16,16,16]"])
build_model(config.model, config.preprocess).save(out / "medimg.keras")
data = np.random.default_rng(0).normal(size=(20, 24, 20)).astype("float32")
nib.save(nib.Nifti1Image(data, np.diag([4.0, 4.0, 4.0, 1.0])), out / "scan.nii.gz")
print("tensorflow" in sys.modules)
"""


def _run(args, cwd, timeout=300):
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_importing_the_pipelines_and_their_help_imports_no_tensorflow(tmp_path):
    result = _run(["-c", IMPORTS], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"tensorflow": False, "help": [[0, True], [0, True]]}


def test_models_save_load_and_predict_without_tensorflow(tmp_path):
    runner = tmp_path / "without_tf.py"
    runner.write_text(WITHOUT_TF)
    script = tmp_path / "make_models.py"
    script.write_text(MAKE_MODELS)
    made = _run([str(runner), str(script), str(tmp_path)], tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    assert made.stdout.strip().splitlines()[-1] == "False"

    transcribed = _run([str(runner), "pipelines.asr", "transcribe", str(tmp_path / "a.wav"),
                        "--model", str(tmp_path / "asr.keras"), "--beam", "1", "--json"],
                       tmp_path)  # fmt: skip
    assert transcribed.returncode == 0, transcribed.stderr[-3000:]
    record = json.loads(transcribed.stdout.strip().splitlines()[-1])
    assert record["path"] == str(tmp_path / "a.wav") and isinstance(record["text"], str)

    predicted = _run([str(runner), "pipelines.medimg", "predict", str(tmp_path / "scan.nii.gz"),
                      "--model", str(tmp_path / "medimg.keras"), "--out", str(tmp_path / "pred"),
                      "--json"], tmp_path)  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    record = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert 0.0 <= record["probability"] <= 1.0
    assert (tmp_path / "pred" / "scan_heatmap.nii.gz").is_file()
