"""The built-in corpus: builds fast, deterministic for a seed, disjoint splits, CLI errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipelines.asr import corpus
from pipelines.asr.batching import ASRBatches
from pipelines.asr.data import load_corpus, load_splits
from pipelines.asr.features import FeatureExtractor
from pipelines.asr.text import CHARACTERS
from pipelines.asr.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[3]
SPLITS = ("train", "dev", "test")


def _tree_hashes(folder: Path) -> dict[str, str]:
    files = sorted([*folder.glob("*.jsonl"), *(folder / "wavs").glob("*.wav")])
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "c50"
    summary = corpus.build_corpus(out, utterances=50, seed=0, workers=2, progress=False)
    return out, summary


def test_fifty_utterance_corpus_layout(built):
    out, summary = built
    assert summary.counts == {"train": 46, "dev": 2, "test": 2}
    assert summary.synthesized == 50 and summary.failed == 0
    wavs = sorted((out / "wavs").glob("*.wav"))
    assert len(wavs) == 50
    info = json.loads((out / "corpus.json").read_text())
    assert info["utterances"] == 50 and info["seed"] == 0 and info["counts"] == summary.counts
    total = 0.0
    for split in SPLITS:
        for line in (out / f"{split}.jsonl").read_text().splitlines():
            record = json.loads(line)
            audio = soundfile.info(str(out / record["audio_filepath"]))
            assert audio.samplerate == 16000 and audio.channels == 1 and audio.subtype == "PCM_16"
            assert record["duration"] == pytest.approx(audio.frames / 16000, abs=1e-6)
            assert 0.5 < record["duration"] < 15.0
            assert set(record["text"]) <= set(CHARACTERS)
            assert 4 <= len(record["text"].split()) <= 16
            assert record["engine"] in ("espeak-ng", "flite")
            if record["augmentation"] is not None:
                assert split == "train"
                assert 15.0 <= record["augmentation"]["snr_db"] <= 30.0
                assert -6.0 <= record["augmentation"]["gain_db"] <= 0.0
            total += record["duration"]
    assert summary.hours == pytest.approx(total / 3600, rel=1e-4)
    voices = {json.loads(line)["voice"] for line in (out / "train.jsonl").read_text().splitlines()}
    assert len(voices) >= 20  # many voices, accents and variants


def test_splits_are_disjoint_and_load(built):
    out, _ = built
    splits = load_splits(out)
    texts = {name: {u.text for u in result.utterances} for name, result in splits.items()}
    assert [len(splits[s].utterances) for s in SPLITS] == [46, 2, 2]
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    assert load_corpus(out).utterances == splits["train"].utterances


def test_build_is_deterministic_and_skips_existing_files(built, tmp_path):
    out, _ = built
    # A second build through the real CLI, with other parallelism: identical bytes.
    again = tmp_path / "again"
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.asr", "make-corpus", "--out", str(again),
         "--utterances", "50", "--seed", "0", "--workers", "3", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "train 46, dev 2, test 2" in result.stdout
    assert _tree_hashes(again) == _tree_hashes(out)
    # Re-running reuses every file.
    first = {p: p.stat().st_mtime_ns for p in (again / "wavs").glob("*.wav")}
    summary = corpus.build_corpus(again, utterances=50, seed=0, workers=2, progress=False)
    assert summary.reused == 50 and summary.synthesized == 0
    assert {p: p.stat().st_mtime_ns for p in (again / "wavs").glob("*.wav")} == first
    assert _tree_hashes(again) == _tree_hashes(out)


def test_other_seed_gives_other_corpus():
    sentences = corpus.fortune_sentences()
    a = corpus.plan_corpus(sentences, 50, 0, ("espeak-ng", "flite"))
    b = corpus.plan_corpus(sentences, 50, 1, ("espeak-ng", "flite"))
    assert [s.text for s in a] != [s.text for s in b]
    assert a == corpus.plan_corpus(sentences, 50, 0, ("espeak-ng", "flite"))


def test_text_source_and_default_plan_have_disjoint_splits():
    sentences = corpus.fortune_sentences()
    assert len(sentences) >= 5000 and len(set(sentences)) == len(sentences)
    specs = corpus.plan_corpus(sentences, corpus.DEFAULT_UTTERANCES, 0, ("espeak-ng", "flite"))
    by_split = {s: {spec.text for spec in specs if spec.split == s} for s in SPLITS}
    assert not by_split["train"] & by_split["dev"] and not by_split["train"] & by_split["test"]
    assert not by_split["dev"] & by_split["test"]
    assert len(set().union(*by_split.values())) >= 5000
    assert len({spec.voice for spec in specs}) >= 80
    engines = {spec.engine for spec in specs}
    assert engines == {"espeak-ng", "flite"}
    augmented = [spec for spec in specs if spec.augmentation]
    assert all(spec.split == "train" for spec in augmented)
    assert 0.2 < len(augmented) / len(specs) < 0.4


def test_ensure_builtin_corpus_reuses(built, tmp_path, monkeypatch):
    out, _ = built
    monkeypatch.setattr(corpus, "build_corpus", lambda *a, **k: pytest.fail("rebuilt"))
    assert corpus.ensure_builtin_corpus(out, utterances=50, seed=0) == out
    monkeypatch.setenv("ATTENTION_TOOLKIT_HOME", str(tmp_path / "home"))
    assert corpus.default_corpus_dir() == tmp_path / "home" / "asr-corpus"


def test_missing_espeak_is_one_line_and_exit_2(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path / "empty-bin"))
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.asr", "make-corpus", "--out", str(tmp_path / "c"),
         "--utterances", "5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "espeak-ng not found" in lines[0] and "apt-get install espeak-ng" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()


def test_corpus_to_batches(built, tmp_path):
    out, _ = built
    splits = load_splits(out)
    extractor = FeatureExtractor(cache_dir=tmp_path / "cache")
    data, skipped = ASRBatches.from_utterances(
        splits["train"].utterances, extractor, CharTokenizer(), workers_prepare=1,
        batch_size=8, frame_buckets=(256, 512, 1024, 2048), token_buckets=(64, 128),
    )  # fmt: skip
    assert not skipped and data.num_utterances == 46
    inputs, targets = data[0]
    assert inputs["features"].shape[0] == 8 and inputs["features"].shape[2] == 80
    lengths = inputs["feature_mask"].sum(axis=1)
    assert (lengths > 0).all() and np.isfinite(inputs["features"]).all()
    assert (targets["decoder"] == 2).sum() == 8  # one </s> per row
