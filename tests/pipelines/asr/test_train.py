"""Training in-process: outputs, resume after an interruption, MLflow records."""

import json
import subprocess
import sys

import pytest

from pipelines.asr.train import resolve_config, train
from tests.training_callbacks import EpochRecorder, Interrupt, StopAfter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.asr",
            "make-corpus",
            "--out",
            str(out),
            "--utterances",
            "30",
            "--no-progress",
            "--workers",
            "2",
        ],
        check=True,
        capture_output=True,
    )
    return out


def test_resume_continues_at_the_right_epoch(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "home"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = resolve_config(
        "tiny",
        [
            "optim.epochs=3",
            "optim.patience=10",
            "data.max_train_utterances=16",
            "data.batch_size=8",
            "jit_compile=false",
            "tracking=on",
            f"tracking_uri={uri}",
        ],
    )
    out = tmp_path / "run"
    first = EpochRecorder()
    with pytest.raises(Interrupt):
        train(config, data=corpus, out=out, callbacks=[first, StopAfter(1)], progress=False)
    assert first.epochs == [0, 1]
    assert (out / "model.keras").is_file() and not (out / "metrics.json").exists()

    second = EpochRecorder()
    metrics = train(config, data=corpus, out=out, callbacks=[second], progress=False)
    assert second.epochs == [2]  # resumed after the two finished epochs
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1, 2]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["best_dev_cer"] == min(e["dev_cer"] for e in saved["epochs"])
    assert saved["train_utterances"] == 16 and saved["parameters"] > 100_000
    assert "d_model: 96" in (out / "config.yaml").read_text()

    # One MLflow run across the interruption, per-epoch metrics at steps 0..2, images.
    import mlflow

    client = mlflow.MlflowClient(uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    for key in ("loss", "dev_cer", "dev_wer", "learning_rate"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == [0, 1, 2], key
    params = client.get_run(run_id).data.params
    assert params["model.d_model"] == "96"
    artifacts = [a.path for a in client.list_artifacts(run_id)]
    assert any("image" in a for a in artifacts), artifacts
