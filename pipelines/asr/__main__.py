"""Command line of the speech pipeline: `python -m pipelines.asr <command> ...`.

Commands:
    make-corpus   synthesise the built-in speech corpus (espeak-ng, flite)
    train         train a recognizer (default config: configs/transformer.yaml)
    transcribe    turn audio files into text with a trained model
    evaluate      WER/CER and decoding speed of a trained model on a manifest

Each command has an `_add_<command>` function that declares its arguments and a handler that
only turns them into a call of a library function, so tests call the same functions directly.
User errors (`toolkit.errors.UserError`) print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.common.cli import run_command


def _make_corpus(args: argparse.Namespace) -> int:
    from pipelines.asr import corpus

    summary = corpus.build_corpus(
        args.out if args.out is not None else corpus.default_corpus_dir(),
        utterances=args.utterances,
        seed=args.seed,
        workers=args.workers,
        augment_fraction=args.augment_fraction,
        progress=not args.no_progress,
    )
    print(summary.line())
    return 0


def _add_make_corpus(subparsers) -> None:
    from pipelines.asr.corpus import DEFAULT_AUGMENT_FRACTION, DEFAULT_UTTERANCES

    parser = subparsers.add_parser(
        "make-corpus",
        help="synthesise the built-in speech corpus",
        description=(
            "Synthesise English speech with espeak-ng (and flite when installed) from the "
            "sentences of Debian's fortunes files: 16 kHz WAVs plus train/dev/test.jsonl "
            "manifests with disjoint sentences. Deterministic per seed; existing files are reused."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: the built-in corpus location under the toolkit home)",
    )
    parser.add_argument(
        "--utterances",
        type=int,
        default=DEFAULT_UTTERANCES,
        help=f"number of utterances over all splits (default {DEFAULT_UTTERANCES}, about 15 h)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel synthesis jobs (default: all cores)"
    )
    parser.add_argument(
        "--augment-fraction",
        type=float,
        default=DEFAULT_AUGMENT_FRACTION,
        help=f"fraction of training utterances with noise and gain (default {DEFAULT_AUGMENT_FRACTION})",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_make_corpus)


def _train(args: argparse.Namespace) -> int:
    from pipelines.asr import train
    from pipelines.common.config import dump_config

    overrides = list(args.overrides)
    if args.tracking_uri is not None:
        overrides.append(f"tracking_uri={args.tracking_uri}")
    config = train.resolve_config(args.config, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    metrics = train.train(config, data=args.data, out=args.out, progress=not args.no_progress)
    print(
        f"best dev CER {metrics['best_dev_cer']:.2%}, WER {metrics['best_dev_wer']:.2%} "
        f"(epoch {metrics['best_epoch'] + 1}); model in {metrics['out']}"
    )
    return 0


def _add_train(subparsers) -> None:
    from pipelines.common.config import add_config_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a recognizer",
        description=(
            "Train an attention encoder-decoder recognizer. With no arguments: build (or reuse) "
            "the built-in corpus and train the default config. Writes model.keras, config.yaml "
            "and metrics.json to --out; running again with the same --out resumes."
        ),
    )
    parser.add_argument("--data", type=Path, default=None, help="corpus (default: built-in)")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/asr/<timestamp>/)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the local store)",
    )
    add_config_arguments(parser)
    parser.set_defaults(handler=_train)


def _transcribe(args: argparse.Namespace) -> int:
    from pipelines.asr.transcribe import transcribe_files

    return transcribe_files(
        args.audio,
        model_path=args.model,
        beam_size=args.beam,
        ctc_weight=args.ctc_weight,
        lm_weight=args.lm_weight,
        json_output=args.json,
        alignment_dir=args.alignment_png,
        max_segment_seconds=args.max_segment_seconds,
    )


def _add_transcribe(subparsers) -> None:
    parser = subparsers.add_parser(
        "transcribe",
        help="transcribe audio files",
        description="Print `path<TAB>text` per audio file (or JSON lines with --json).",
    )
    parser.add_argument("audio", nargs="+", help="audio files (WAV, FLAC, OGG)")
    parser.add_argument(
        "--model", type=Path, default=None, help="model.keras (default: newest in runs/asr/)"
    )
    _add_decoding_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument(
        "--alignment-png", type=Path, default=None, help="save attention alignment plots here"
    )
    _add_segment_argument(parser)
    parser.set_defaults(handler=_transcribe)


def _add_decoding_arguments(parser) -> None:
    from pipelines.asr.ctc import DEFAULT_BEAM_SIZE, DEFAULT_CTC_WEIGHT
    from pipelines.asr.lm import DEFAULT_LM_WEIGHT

    saved = "default: the model's own setting, from its training config, else"
    parser.add_argument(
        "--beam",
        type=int,
        default=None,
        help=f"beam width; 1 = greedy ({saved} {DEFAULT_BEAM_SIZE})",
    )
    parser.add_argument(
        "--ctc-weight",
        type=float,
        default=None,
        help=f"CTC prefix score weight ({saved} {DEFAULT_CTC_WEIGHT:g})",
    )
    parser.add_argument(
        "--lm-weight",
        type=float,
        default=None,
        help="weight of the model's language model in beam search; 0 = none "
        f"({saved} {DEFAULT_LM_WEIGHT:g})",
    )


def _add_segment_argument(parser) -> None:
    from pipelines.asr.segment import DEFAULT_MAX_SECONDS

    parser.add_argument(
        "--max-segment-seconds",
        type=float,
        default=DEFAULT_MAX_SECONDS,
        help="recordings longer than this are decoded in segments cut at pauses "
        f"(default {DEFAULT_MAX_SECONDS:g})",
    )


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from pipelines.asr.evaluate import evaluate, format_report

    result = evaluate(
        args.model,
        args.data,
        beam_size=args.beam,
        ctc_weight=args.ctc_weight,
        lm_weight=args.lm_weight,
        batch_size=args.batch_size,
        limit=args.limit,
        max_segment_seconds=args.max_segment_seconds,
    )
    print(json.dumps(result) if args.json else format_report(result))
    return 0


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="WER/CER and speed of a model on a manifest",
        description="Decode a corpus and report WER, CER, S/D/I counts and real-time factor.",
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="model.keras (default: newest in runs/asr/)"
    )
    parser.add_argument("--data", type=Path, required=True, help="manifest (.jsonl) or corpus")
    _add_decoding_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="greedy batch size")
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _add_segment_argument(parser)
    parser.set_defaults(handler=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command's sub-parser."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.asr", description="Attention-based speech recognition pipeline."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="command", required=True)
    for add in (_add_make_corpus, _add_train, _add_transcribe, _add_evaluate):
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` and run the command; returns the exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
