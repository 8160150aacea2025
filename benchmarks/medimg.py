"""Medical benchmark: lesion AUC and heatmap quality against the keras.io 3D CNN, and predict speed.

    python -m benchmarks.medimg [--minutes 30] [--scans 600] [--config FILE] [--out DIR]
                                [--skip-baseline] [--markdown-out docs/benchmarks.md]

1. Builds (or reuses) the built-in synthetic dataset of `--scans` scans (toolkit data folder).
2. Trains the default model (`configs/default.yaml`, or `--config`) with `train` for at most
   `--minutes` of training time (`optim.max_minutes`), then evaluates the best model on the
   test split: AUC (bootstrap 95% interval), pointing game, relevance mass and its ratio to
   chance, for its native heatmaps and for Grad-CAM.
3. Trains the keras.io baseline (`benchmarks/medimg_baseline.py`) on the same data, grid and
   budget, with the same loop, and evaluates it with Grad-CAM.
4. Times `predict` of the trained default model on one 197 x 233 x 189 scan (the 1 mm MNI152
   template nilearn ships): the split load / preprocess / model / heatmap / writing of a warm
   call, the first call in the process, and the whole command in a fresh process.

Targets (issue #6): test AUC >= 0.95, pointing game >= 0.90, relevance mass >= 10x chance in 30
minutes on a 2-core CPU; baseline: equal or better AUC, clearly better heatmaps; predict <= 3 s.
Prints a Markdown table; `--markdown-out` appends it to a file. Tracking is off (nothing is
written to the MLflow store) unless `--tracking` is given.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import keras

from benchmarks.report import append_markdown, cpu_name, fmt


def _train(name, config, datalist, out, model_fn=None, progress=True):
    from pipelines.medimg.train import train

    print(f"== training {name} for at most {config.optim.max_minutes} min -> {out}", flush=True)
    started = time.perf_counter()
    metrics = train(config, data=datalist, out=out, progress=progress, model_fn=model_fn)
    metrics["wall_seconds"] = time.perf_counter() - started
    return metrics


def _rows(name, metrics):
    split = metrics["evaluated_split"]
    result = metrics[split]
    rows = []
    for method, block in result["heatmaps"].items():
        low, high = result["auc_ci95"]
        rows.append(
            f"| {name} | {metrics['parameters'] / 1e6:.2f} M | {len(metrics['epochs'])} | "
            f"{fmt(metrics['train_scans_per_second'], 1)} | {fmt(result['auc'])} "
            f"({fmt(low)}-{fmt(high)}) | {fmt(result['sensitivity'])} / "
            f"{fmt(result['specificity'])} | {method} | {fmt(block['pointing_game'])} | "
            f"{fmt(block['relevance_mass'], 4)} ({fmt(block['relevance_ratio'], 1)}x) | "
            f"{fmt(block['iou_top_k'])} |"
        )
    return rows


def _by_size(name, metrics):
    result = metrics[metrics["evaluated_split"]]
    lines = []
    for method, block in result["heatmaps"].items():
        for size, row in block["by_size"].items():
            lines.append(
                f"| {name} | {method} | {size} | {row['scans']} | {fmt(row['pointing_game'])} "
                f"| {fmt(row['relevance_ratio'], 1)}x |"
            )
    return lines


def time_predict(model_path: Path, out: Path) -> dict:
    """Timings of `predict` on the 197 x 233 x 189 MNI152 T1 (in process and as a command)."""
    from pipelines.medimg.predict import load_model, predict_scan
    from pipelines.medimg.synth import template_paths

    scan = template_paths()["t1"]
    start = time.perf_counter()
    model = load_model(model_path)
    load_model_seconds = time.perf_counter() - start
    start = time.perf_counter()
    first = predict_scan(model, scan, out / "first", model_path=model_path)
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    warm = predict_scan(model, scan, out / "warm", model_path=model_path)
    warm_seconds = time.perf_counter() - start
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    command = [sys.executable, "-m", "pipelines.medimg", "predict", str(scan), "--model",
               str(model_path), "--out", str(out / "command")]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    command_seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
    return {
        "scan_shape": warm["scan_shape"],
        "load_model_s": load_model_seconds,
        "first_call_s": first_seconds,
        "first_split": first["timings_s"],
        "warm_s": warm_seconds,
        "warm_split": warm["timings_s"],
        "command_s": command_seconds,
    }


def run(args) -> str:
    from benchmarks.medimg_baseline import build_baseline
    from pipelines.medimg.train import resolve_config, resolve_datalist

    out = args.out or Path("runs") / "benchmarks" / f"medimg-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [
        f"optim.max_minutes={args.minutes}",
        f"data.builtin_scans={args.scans}",
        f"data.builtin_seed={args.seed}",
        f"tracking={'on' if args.tracking else 'off'}",
        *args.overrides,
    ]
    config = resolve_config(args.config, overrides)
    load_before = os.getloadavg()[0]
    datalist = resolve_datalist(config, progress=not args.no_progress)
    results = {}
    results[config.model.name] = _train(
        config.model.name, config, datalist, out / config.model.name,
        progress=not args.no_progress,
    )  # fmt: skip
    if not args.skip_baseline:
        baseline = resolve_config(args.config, [*overrides, "evaluation.heatmap_methods=[gradcam]"])
        results["keras.io 3D CNN (baseline)"] = _train(
            "baseline", baseline, datalist, out / "baseline", model_fn=build_baseline,
            progress=not args.no_progress,
        )  # fmt: skip
    main_metrics = next(iter(results.values()))
    timing = time_predict(Path(main_metrics["out"]) / "model.keras", out / "predict")
    load_after = os.getloadavg()[0]

    lines = [
        "## Medical imaging: lesion classification and heatmaps (`benchmarks/medimg.py`)",
        "",
        f"Command: `python -m benchmarks.medimg --minutes {args.minutes} --scans {args.scans}"
        f"{' --config ' + str(args.config) if args.config else ''}`. Machine: "
        f"{os.cpu_count()} cores ({cpu_name()}), Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}; load average {load_before:.1f} before and "
        f"{load_after:.1f} after. Data: built-in synthetic dataset, {args.scans} scans "
        f"(seed {args.seed}), grid {list(config.preprocess.shape)} at "
        f"{list(config.preprocess.spacing)} mm; each model trained for at most {args.minutes} "
        "min (early stopping on validation AUC), best validation epoch evaluated on the test "
        "split. Heatmap metrics in scanner space (each scan's stored grid): pointing game with "
        "a 1-voxel tolerance, relevance mass (ratio to chance = lesion volume share), IoU of "
        f"the top {config.evaluation.top_k_percent:g}% voxels.",
        "",
        "| model | parameters | epochs | train scans/s | test AUC (95% CI) | sens. / spec. | "
        "heatmap | pointing game | relevance mass (x chance) | IoU top-k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, metrics in results.items():
        lines.extend(_rows(name, metrics))
    lines += ["", "| model | heatmap | lesion size | scans | pointing game | relevance x chance |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, metrics in results.items():
        lines.extend(_by_size(name, metrics))
    warm = timing["warm_split"]
    first = timing["first_split"]
    shape = "x".join(str(n) for n in timing["scan_shape"])
    lines += [
        "",
        f"`predict` of the default model on one {shape} scan (MNI152 T1, 1 mm):",
        "",
        "| call | load | preprocess | model | heatmap | writing | total |",
        "|---|---|---|---|---|---|---|",
        f"| warm (second scan in the process) | {warm['load']:.2f} s | {warm['preprocess']:.2f} s"
        f" | {warm['model']:.2f} s | {warm['heatmap']:.2f} s | {warm['writing']:.2f} s | "
        f"{timing['warm_s']:.2f} s |",
        f"| first scan (after loading the model: {timing['load_model_s']:.2f} s) | "
        f"{first['load']:.2f} s | {first['preprocess']:.2f} s | {first['model']:.2f} s | "
        f"{first['heatmap']:.2f} s | {first['writing']:.2f} s | {timing['first_call_s']:.2f} s |",
        f"| whole command in a new process (imports, model loading) | | | | | | "
        f"{timing['command_s']:.2f} s |",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.medimg", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per model")
    parser.add_argument("--scans", type=int, default=600, help="built-in dataset size")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--config", default=None, help="config of the main model (default)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--skip-baseline", action="store_true", help="train only the main model")
    parser.add_argument("--tracking", action="store_true", help="log both runs to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--markdown-out", type=Path, default=None, help="append the table here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    from pipelines.common.cli import run_command

    def body():
        table = run(args)
        print(table)
        if args.markdown_out is not None:
            append_markdown(args.markdown_out, "\n" + table)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
