"""Property-based tests (hypothesis): text normalisation, ASR manifests, medimg CSV datalists.

Each property runs on generated inputs far outside what the example-based tests spell out:
any Unicode text, file names with quotes, commas, Unicode line separators and non-Latin
scripts, optional columns in any order, every accepted spelling of labels and splits.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipelines.asr.data import Utterance, load_corpus, write_manifest
from pipelines.asr.text import CHARACTERS, normalize_text, number_to_words
from pipelines.medimg.datasets import read_csv_datalist

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
FILE_SETTINGS = settings(max_examples=60, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

# Text: any code point but surrogates (not encodable), weighted towards the characters that
# normalisation treats specially.
SPECIAL = "'\u2019\u2018`\u00b4\u02bc\"&-_/.,0123456789 \t\n\u2028\u0085\u00e9\u00df\u0130\u00bd"
any_text = st.text(
    st.one_of(
        st.characters(blacklist_categories=("Cs",)),
        st.sampled_from(SPECIAL),
        st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ"),
    ),
    max_size=80,
)
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")


# --------------------------------------------------------------------------------------------
# Text normalisation.


@SETTINGS
@given(any_text, st.sampled_from(["spell", "drop"]))
@example("9" * 5000, "spell")  # longer than Python's int-from-string limit (4300 digits)
@example("'a''b' ''", "spell")
def test_normalize_text_output_is_clean_and_idempotent(text, digits):
    out = normalize_text(text, digits=digits)
    assert set(out) <= set(CHARACTERS)
    assert out == out.strip() and "  " not in out
    # Every token is a word; apostrophes only inside words.
    assert all(WORD.fullmatch(token) for token in out.split(" ") if out)
    assert normalize_text(out, digits=digits) == out


@FILE_SETTINGS  # from_regex draws slowly: fewer examples
@given(st.lists(st.from_regex(WORD, fullmatch=True), min_size=1, max_size=12))
def test_normalized_words_are_kept_as_they_are(words):
    text = " ".join(words)
    assert normalize_text(text) == text
    # Case, surrounding punctuation and spacing do not matter.
    assert normalize_text(f'  "{text.upper()}"!? ') == text


@SETTINGS
@given(st.integers(0, 10**18))
def test_numbers_are_spelled_as_number_to_words(number):
    spelled = normalize_text(str(number))
    assert spelled == number_to_words(number)
    assert normalize_text(f"{number:,}") == spelled  # thousands separators
    assert set(spelled) <= set("abcdefghijklmnopqrstuvwxyz ")


# --------------------------------------------------------------------------------------------
# ASR manifests (JSON lines).

name_part = st.text(
    st.one_of(
        st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
        st.sampled_from("\"',; #%&\u2028\u0085\u00e9\u4e2d"),
    ),
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", "..") and s.strip() == s and not s.startswith("~")
         and len(s.encode()) < 200)  # fmt: skip
transcript = any_text.filter(lambda t: normalize_text(t) != "")
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=5,
)  # fmt: skip
meta = st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda k: k not in ("audio_filepath", "text",
                                                                "duration")),
    json_value,
    max_size=3,
)  # fmt: skip
entry = st.tuples(
    st.lists(name_part, min_size=1, max_size=3),  # sub-folders and file name
    st.booleans(),  # inside the manifest's folder (written relative) or outside (absolute)
    transcript,
    st.floats(0.0, 1e4, allow_nan=False),
    meta,
)


@FILE_SETTINGS
@given(st.lists(entry, min_size=1, max_size=6))
@example([(["a\u2028b"], True, "line\u2028separator \u0085 next", 1.5, {})])
@example([(['q"uote', "it's, ok"], False, 'say "hi", \\ back', 2.0, {"k": "v\u2029"})])
def test_manifest_round_trip(entries):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        utterances = []
        for k, (parts, inside, text, duration, extra) in enumerate(entries):
            base = root / "corpus" if inside else root / "elsewhere"
            audio = base.joinpath(*parts[:-1], f"{k}_{parts[-1]}.wav")
            audio.parent.mkdir(parents=True, exist_ok=True)
            audio.write_bytes(b"RIFF")  # exists and is not empty: enough without check_audio
            utterances.append(Utterance(str(audio), text, duration, audio.stem, extra))
        manifest = write_manifest(utterances, root / "corpus" / "m.jsonl")
        for line, utt in zip(manifest.read_text(encoding="utf-8").split("\n"), utterances):
            written = json.loads(line)["audio_filepath"]
            assert Path(written).is_absolute() != utt.audio_filepath.startswith(
                str(root / "corpus")
            )
        result = load_corpus(manifest, check_audio=False)
        assert not result.skipped
        assert result.utterances == utterances  # path, text, duration and id
        assert [u.meta for u in result.utterances] == [u.meta for u in utterances]


# --------------------------------------------------------------------------------------------
# medimg CSV datalists.

LABELS = {1: ["1", "1.0", "true", "Yes", "POSITIVE", " 1 "], 0: ["0", "0.0", "False", "no",
                                                                 "negative", " 0"]}  # fmt: skip
SPLIT_SPELLINGS = {
    "train": ["train", "Training", "TRAIN"],
    "val": ["val", "valid", "Validation"],
    "test": ["test", "Testing"],
}
row = st.fixed_dictionaries(
    {
        "image": st.lists(name_part, min_size=1, max_size=3),
        "absolute": st.booleans(),
        "label": st.sampled_from([0, 1]),
        "label_spelling": st.integers(0, 5),
        "mask": st.one_of(st.none(), st.lists(name_part, min_size=1, max_size=2)),
        "subject": st.one_of(st.none(), st.integers(0, 4)),
        "split": st.one_of(st.none(), st.sampled_from(["train", "val", "test"])),
        "split_spelling": st.integers(0, 2),
    }
)
optional_columns = st.lists(st.sampled_from(["mask", "split", "subject"]), unique=True)


@FILE_SETTINGS
@given(st.lists(row, min_size=1, max_size=6), optional_columns, st.randoms(use_true_random=False))
@example(
    [{"image": ["line\u2028sep", 'q"uote'], "absolute": False, "label": 1, "label_spelling": 0,
      "mask": ["m,ask\u0085"], "subject": 1, "split": "val", "split_spelling": 2}],
    ["mask", "split", "subject"],
    None,
)  # fmt: skip
def test_csv_datalist_round_trip(rows, optional, rng):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data = root / "data"
        data.mkdir()
        subject_split: dict[int, str | None] = {}
        expected = []
        for k, spec in enumerate(rows):
            image = data.joinpath(*spec["image"][:-1], f"{k}_{spec['image'][-1]}.nii.gz")
            mask = None
            if "mask" in optional and spec["mask"] is not None:
                mask = data.joinpath(*spec["mask"][:-1], f"{k}_{spec['mask'][-1]}_mask.nii")
            for path in (image, mask):
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(b"x")
            subject = spec["subject"] if "subject" in optional else None
            split = spec["split"] if "split" in optional else None
            if subject is not None and split is not None:
                # One split per subject (else the datalist is, rightly, an error).
                split = subject_split.setdefault(subject, split)
            expected.append((image, spec["label"], mask, split,
                             None if subject is None else f"patient {subject}"))  # fmt: skip

        columns = ["image", "label", *optional]
        if rng is not None:
            rng.shuffle(columns)
        header = [c.upper() if i % 2 else c for i, c in enumerate(columns)]
        table = root / "data" / "list.csv"
        with open(table, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            for spec, (image, label, mask, split, subject) in zip(rows, expected):
                values = {
                    "image": str(image) if spec["absolute"] else image.relative_to(data).as_posix(),
                    "label": LABELS[label][spec["label_spelling"]],
                    "mask": "" if mask is None else mask.relative_to(data).as_posix(),
                    "split": "" if split is None else SPLIT_SPELLINGS[split][
                        spec["split_spelling"] % len(SPLIT_SPELLINGS[split])],
                    "subject": "" if subject is None else subject,
                }  # fmt: skip
                writer.writerow([values[c] for c in columns])

        datalist = read_csv_datalist(table)
        assert datalist.skipped == []
        got = [(r.image, r.label, r.mask, r.split, r.subject) for r in datalist.records]
        assert got == expected
        assert all(r.source.startswith(f"{table}:") for r in datalist.records)
