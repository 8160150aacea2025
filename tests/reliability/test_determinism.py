"""Same seed, same backend, same machine: the same trained weights.

Each pipeline's tiny config is trained twice for two epochs, in two fresh processes at the
same time: once through its `train()` function and once through the CLI with another
`PYTHONHASHSEED` (so nothing may depend on set or dict-of-str order). The
saved models must have bit-identical weights (one SHA-256 over all of them) and the two runs
the same per-epoch losses. Runs on whichever backend the test session uses (`KERAS_BACKEND`).
"""

import hashlib
import json
import sys

import keras
import numpy as np
import pytest

from tests.reliability import training_runs as runs

EPOCHS = 2


def weights_sha256(model_path):
    """One SHA-256 over the names, shapes, dtypes and bytes of every weight of a `.keras` file."""
    import pipelines.asr.model  # noqa: F401  (registers the classes the model files name)
    import pipelines.medimg.model  # noqa: F401

    model = keras.saving.load_model(model_path, safe_mode=True)
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(variable))
        digest.update(f"{variable.path}|{value.shape}|{value.dtype}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _train_both_ways(pipeline, data, root):
    """`(train() out folder, CLI out folder)` of two identical trainings run side by side.

    Both run in fresh processes: `train()` called in a process that has already run other
    TensorFlow models (in CI, the mixed-precision ASR test before this one on the same worker)
    gave a second-epoch loss 1e-7 away, so only a fresh process is comparable.
    """
    overrides = runs.ASR_OVERRIDES if pipeline == "asr" else runs.MEDIMG_OVERRIDES
    overrides = [*overrides, f"optim.epochs={EPOCHS}", "tracking=off"]
    code = (
        f"import sys\n"
        f"from pipelines.{pipeline}.train import resolve_config, train\n"
        f"train(resolve_config('tiny', {overrides!r}), data=sys.argv[1], out=sys.argv[2],"
        f" progress=False)\n"
    )
    (root / "api").mkdir()
    api = runs.Training(
        [sys.executable, "-c", code, str(data), str(root / "run")],
        root / "api", runs.environment(root / "api"), "train",
    )  # fmt: skip
    env = runs.environment(root / "cli")
    env["PYTHONHASHSEED"] = "12345"
    command = runs.train_command(pipeline, data, root / "cli" / "run", "unused", EPOCHS)
    command[command.index("--tracking-uri") : command.index("--tracking-uri") + 2] = []
    command.append("tracking=off")
    (root / "cli").mkdir()
    cli = runs.Training(command, root / "cli", env, "train")
    try:
        assert api.wait() == 0, api.stderr[-3000:]
        assert cli.wait() == 0, cli.stderr[-3000:]
    finally:
        api.stop()
        cli.stop()
    return root / "run", root / "cli" / "run"


def _losses(out):
    return [entry["loss"] for entry in json.loads((out / "metrics.json").read_text())["epochs"]]


@pytest.mark.slow
def test_asr_training_is_repeatable(tmp_path):
    corpus = runs.build_asr_corpus(tmp_path)
    here, there = _train_both_ways("asr", corpus, tmp_path)
    assert len(_losses(here)) == EPOCHS
    assert _losses(here) == _losses(there)
    assert weights_sha256(here / "model.keras") == weights_sha256(there / "model.keras")


@pytest.mark.slow
def test_medimg_training_is_repeatable(tmp_path):
    datalist = runs.build_medimg_dataset(tmp_path)
    here, there = _train_both_ways("medimg", datalist, tmp_path)
    assert len(_losses(here)) == EPOCHS
    assert _losses(here) == _losses(there)
    assert weights_sha256(here / "model.keras") == weights_sha256(there / "model.keras")
