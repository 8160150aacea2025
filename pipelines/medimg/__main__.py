"""Command line of the medical imaging pipeline: `python -m pipelines.medimg COMMAND ...`.

Commands:

- `make-dataset --out DIR [--scans N] [--seed S]`: build the synthetic lesion benchmark
  (`synth.py`): NIfTI scans and masks plus `datalist.csv`.
- `inspect SCAN [SCAN ...] [--volume N] [--json]`: read scans as the pipeline does and print
  their geometry, or one error line per unusable file (exit code 2 if any failed).
- `train [--config FILE.yaml] [--data CSV] [--out DIR] [key=value ...]`: train a classifier
  (`train.py`); without arguments on the built-in dataset with the default model.
- `evaluate --model PATH --data CSV [--json]`: AUC with its bootstrap interval, accuracy,
  sensitivity, specificity, ROC and confusion PNGs, heatmap quality (`evaluate.py`).
- `predict SCAN [SCAN ...] [--model PATH] [--out DIR] [--json]`: probability, label and a
  heatmap on each scan's own grid (`predict.py`).

This module only parses arguments and calls functions that tests can call directly. Each
command is a pair: `_add_<command>(subparsers)` declares its arguments and sets `handler`, and
the handler takes the parsed `argparse.Namespace` and returns an exit code. A new command
(`train`, `evaluate`, `predict`) is one more pair and one more entry in `COMMANDS`. A
`toolkit.errors.UserError` raised by a handler becomes one `error: ...` line on stderr and exit
code 2 (`pipelines.common.cli.run_command`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.common.cli import USER_ERROR_EXIT_CODE, run_command
from toolkit.errors import UserError

PROG = "python -m pipelines.medimg"


# --------------------------------------------------------------------------------------------
# make-dataset


def _add_make_dataset(subparsers) -> None:
    from pipelines.medimg.synth import DEFAULT_SCANS

    parser = subparsers.add_parser(
        "make-dataset",
        help="build the synthetic lesion benchmark (NIfTI scans, masks, datalist.csv)",
        description=(
            "Insert synthetic lesions into nilearn's packaged MNI152 brain MRI, with random "
            "deformations, bias fields, noise, voxel sizes and orientations. Half the scans have "
            "lesions; the true masks are written too. Deterministic per seed."
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: the shared data folder, "
        "$ATTENTION_TOOLKIT_HOME/medimg/synthetic-v<version>-n<scans>-seed<seed>)",
    )
    parser.add_argument(
        "--scans",
        type=int,
        default=DEFAULT_SCANS,
        help=f"number of scans (default {DEFAULT_SCANS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="global seed (default 0)")
    parser.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: all cores)"
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even if the folder holds this dataset"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_make_dataset)


def _make_dataset(args: argparse.Namespace) -> int:
    from pipelines.medimg.datasets import read_csv_datalist
    from pipelines.medimg.synth import dataset_is_complete, default_dataset_dir, make_dataset

    if args.scans < 2:
        raise UserError(f"--scans must be at least 2, got {args.scans}")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    out = args.out if args.out is not None else default_dataset_dir(args.scans, args.seed)
    reused = not args.force and dataset_is_complete(out, args.scans, args.seed)
    started = time.perf_counter()
    datalist_path = make_dataset(
        out,
        scans=args.scans,
        seed=args.seed,
        workers=args.workers,
        progress=not args.no_progress,
        force=args.force,
    )
    seconds = time.perf_counter() - started
    counts = read_csv_datalist(datalist_path, strict=True).counts()
    verb = "reused" if reused else f"built in {seconds:.1f} s"
    print(f"{datalist_path}\t{args.scans} scans {verb}")
    for name, row in counts.items():
        print(f"  {name}: {row['scans']} scans, {row['positives']} with lesions")
    return 0


# --------------------------------------------------------------------------------------------
# inspect


def _add_inspect(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="read scans as the pipeline does and print their geometry",
        description=(
            "Read each NIfTI scan with the pipeline's loader and print path, shape, voxel size, "
            "orientation and data type; unusable files get one error line each (exit code 2), "
            "the others are still read."
        ),
    )
    parser.add_argument("scans", nargs="+", type=Path, metavar="SCAN", help="NIfTI files")
    parser.add_argument(
        "--volume", type=int, default=None, help="volume index to read from 4D files"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per scan")
    parser.set_defaults(handler=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    from pipelines.medimg.io import load_scan

    failed = 0
    for path in args.scans:
        try:
            scan = load_scan(path, volume=args.volume)
        except UserError as error:
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
            failed += 1
            continue
        info = {
            "path": str(path),
            "shape": list(scan.shape),
            "spacing": [round(v, 4) for v in scan.spacing],
            "orientation": scan.orientation,
            "dtype": str(scan.header.get_data_dtype()),
            "volume": scan.volume,
            "num_volumes": scan.num_volumes,
            "nonfinite_voxels": scan.nonfinite_count,
            "notes": scan.notes,
        }
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            shape = "x".join(str(n) for n in scan.shape)
            spacing = "x".join(f"{v:g}" for v in info["spacing"])
            notes = "; ".join(scan.notes)
            print(
                f"{path}\t{shape}\t{spacing} mm\t{scan.orientation}\t{info['dtype']}\t{notes}",
                flush=True,
            )
    return USER_ERROR_EXIT_CODE if failed else 0


# --------------------------------------------------------------------------------------------
# train


def _add_train(subparsers) -> None:
    from pipelines.common.config import add_config_arguments

    parser = subparsers.add_parser(
        "train",
        help="train a lesion classifier (default: attention-gated CNN on the built-in data)",
        description=(
            "Train a classifier. Without --data the built-in synthetic benchmark is built (or "
            "reused) in the toolkit's data folder. Writes model.keras, config.yaml and "
            "metrics.json to --out; the same --out again resumes an interrupted run. "
            "--config takes a YAML file or a shipped config name (tiny, vit)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--data", type=Path, default=None, help="datalist CSV or JSON")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default runs/medimg/<timestamp>)"
    )
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI (default: the local store)"
    )
    parser.add_argument("--no-progress", action="store_true", help="one line per epoch")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from pipelines.common.config import dump_config
    from pipelines.medimg.train import resolve_config, train

    overrides = list(args.overrides)
    if args.tracking_uri is not None:
        overrides.append(f"tracking_uri={args.tracking_uri}")
    config = resolve_config(args.config, overrides)
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    metrics = train(config, data=args.data, out=args.out, progress=not args.no_progress)
    split = metrics["evaluated_split"]
    result = metrics[split]
    print(
        f"{metrics['out']}\t{split} AUC {result['auc']:.3f}\tpointing game "
        f"{result['pointing_game']:.3f}\trelevance mass {result['relevance_mass']:.3f}",
        flush=True,
    )
    if metrics["skipped"]:
        print(f"skipped {len(metrics['skipped'])} datalist entries (see metrics.json)")
    return 0


# --------------------------------------------------------------------------------------------
# evaluate


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="AUC, sensitivity, specificity and heatmap quality of a model on a datalist",
        description=(
            "Evaluate a model on a datalist (the test split if it has one). Writes roc.png, "
            "confusion.png and evaluation.json to --out (default <model folder>/evaluation)."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="model.keras from train")
    parser.add_argument("--data", type=Path, required=True, help="datalist CSV or JSON")
    parser.add_argument(
        "--split",
        default="auto",
        choices=("auto", "all", "train", "val", "test"),
        help="rows to evaluate (auto: the test split if the list has one, else all rows)",
    )
    parser.add_argument(
        "--methods",
        default="native,gradcam",
        help="heatmap methods to score, comma-separated (native, gradcam)",
    )
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold")
    parser.add_argument("--out", type=Path, default=None, help="folder for plots and JSON")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(handler=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    from pipelines.medimg.evaluate import evaluate, format_summary, json_ready

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ("native", "gradcam")]
    if unknown or not methods:
        raise UserError(f"--methods must list native and/or gradcam, got {args.methods!r}")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    summary = evaluate(
        args.model,
        args.data,
        split=args.split,
        methods=methods,
        threshold=args.threshold,
        out=args.out,
        progress=not args.no_progress and not args.json,
    )
    if args.json:
        print(json.dumps(json_ready(summary)), flush=True)
    else:
        print(format_summary(summary), flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# predict


def _add_predict(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify scans and write heatmaps aligned with each scan",
        description=(
            "Print path<TAB>label<TAB>probability per scan and write <name>_heatmap.nii.gz "
            "(the scan's shape and affine), <name>_heatmap.png and <name>.json to --out. "
            "Unreadable files get one error line each (exit code 2); the others go on."
        ),
    )
    parser.add_argument("scans", nargs="+", type=Path, metavar="SCAN", help="NIfTI files")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model.keras (default: the newest runs/medimg/*/model.keras)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/medimg/predictions/<timestamp>)",
    )
    parser.add_argument(
        "--method",
        default=None,
        choices=("native", "gradcam"),
        help="heatmap method (default: native where the model has attention maps)",
    )
    parser.add_argument("--volume", type=int, default=None, help="volume index of 4D files")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold")
    parser.add_argument("--json", action="store_true", help="print one JSON object per scan")
    parser.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    from pipelines.medimg.predict import predict, print_error, print_result

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold}")
    _, failures = predict(
        args.scans,
        model_path=args.model,
        out=args.out,
        method=args.method,
        volume=args.volume,
        threshold=args.threshold,
        on_result=lambda result: print_result(result, as_json=args.json),
        on_error=print_error,
    )
    return USER_ERROR_EXIT_CODE if failures else 0


# --------------------------------------------------------------------------------------------

COMMANDS = (_add_make_dataset, _add_inspect, _add_train, _add_evaluate, _add_predict)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every command's subparser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Lesion classification of NIfTI scans with attention heatmaps.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default `sys.argv[1:]`), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    return run_command(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
