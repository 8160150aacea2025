"""Speech data benchmark: corpus synthesis time and log-mel feature extraction speed.

    python -m benchmarks.asr_features [--utterances 600] [--workers N] [--markdown-out FILE]

Builds a built-in corpus of `--utterances` utterances in a temporary folder (synthesis time per
hour of audio), then extracts log-mel features of all of it:

- cold: `FeatureExtractor.prepare` with an empty cache and `--workers` threads (reading WAVs,
  computing features, writing the cache), and the same without the cache on one core
  (steady state, after a warm-up);
- cached: reading every utterance's features back from the cache.

Speeds are in seconds of audio per second of wall time (x real time). Targets: cold >= 300x on
2 cores, cached >= 5000x. Prints a Markdown table; `--markdown-out` appends it to a file.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import append_markdown, cpu_name
from pipelines.asr.corpus import DEFAULT_UTTERANCES, build_corpus
from pipelines.asr.data import load_splits
from pipelines.asr.features import FeatureExtractor, load_audio, log_mel, single_blas_thread


def run(utterances: int, workers: int, seed: int, keep: Path | None) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="asr-features-bench-"))
    try:
        corpus_dir = keep or tmp / "corpus"
        load_before = os.getloadavg()[0]
        summary = build_corpus(corpus_dir, utterances, seed, workers=workers, progress=False)
        audio_seconds = summary.hours * 3600
        build_per_hour = summary.seconds / summary.hours
        utts = [u for split in load_splits(corpus_dir).values() for u in split.utterances]

        cold = FeatureExtractor(cache_dir=tmp / "cache")
        start = time.perf_counter()
        prepared = cold.prepare(utts, workers=workers, progress=False)
        cold_seconds = time.perf_counter() - start
        assert len(prepared.utterances) == len(utts)

        # One core, in-process, steady state (librosa already imported and warmed up).
        log_mel(load_audio(utts[0].audio_filepath))
        with single_blas_thread():
            start = time.perf_counter()
            for u in utts:
                log_mel(load_audio(u.audio_filepath))
            single_seconds = time.perf_counter() - start

        start = time.perf_counter()
        for u in utts:
            cold.compute(u.audio_filepath)
        cached_seconds = time.perf_counter() - start
        load_after = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    default_hours = summary.hours * DEFAULT_UTTERANCES / utterances
    rows = [
        ("corpus synthesis", f"{summary.seconds:.1f} s for {summary.hours * 60:.1f} min of audio",
         f"{build_per_hour / 60:.1f} min per hour of audio; default corpus "
         f"({DEFAULT_UTTERANCES} utt., ~{default_hours:.1f} h) ~{build_per_hour * default_hours / 60:.1f} min"),
        (f"features cold, {workers} threads", f"{cold_seconds:.1f} s",
         f"{audio_seconds / cold_seconds:.0f}x real time (target >= 300x)"),
        ("features cold, 1 core steady state", f"{single_seconds:.1f} s",
         f"{audio_seconds / single_seconds:.0f}x real time"),
        ("features cached", f"{cached_seconds:.2f} s",
         f"{audio_seconds / cached_seconds:.0f}x real time (target >= 5000x)"),
    ]  # fmt: skip
    lines = [
        "## Speech data: corpus synthesis and log-mel features (`benchmarks/asr_features.py`)",
        "",
        f"Command: `python -m benchmarks.asr_features --utterances {utterances} "
        f"--workers {workers}`. Machine: {os.cpu_count()} cores ({cpu_name()}), "
        f"Python {platform.python_version()}; load average {load_before:.1f} before and "
        f"{load_after:.1f} after (the CPU was shared with other jobs). Corpus: {utterances} "
        f"utterances, {summary.hours * 60:.1f} min of 16 kHz audio; 80-band log-mel, 25 ms / 10 ms; "
        "the cold run includes the one-time import of librosa's filter module.",
        "",
        "| measurement | time | speed |",
        "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows],
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asr_features", description=__doc__)
    parser.add_argument("--utterances", type=int, default=600)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="build the corpus here (kept)")
    parser.add_argument("--markdown-out", type=Path, default=None, help="append the table here")
    args = parser.parse_args(argv)
    report = run(args.utterances, args.workers, args.seed, args.keep)
    print(report)
    if args.markdown_out is not None:
        append_markdown(args.markdown_out, "\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
