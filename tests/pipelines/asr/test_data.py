"""Corpus loaders: three formats to identical records; bad inputs skipped, counted, reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile

from pipelines.asr.data import load_corpus, load_splits, write_manifest
from toolkit.errors import UserError

TEXTS = {
    "alpha": "Hello there, General Kenobi!",
    "beta": "It's 42 degrees today.",
    "gamma": "A third utterance.",
}


def _wav(path, seconds, rate=16000, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    y = 0.1 * rng.standard_normal((int(seconds * rate), channels)).astype("float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), y, rate, subtype="PCM_16")


@pytest.fixture
def three_formats(tmp_path):
    lengths = {"alpha": 0.5, "beta": 0.75, "gamma": 0.3}
    # LJSpeech layout; its wavs are shared by the manifest and the pairs folder (copied).
    lj = tmp_path / "lj"
    rows = []
    for i, (name, text) in enumerate(TEXTS.items()):
        _wav(lj / "wavs" / f"{name}.wav", lengths[name], seed=i)
        rows.append(f"{name}|{text.upper()}|{text}")
    (lj / "metadata.csv").write_text("\n".join(rows) + "\n")
    # Manifest with relative paths into the LJSpeech folder.
    manifest = tmp_path / "lj" / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"audio_filepath": f"wavs/{name}.wav", "text": text, "duration": 9.9}) + "\n"
            for name, text in TEXTS.items()
        )
    )
    # Folder of pairs pointing at the same wavs: use the LJSpeech wavs folder itself.
    for name, text in TEXTS.items():
        (lj / "wavs" / f"{name}.txt").write_text(text + "\n")
    return lj, manifest, lj / "wavs", lengths


def test_three_formats_load_identical_records(three_formats):
    lj, manifest, pairs, lengths = three_formats
    a = load_corpus(lj)
    b = load_corpus(manifest)
    c = load_corpus(pairs)
    key = lambda r: [(u.audio_filepath, u.text, u.duration, u.id) for u in r.utterances]  # noqa: E731
    assert sorted(key(a)) == sorted(key(b)) == sorted(key(c))
    assert len(a.utterances) == 3 and not a.skipped
    by_id = {u.id: u for u in a.utterances}
    assert by_id["beta"].text == TEXTS["beta"]
    assert by_id["beta"].normalized_text == "it's forty two degrees today"
    assert by_id["alpha"].duration == pytest.approx(lengths["alpha"])  # from the header, not 9.9
    assert by_id["gamma"].audio_filepath == str((lj / "wavs" / "gamma.wav").absolute())


def test_manifest_roundtrip_and_absolute_paths(three_formats, tmp_path):
    lj, manifest, _, _ = three_formats
    loaded = load_corpus(manifest).utterances
    out = write_manifest(loaded, tmp_path / "elsewhere" / "m.jsonl")
    first = json.loads(out.read_text().splitlines()[0])
    assert first["audio_filepath"].startswith("/")  # outside the manifest folder: absolute
    assert load_corpus(out).utterances == loaded
    inside = write_manifest(loaded, lj / "again.jsonl")
    assert json.loads(inside.read_text().splitlines()[0])["audio_filepath"].startswith("wavs/")


def test_bad_inputs_are_skipped_counted_and_named(tmp_path, capsys):
    good = tmp_path / "good.wav"
    _wav(good, 0.2)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.wav").write_bytes(np.random.default_rng(0).bytes(2000))
    soundfile.write(str(tmp_path / "header_only.wav"), np.zeros((0, 1), "float32"), 16000)
    lines = [
        {"audio_filepath": "good.wav", "text": "fine"},
        {"audio_filepath": "missing.wav", "text": "gone"},
        {"audio_filepath": "empty.wav", "text": "empty"},
        {"audio_filepath": "random.wav", "text": "noise"},
        {"audio_filepath": "header_only.wav", "text": "nothing"},
        {"audio_filepath": "good.wav", "text": "?!"},
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    result = load_corpus(manifest)
    assert [u.text for u in result.utterances] == ["fine"]
    assert dict(result.skipped) == {
        "missing_audio": 1,
        "empty_audio": 2,
        "unreadable_audio": 1,
        "empty_text": 1,
    }
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("warning: skipping ") for line in err)
    for name in ("missing.wav", "empty.wav", "random.wav", "header_only.wav"):
        assert sum(name in line for line in err) == 1
    assert "skipped: empty_audio=2" in result.summary()


def test_invalid_json_line_names_the_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio_filepath": "a.wav", "text": "x"}\n\n{not json\n')
    with pytest.raises(UserError, match=r"m\.jsonl line 3: not valid JSON"):
        load_corpus(manifest)
    manifest.write_text('{"audio_filepath": "a.wav"}\n')
    with pytest.raises(UserError, match=r"line 1: missing key 'text'"):
        load_corpus(manifest)
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="is not a corpus"):
        load_corpus(tmp_path / "folder")


def test_load_splits_holds_out_whole_sentences(tmp_path):
    rows = []
    for i in range(60):
        _wav(tmp_path / "wavs" / f"u{i}.wav", 0.05, seed=i)
        rows.append(f"u{i}|sentence number {i % 20}|")
    (tmp_path / "metadata.csv").write_text("\n".join(rows))
    splits = load_splits(tmp_path, dev_fraction=0.3, seed=1)
    train = {u.normalized_text for u in splits["train"].utterances}
    dev = {u.normalized_text for u in splits["dev"].utterances}
    assert train and dev and not train & dev
    assert len(splits["train"].utterances) + len(splits["dev"].utterances) == 60
