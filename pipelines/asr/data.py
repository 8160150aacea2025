"""Corpora users bring, loaded to one kind of utterance record.

Three layouts load to identical `Utterance` records (absolute audio path, transcript, duration
from the audio header, id = the audio file's stem):

- a JSON-lines manifest, one utterance a line:
  `{"audio_filepath": "wavs/a.wav", "text": "...", "duration": 2.1}` (the NeMo convention);
  relative paths resolve against the manifest's folder; extra keys are kept in `Utterance.meta`;
- an LJSpeech folder: `metadata.csv` with `id|text|normalized text` lines and `wavs/<id>.wav`
  (the normalised column is used when present, else the text column);
- a plain folder of `name.wav` + `name.txt` pairs (searched recursively).

A folder holding `train.jsonl` / `dev.jsonl` / `test.jsonl` (the built-in corpus) is a split
corpus: `load_splits` returns its splits; for any other corpus it holds out a dev split by
transcript, so no sentence is in both.

Bad input never stops loading: a missing, unreadable, empty (zero-length) audio file or a
transcript with no usable characters after `normalize_text` is skipped with one warning line on
stderr naming the file, and counted in `LoadResult.skipped` (reason -> count) for the run's
summary. A manifest line that is not valid JSON (or lacks `audio_filepath`/`text`) raises
`UserError` naming the file and line number, since the whole manifest is then suspect.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import soundfile

from pipelines.asr.text import normalize_text
from toolkit.errors import UserError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
SPLIT_NAMES = ("train", "dev", "test")
SKIP_REASONS = ("missing_audio", "unreadable_audio", "empty_audio", "empty_text")


@dataclasses.dataclass(frozen=True)
class Utterance:
    """One utterance.

    Attributes:
        audio_filepath: str. Absolute path of the audio file.
        text: str. The transcript as given.
        duration: float. Seconds, from the audio header (rounded to 1e-6 s).
        id: str. The audio file name without extension.
        meta: dict. Extra manifest keys (e.g. voice, augmentation); not part of equality.
    """

    audio_filepath: str
    text: str
    duration: float
    id: str
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def normalized_text(self) -> str:
        """`normalize_text(self.text)`."""
        return normalize_text(self.text)


@dataclasses.dataclass
class LoadResult:
    """Utterances loaded from one source and the entries skipped, by reason."""

    utterances: list[Utterance]
    skipped: Counter = dataclasses.field(default_factory=Counter)
    source: str = ""

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def hours(self) -> float:
        return sum(u.duration for u in self.utterances) / 3600.0

    def summary(self) -> str:
        """One line: `N utterances (H h) from SOURCE; skipped: reason=n, ...`."""
        line = f"{len(self.utterances)} utterances ({self.hours:.2f} h) from {self.source}"
        if self.skipped:
            line += "; skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return line


def warn(message: str) -> None:
    """Print one warning line on stderr (the pipelines' format for skipped inputs)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def load_corpus(path: str | Path, check_audio: bool = True) -> LoadResult:
    """Load a manifest file, an LJSpeech folder or a folder of `.wav` + `.txt` pairs.

    Args:
        path: str or Path. A `.jsonl`/`.json` manifest, or a folder. A folder with `train.jsonl`
            loads that split (use `load_splits` for all splits).
        check_audio: bool. Read each audio header: skip missing/unreadable/empty files and take
            durations from the header. With `False` only file existence is checked and durations
            come from the manifest (`0.0` when absent). Defaults to `True`.

    Returns:
        `LoadResult` with the kept utterances in source order and the skip counts.

    Raises:
        UserError: the path does not exist or is not a recognised corpus; a manifest line is not
            valid JSON or lacks `audio_filepath`/`text`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"corpus path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            entries = _ljspeech_entries(path)
        else:
            entries = _manifest_entries(path)
    elif (path / "train.jsonl").is_file():
        entries = _manifest_entries(path / "train.jsonl")
    elif (path / "metadata.csv").is_file():
        entries = _ljspeech_entries(path / "metadata.csv")
    else:
        entries = _pair_entries(path)
        if not entries:
            raise UserError(
                f"{path} is not a corpus: expected a .jsonl manifest, an LJSpeech folder "
                "(metadata.csv + wavs/) or a folder of name.wav + name.txt pairs"
            )
    return _check(entries, str(path), check_audio)


def load_splits(
    path: str | Path, dev_fraction: float = 0.05, seed: int = 0, check_audio: bool = True
) -> dict[str, LoadResult]:
    """Load a corpus as `{"train": ..., "dev": ..., ["test": ...]}`.

    A folder with `train.jsonl` and `dev.jsonl` (and optionally `test.jsonl`) gives those
    splits. Any other corpus is split here: whole transcripts (normalised) are assigned to dev
    with probability `dev_fraction`, by a seeded hash, so no sentence is in both splits.
    """
    path = Path(path).expanduser()
    if path.is_dir() and (path / "train.jsonl").is_file():
        if not (path / "dev.jsonl").is_file():
            raise UserError(f"{path} has train.jsonl but no dev.jsonl")
        splits = {}
        for name in SPLIT_NAMES:
            manifest = path / f"{name}.jsonl"
            if manifest.is_file():
                splits[name] = load_corpus(manifest, check_audio=check_audio)
        return splits
    if not 0.0 < dev_fraction < 1.0:
        raise UserError(f"dev_fraction must be in (0, 1). Received: dev_fraction={dev_fraction}")
    result = load_corpus(path, check_audio=check_audio)
    train, dev = [], []
    for utt in result.utterances:
        digest = hashlib.sha256(f"{seed}:{utt.normalized_text}".encode()).digest()
        (dev if int.from_bytes(digest[:8], "big") / 2**64 < dev_fraction else train).append(utt)
    return {
        "train": LoadResult(train, result.skipped, f"{result.source} (train)"),
        "dev": LoadResult(dev, Counter(), f"{result.source} (dev)"),
    }


def write_manifest(utterances, path: str | Path, relative_to: str | Path | None = None) -> Path:
    """Write utterances as a JSON-lines manifest (`audio_filepath`, `text`, `duration`, meta keys).

    Paths are written relative to `relative_to` (default: the manifest's folder) when they are
    inside it, else absolute. The file is written atomically.
    """
    path = Path(path)
    base = Path(relative_to) if relative_to is not None else path.parent
    base = base.absolute()
    lines = []
    for utt in utterances:
        audio = Path(utt.audio_filepath)
        try:
            audio_text = audio.absolute().relative_to(base).as_posix()
        except ValueError:
            audio_text = str(audio.absolute())
        record: dict[str, Any] = {
            "audio_filepath": audio_text,
            "text": utt.text,
            "duration": utt.duration,
        }
        record.update({k: v for k, v in utt.meta.items() if k not in record})
        lines.append(json.dumps(record, ensure_ascii=False, sort_keys=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# Readers: each returns (audio path, text, manifest duration or None, meta) tuples.


def _manifest_entries(manifest: Path):
    try:
        # Split at "\n" only: str.splitlines() also splits at U+2028, U+0085 and other
        # separators that json.dumps(ensure_ascii=False) leaves unescaped inside strings.
        lines = manifest.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read manifest {manifest}: {error}") from None
    base = manifest.parent.absolute()
    entries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{manifest} line {number}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{manifest} line {number}: expected a JSON object")
        missing = [k for k in ("audio_filepath", "text") if k not in record]
        if missing:
            raise UserError(f"{manifest} line {number}: missing key {missing[0]!r}")
        audio, text = record.pop("audio_filepath"), record.pop("text")
        if not isinstance(audio, str) or not isinstance(text, str):
            raise UserError(f"{manifest} line {number}: audio_filepath and text must be strings")
        duration = record.pop("duration", None)
        audio_path = Path(audio).expanduser()
        if not audio_path.is_absolute():
            audio_path = base / audio_path
        entries.append((audio_path, text, duration, record))
    return entries


def _ljspeech_entries(metadata: Path):
    wavs = metadata.parent / "wavs"
    entries = []
    try:
        with metadata.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="|", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read {metadata}: {error}") from None
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise UserError(f"{metadata} line {number}: expected 'id|text|normalized text'")
        text = row[2] if len(row) > 2 and row[2].strip() else row[1]
        entries.append((wavs / f"{row[0].strip()}.wav", text, None, {}))
    return entries


def _pair_entries(folder: Path):
    entries = []
    for audio in sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS):
        transcript = audio.with_suffix(".txt")
        if not transcript.is_file():
            continue
        try:
            text = transcript.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        entries.append((audio, text, None, {}))
    return entries


def _check(entries, source: str, check_audio: bool) -> LoadResult:
    utterances, skipped = [], Counter()
    for audio, text, duration, meta in entries:
        audio = Path(audio).absolute()
        if not audio.is_file():
            warn(f"skipping {audio}: audio file not found")
            skipped["missing_audio"] += 1
            continue
        if audio.stat().st_size == 0:
            warn(f"skipping {audio}: empty audio file (0 bytes)")
            skipped["empty_audio"] += 1
            continue
        if check_audio:
            try:
                info = soundfile.info(str(audio))
            except Exception as error:  # libsndfile raises several types for corrupt files
                reason = str(error).split("\n")[0] or type(error).__name__
                warn(f"skipping {audio}: unreadable audio ({reason})")
                skipped["unreadable_audio"] += 1
                continue
            if info.frames <= 0 or info.samplerate <= 0:
                warn(f"skipping {audio}: empty audio (zero samples)")
                skipped["empty_audio"] += 1
                continue
            duration = round(info.frames / info.samplerate, 6)
        else:
            try:
                duration = float(duration) if duration is not None else 0.0
            except (TypeError, ValueError):
                duration = 0.0
        if not normalize_text(text):
            warn(f"skipping {audio}: transcript has no usable characters ({text[:40]!r})")
            skipped["empty_text"] += 1
            continue
        utterances.append(Utterance(str(audio), text, float(duration), audio.stem, dict(meta)))
    return LoadResult(utterances, skipped, source)
