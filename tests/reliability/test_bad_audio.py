"""Odd and broken audio through `transcribe`, `evaluate` and a training manifest.

Documented outcome for each file: text (over the model's alphabet; possibly empty for silence),
or exactly one `error: <file>: <reason>` line on stderr, exit code 2 once the other files are
done, and no traceback. In training, bad manifest entries are skipped, each named in a warning,
counted in `metrics.json`, reported in one `data: ...; skipped N (...)` line, and training goes
on. A 10-minute recording is transcribed in segments with peak memory under 2 GB.

One module-scoped corpus (espeak-ng, 30 utterances), one training of the tiny config whose
manifest holds every case, and one `transcribe` command over every file: each start-up of
Keras costs seconds, so files are batched into as few commands as possible.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from pipelines.asr.text import CHARACTERS
from tests.reliability.measured_run import child_env, run_measured

pytestmark = pytest.mark.slow

PEAK_RSS_LIMIT = 2 * 2**30
RATE = 16000
LONG_SECONDS = 600.0


@dataclasses.dataclass(frozen=True)
class Case:
    """One audio file and its documented outcome (`error` is a fragment of the error line)."""

    name: str
    path: Path
    error: str | None = None
    skip_reason: str | None = None  # how training counts it; None: trained on


def _tile(utterances, seconds, rng, noise=1e-3):
    """Utterances `(samples, text)` in random order with 0.3-1.0 s pauses, cut to `seconds`."""
    parts, texts, total = [], [], 0
    while total < seconds * RATE:
        samples, text = utterances[int(rng.integers(len(utterances)))]
        pause = np.zeros(int(rng.uniform(0.3, 1.0) * RATE), np.float32)
        parts += [samples, pause]
        texts.append(text)
        total += len(samples) + len(pause)
    y = np.concatenate(parts)[: int(seconds * RATE)]
    y = y + (noise * rng.standard_normal(len(y))).astype(np.float32)  # a recorder's noise floor
    return np.clip(y, -1, 1), " ".join(texts)


def make_cases(corpus: Path, folder: Path) -> tuple[list[Case], dict]:
    """Write every case into `folder`; returns them and the texts of the tiled recordings."""
    folder.mkdir()
    manifest = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    utterances = [
        (soundfile.read(str(corpus / m["audio_filepath"]), dtype="float32")[0], m["text"])
        for m in manifest[:12]
    ]
    reference, _ = utterances[0]
    cases = [Case("reference (16-bit PCM, 16 kHz)", folder / "reference.wav")]
    soundfile.write(str(cases[0].path), reference, RATE, subtype="PCM_16")

    path = folder / "empty.wav"
    path.write_bytes(b"")
    cases.append(Case("empty file (0 bytes)", path, "empty file (0 bytes)", "empty_audio"))
    path = folder / "header_only.wav"
    soundfile.write(str(path), np.zeros(0, np.float32), RATE, subtype="PCM_16")
    cases.append(Case("header-only WAV (44 bytes)", path, "empty audio (zero samples)",
                      "empty_audio"))  # fmt: skip
    path = folder / "random.wav"
    path.write_bytes(np.random.default_rng(0).bytes(20000))
    cases.append(Case("random bytes named .wav", path, "unreadable audio", "unreadable_audio"))
    path = folder / "missing.wav"
    cases.append(Case("missing file", path, "audio file not found", "missing_audio"))

    for name, subtype, label in (("pcm8", "PCM_U8", "8-bit"), ("pcm24", "PCM_24", "24-bit")):
        path = folder / f"{name}.wav"
        soundfile.write(str(path), reference, RATE, subtype=subtype)
        cases.append(Case(f"{label} PCM", path))
    path = folder / "stereo48k.wav"
    up = soxr.resample(reference, RATE, 48000)
    soundfile.write(str(path), np.stack([up, 0.5 * up], axis=-1), 48000, subtype="PCM_16")
    cases.append(Case("48 kHz stereo", path))
    path = folder / "silence.wav"
    soundfile.write(str(path), np.zeros(RATE, np.float32), RATE, subtype="PCM_16")
    cases.append(Case("1 s of digital silence", path))
    path = folder / "truncated.wav"
    data = (cases[0].path).read_bytes()
    path.write_bytes(data[: 44 + (len(data) - 44) // 3])  # header promises 3x the samples
    cases.append(Case("truncated WAV (first third of the data)", path))

    rng = np.random.default_rng(1)
    y, long_text = _tile(utterances, LONG_SECONDS, rng)
    path = folder / "long.wav"
    soundfile.write(str(path), y, RATE, subtype="PCM_16")
    cases.append(Case("10-minute recording (tiled espeak-ng speech)", path, None, "too_long"))
    y, medium_text = _tile(utterances, 25.0, rng)
    path = folder / "medium.wav"
    soundfile.write(str(path), y, RATE, subtype="PCM_16")
    cases.append(Case("25 s recording", path, None, "too_long"))
    return cases, {"long": long_text, "medium": medium_text}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_audio")
    env = child_env(root / "home")
    corpus = root / "corpus"
    finished = run_measured(
        "pipelines.asr",
        ["make-corpus", "--out", corpus, "--utterances", "30", "--no-progress", "--workers", "2"],
        env,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    cases, texts = make_cases(corpus, root / "audio")
    return root, env, corpus, cases, texts


@pytest.fixture(scope="module")
def trained(setup):
    """The tiny config trained on the corpus with every case appended to its manifests."""
    root, env, corpus, cases, texts = setup
    by_name = {c.path.stem: c for c in cases}
    with open(corpus / "train.jsonl", "a", encoding="utf-8") as handle:
        for case in cases:
            text = texts.get(case.path.stem, "a test sentence")
            handle.write(json.dumps({"audio_filepath": str(case.path), "text": text}) + "\n")
    with open(corpus / "dev.jsonl", "a", encoding="utf-8") as handle:  # a 10-minute dev entry
        entry = {"audio_filepath": str(by_name["long"].path), "text": texts["long"]}
        handle.write(json.dumps(entry) + "\n")
    run_dir = root / "run"
    finished = run_measured(
        "pipelines.asr",
        ["train", "--config", "tiny", "--data", corpus, "--out", run_dir, "--no-progress",
         "tracking=off", "jit_compile=false", "optim.epochs=1"],
        env,
        timeout=580,
    )  # fmt: skip
    return run_dir, finished


@pytest.fixture(scope="module")
def transcribed(setup, trained):
    """One `transcribe --json` over every case, bad files between good ones."""
    root, env, _, cases, _ = setup
    run_dir, finished = trained
    assert finished.returncode == 0, finished.stderr[-3000:]
    finished = run_measured(
        "pipelines.asr",
        ["transcribe", "--model", run_dir / "model.keras", "--beam", "1", "--json",
         *[case.path for case in cases]],
        env,
        timeout=580,
    )  # fmt: skip
    results = {}
    for line in finished.stdout.splitlines():
        record = json.loads(line)
        results[record["path"]] = record
    return finished, results


def test_training_skips_counts_and_reports_bad_manifest_entries(setup, trained):
    _, _, _, cases, _ = setup
    run_dir, finished = trained
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.peak_rss < PEAK_RSS_LIMIT, f"peak RSS {finished.peak_rss / 2**30:.2f} GB"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [0]  # training went on to the end
    # Too long to train on: the 25 s file, and the 10-minute file in train and in dev.
    expected = {"empty_audio": 2, "unreadable_audio": 1, "missing_audio": 1, "too_long": 3}
    assert metrics["skipped"] == expected
    trained_on = [c for c in cases if c.skip_reason is None]
    assert metrics["train_utterances"] == 26 + len(trained_on)
    warnings = [line for line in finished.stderr.splitlines() if line.startswith("warning:")]
    for case in cases:
        if case.skip_reason is not None:
            assert any(str(case.path) in line for line in warnings), case.name
    summary = [line for line in finished.stderr.splitlines() if line.startswith("data: ")]
    assert summary == [
        f"data: {metrics['train_utterances']} train and {metrics['dev_utterances']} dev "
        f"utterances from {metrics['corpus']}; skipped 7 (empty_audio=2, missing_audio=1, "
        "too_long=3, unreadable_audio=1)"
    ]


def test_transcribe_gives_text_or_one_error_line_per_file(setup, transcribed):
    _, _, _, cases, _ = setup
    finished, results = transcribed
    assert "Traceback" not in finished.stderr, finished.stderr[-3000:]
    assert finished.returncode == 2
    errors = finished.error_lines
    bad = [c for c in cases if c.error is not None]
    assert len(errors) == len(bad)
    for case in bad:
        mine = [line for line in errors if line.startswith(f"error: {case.path}: ")]
        assert len(mine) == 1 and case.error in mine[0], (case.name, errors)
        assert str(case.path) not in results
    good = [c for c in cases if c.error is None]
    assert list(results) == [str(c.path) for c in good]  # in order, after the bad ones too
    for case in good:
        assert set(results[str(case.path)]["text"]) <= set(CHARACTERS), case.name
    reference = results[str(cases[0].path)]
    # 24-bit PCM holds the 16-bit samples exactly: the same features, the same text.
    assert results[str(cases[0].path.with_name("pcm24.wav"))]["text"] == reference["text"]
    for name in ("pcm8", "pcm24", "stereo48k"):
        assert results[str(cases[0].path.with_name(f"{name}.wav"))]["seconds"] == pytest.approx(
            reference["seconds"], abs=0.011
        )
    silence = results[str(cases[0].path.with_name("silence.wav"))]["seconds"]
    assert silence == pytest.approx(1.0, abs=0.011)  # 101 frames of 10 ms
    truncated = results[str(cases[0].path.with_name("truncated.wav"))]["seconds"]
    assert 0 < truncated < reference["seconds"] / 2


def test_ten_minute_recording_is_transcribed_in_bounded_memory(setup, transcribed):
    _, _, _, cases, _ = setup
    finished, results = transcribed
    long = results[str(cases[0].path.with_name("long.wav"))]
    assert long["seconds"] == pytest.approx(LONG_SECONDS)
    assert 60 <= long["segments"] <= 100  # cuts every 6-10 s (default maximum 10 s)
    assert len(long["text"]) >= long["segments"]  # the text of every segment, not just one
    assert finished.peak_rss < PEAK_RSS_LIMIT, f"peak RSS {finished.peak_rss / 2**30:.2f} GB"
    # Time: CPU seconds of the whole command (start-up, every file, compilations), which a
    # busy machine does not inflate as it does wall time; measured about 30 s.
    assert finished.cpu_seconds < 0.25 * LONG_SECONDS
    medium = results[str(cases[0].path.with_name("medium.wav"))]
    assert medium["segments"] >= 3


def test_evaluate_and_alignment_plots_of_a_segmented_recording(setup, trained, transcribed,
                                                               tmp_path):  # fmt: skip
    """In-process: `evaluate` segments long utterances like `transcribe`; one plot per segment."""
    from pipelines.asr.evaluate import evaluate
    from pipelines.asr.transcribe import transcribe_files

    _, _, _, cases, texts = setup
    run_dir, _ = trained
    _, results = transcribed
    medium = cases[0].path.with_name("medium.wav")
    manifest = tmp_path / "eval.jsonl"
    manifest.write_text(
        json.dumps({"audio_filepath": str(medium), "text": texts["medium"]}) + "\n"
        + json.dumps({"audio_filepath": str(cases[0].path), "text": "a reference"}) + "\n"
    )
    report = evaluate(run_dir / "model.keras", manifest, beam_size=1)
    assert report["utterances"] == 2 and report["skipped"] == {}
    hypotheses = [e["hypothesis"] for e in report["examples"]]
    assert hypotheses == [results[str(medium)]["text"], results[str(cases[0].path)]["text"]]

    shutil.copy(medium, tmp_path / "m.wav")
    out = tmp_path / "out.txt"
    with open(out, "w") as stdout:
        code = transcribe_files([tmp_path / "m.wav"], run_dir / "model.keras", beam_size=1,
                                alignment_dir=tmp_path / "png", stdout=stdout)  # fmt: skip
    assert code == 0
    segments = results[str(medium)]["segments"]
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == [f"m.seg{k:03d}.png" for k in range(1, segments + 1)]
