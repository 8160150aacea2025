"""The `python -m pipelines.asr` train / transcribe / evaluate commands, end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.asr.__main__ import main
from pipelines.asr.ctc import DEFAULT_CTC_WEIGHT


def run(args, cwd, env):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.asr", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 50-utterance corpus and a tiny model trained on it for 2 epochs through the CLI."""
    root = tmp_path_factory.mktemp("asr_cli")
    env = dict(os.environ, ATTENTION_TOOLKIT_HOME=str(root / "home"))
    env.pop("MLFLOW_TRACKING_URI", None)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    result = run(
        ["make-corpus", "--out", str(root / "corpus"), "--utterances", "50", "--no-progress"],
        root,
        env,
    )
    assert result.returncode == 0, result.stderr
    result = run(
        [
            "train",
            "--config",
            "tiny",
            "--data",
            str(root / "corpus"),
            "--no-progress",
            "tracking=off",
            "jit_compile=false",
            "decode.lm_weight=0.4",  # saved in the model: evaluate's default
        ],
        root,
        env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((root / "runs" / "asr").iterdir())
    assert len(runs) == 1
    return root, env, runs[0], result


@pytest.mark.slow
@pytest.mark.both_backends
def test_train_writes_every_output(trained):
    root, _, run_dir, result = trained
    assert "best dev CER" in result.stdout
    assert {"model.keras", "config.yaml", "metrics.json"} <= {p.name for p in run_dir.iterdir()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0, 1]
    assert 0.0 <= metrics["best_dev_cer"] and metrics["train_utterances"] > 30
    assert 100_000 < metrics["parameters"] < 1_000_000
    # The language model fitted on the transcripts (word trigrams over character 8-grams) is
    # inside the model file.
    lm = metrics["language_model"]
    assert lm["order"] == 8 and lm["word_order"] == 3 and lm["vocabulary"] > 20
    assert 0.0 < lm["oov_rate"] < 1.0 and 1.0 < lm["dev_perplexity"] < 40
    config = (run_dir / "config.yaml").read_text()
    assert "d_model: 96" in config and "tracking: 'off'" in config
    assert not (root / "home" / "mlflow.db").exists()  # tracking=off wrote no store


@pytest.mark.slow
@pytest.mark.both_backends
def test_model_loads_safely_without_custom_objects(trained):
    root, env, run_dir, _ = trained
    code = (
        "import sys, keras, pipelines.asr.model\n"
        "m = keras.saving.load_model(sys.argv[1], safe_mode=True)\n"
        "print(type(m).__name__, m.get_tokenizer().vocab_size, len(m.feature_stats['mean']),"
        " m.feature_params['hop_length'], type(m.language_model).__name__,"
        " m.language_model.order, m.language_model.char_lm.order)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(run_dir / "model.keras")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        "TransformerRecognizer", "32", "80", "160", "WordNgramLM", "3", "8"
    ]


@pytest.mark.slow
@pytest.mark.both_backends
def test_transcribe_newest_model_and_bad_files(trained):
    root, env, _, _ = trained
    wavs = sorted((root / "corpus" / "wavs").glob("*.wav"))[:2]
    bad = root / "not_audio.wav"
    bad.write_text("this is not audio")
    result = run(
        [
            "transcribe",
            str(wavs[0]),
            str(bad),
            str(wavs[1]),
            "--beam",
            "2",
            "--alignment-png",
            str(root / "png"),
        ],
        root,
        env,
    )
    assert result.returncode == 2
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(wavs[0]), str(wavs[1])]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (root / "png").iterdir()) == sorted(w.stem + ".png" for w in wavs)

    result = run(["transcribe", str(wavs[0]), "--json", "--beam", "1"], root, env)
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["path"] == str(wavs[0]) and isinstance(record["text"], str)
    assert record["seconds"] > 0.5


@pytest.mark.slow
@pytest.mark.both_backends
def test_evaluate_json(trained):
    root, env, run_dir, _ = trained
    result = run(
        [
            "evaluate",
            "--model",
            str(run_dir / "model.keras"),
            "--data",
            str(root / "corpus" / "test.jsonl"),
            "--beam",
            "1",
            "--json",
        ],
        root,
        env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {"wer", "cer", "utterances", "rtf", "substitutions", "deletions", "insertions"} <= set(
        report
    )
    assert report["utterances"] == 2 and report["rtf"] > 0 and report["cer"] >= 0
    assert report["beam_size"] == 1 and report["lm_weight"] == 0.0  # greedy: no LM
    # Without --beam: the model's own decoding settings (tiny.yaml's beam 2, LM weight 0.4).
    result = run(
        ["evaluate", "--model", str(run_dir), "--data", str(root / "corpus" / "test.jsonl"),
         "--json"], root, env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["beam_size"] == 2 and report["lm_weight"] == 0.4
    assert report["ctc_weight"] == DEFAULT_CTC_WEIGHT


@pytest.mark.slow
@pytest.mark.both_backends
def test_transcribe_without_any_model_says_train_first(tmp_path, trained):
    _, env, _, _ = trained
    result = run(["transcribe", "a.wav"], tmp_path, env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: no trained model")
    assert "train" in result.stderr and "Traceback" not in result.stderr


def test_print_config_merges_overrides(capsys):
    assert (
        main(
            [
                "train",
                "--config",
                "rnn",
                "--print-config",
                "model.attention=luong_dot",
                "optim.epochs=7",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "architecture: rnn" in out and "attention: luong_dot" in out
    assert "epochs: 7" in out and "d_model: 144" in out  # defaults from transformer.yaml


def test_unknown_config_key_is_a_user_error(capsys):
    assert main(["train", "--print-config", "model.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_key" in err[0] and err[0].startswith("error:")


def test_bad_config_value_is_a_user_error(capsys):
    assert main(["train", "--print-config", "model.attention=sideways"]) == 2
    assert "model.attention" in capsys.readouterr().err


def test_missing_model_file_is_a_user_error(tmp_path, capsys):
    assert main(["transcribe", "--model", str(tmp_path / "nope.keras"), "x.wav"]) == 2
    assert "nope.keras" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, name",
    [("optim.lr_schedule=cosine", "optim.lr_schedule"), ("decode.lm_order=-1", "lm_order"),
     ("decode.word_lm_order=-1", "word_lm_order"),
     ("optim.final_lr_fraction=2", "final_lr_fraction")],
)  # fmt: skip
def test_bad_schedule_and_language_model_settings_are_user_errors(override, name, capsys):
    assert main(["train", "--print-config", override]) == 2
    assert name in capsys.readouterr().err


def test_negative_lm_weight_is_a_user_error(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path / "x.jsonl"), "--lm-weight", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lm-weight" in err[0]
