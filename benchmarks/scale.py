"""Scale benchmark: throughput, model FLOP utilisation and quality of each default training.

    python -m benchmarks.scale [--pipeline asr|medimg|both] [--minutes 10] [--config NAME]
                               [--out DIR] [--tracking] [--markdown-out docs/benchmarks.md]
                               [key=value | asr.key=value | medimg.key=value ...]

Trains each pipeline's default configuration (`--config` picks another shipped one, e.g.
`tiny`) on its built-in data (built on first use, reused afterwards) for `--minutes` of training
time (`optim.max_minutes`), under whatever backend `KERAS_BACKEND` selects, and reports:

- steps and examples per second: training steps x `data.batch_size` / training seconds (the
  epochs' training loops, without the per-epoch validation; XLA compilations included);
- the data-loader share of that time (`loader_share`, `pipelines/common/scale.py`);
- compile: on JAX, the seconds spent in the training steps that met a new batch shape (XLA
  compilation, the ASR buckets each compile once);
- FLOPs per step: on JAX, XLA's cost analysis of the training step (`model.train_step`, forward,
  gradients and optimizer update) lowered for every batch shape the training met, averaged over
  the steps. These are model FLOPs: the program as written, before XLA's rewrites; attention
  is counted as XLA's own implementation computes it even where cuDNN's fused kernel runs.
  TensorFlow: n/a;
- achieved FLOP/s = FLOPs per step x steps / training seconds, and the model FLOP utilisation
  (MFU) = achieved / (the GPU's dense peak for the precision x devices), the peak from
  `PEAK_TFLOPS` (NVIDIA's data sheets; bf16/fp16 tensor cores for the mixed precisions, TF32
  for `float32`, JAX's default for float32 matrix products on these GPUs). n/a on a CPU or an
  unknown device;
- quality reached: ASR best dev CER / WER (greedy), medical best validation AUC and test AUC.

`--out` must be a new folder (default `runs/benchmarks/scale-<timestamp>/`, one subfolder per
pipeline). Unprefixed `key=value` overrides go to every pipeline's config, `asr.key=value` and
`medimg.key=value` to one. Tracking is off unless `--tracking` (then MLflow records the runs and
their system metrics, GPU utilisation and memory included). Prints one Markdown table;
`--markdown-out` appends it to a file; `scale.json` in the output folder holds every figure.
A GPU user runs, on a machine with JAX and no TensorFlow:

    KERAS_BACKEND=jax python -m benchmarks.scale --minutes 30 --tracking
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import keras

from benchmarks.report import append_markdown, cpu_name, fmt
from toolkit.errors import UserError

PIPELINES = ("asr", "medimg")

# Dense (no sparsity) peak TFLOP/s from NVIDIA's data sheets: (16-bit tensor cores, TF32 tensor
# cores), matched in order against `jax.devices()[0].device_kind` (e.g. "NVIDIA H100 80GB HBM3"
# is the SXM H100). The data sheets give the sparse figures: twice these.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100 NVL", 835.5, 417.5),
    ("H200 NVL", 835.5, 417.5),
    ("GH200", 989.4, 494.7),
    ("H200", 989.4, 494.7),
    ("H100", 989.4, 494.7),
    ("A100", 312.0, 156.0),
)


def peak_flops(device_kind: str, precision: str) -> tuple[float, str] | None:
    """The dense peak FLOP/s of one device for a Keras dtype policy, and what it is.

    Args:
        device_kind: str. The device's name (`jax.devices()[0].device_kind`).
        precision: str. `"mixed_bfloat16"`, `"mixed_float16"` or `"float32"`.

    Returns:
        `(flops_per_second, label)`, e.g. `(989.4e12, "bf16 dense")`, or `None` for a device
        not in `PEAK_TFLOPS` (CPUs among them).
    """
    kind = device_kind.upper()
    for name, half, tf32 in PEAK_TFLOPS:
        if name.upper() in kind:
            if precision == "float32":
                return tf32 * 1e12, "tf32 dense"
            label = "fp16" if precision == "mixed_float16" else "bf16"
            return half * 1e12, f"{label} dense"
    return None


def model_flops_utilisation(achieved, device_kind, precision, devices=1):
    """`(mfu, peak_label)`: `achieved` FLOP/s over `devices` x the device's peak, else `None`.

    Example: 400 TFLOP/s on one H100 SXM in bfloat16 is `(0.404..., "bf16 dense")`.
    """
    peak = peak_flops(device_kind, precision)
    if peak is None or achieved is None:
        return None
    return achieved / (peak[0] * devices), peak[1]


def count_flops(fn, *args) -> float | None:
    """FLOPs of `jax.jit(fn)(*args)` by XLA's cost analysis of the lowered (unoptimised) program.

    `args` may be arrays or `jax.ShapeDtypeStruct`s; nothing is compiled or run. A matrix
    product `(M, K) x (K, N)` counts `2 M K N`. `None` where XLA gives no count.
    """
    import jax

    cost = jax.jit(fn).lower(*args).cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None and flops >= 0 else None


@contextlib.contextmanager
def _xla_attention():
    """Trace `jax.nn.dot_product_attention` with XLA's implementation (countable FLOPs).

    Keras' JAX backend asks for cuDNN's fused attention on a GPU; that is one custom call whose
    FLOPs XLA's cost analysis does not see.
    """
    import jax

    original = jax.nn.dot_product_attention

    def xla_only(*args, implementation=None, **kwargs):
        return original(*args, implementation="xla", **kwargs)

    jax.nn.dot_product_attention = xla_only
    try:
        yield
    finally:
        jax.nn.dot_product_attention = original


def _spec(array):
    import jax

    return jax.ShapeDtypeStruct(tuple(array.shape), array.dtype)


def train_step_flops(model: keras.Model, data) -> float | None:
    """FLOPs of one training step of a compiled Keras model (JAX backend) on a batch like `data`.

    The step is the JAX trainer's `model.train_step(state, data)`: forward pass, loss,
    gradients, optimizer update and metrics, with the state (trainable, non-trainable,
    optimizer and metrics variables) as the model holds it. The optimizer must be built (after
    `fit`, or `model.optimizer.build(model.trainable_variables)`).

    Args:
        model: a compiled `keras.Model`.
        data: the batch `(x, y, sample_weight)` as the trainer passes it, arrays or
            `jax.ShapeDtypeStruct`s.

    Returns:
        The FLOPs (`count_flops`), or `None` where XLA gives no count.
    """
    import jax

    from pipelines.common.scale import without_distribution

    state = tuple(
        [_spec(v) for v in variables]
        for variables in (
            model.trainable_variables,
            model.non_trainable_variables,
            model.optimizer.variables,
            model.metrics_variables,
        )
    )
    data = jax.tree.map(_spec, data)
    with without_distribution(), _xla_attention():
        return count_flops(model.train_step, state, data)


class StepRecorder(keras.callbacks.Callback):
    """Counts training steps; on JAX also the batch shapes and the time of their first steps.

    On JAX it wraps the trainer's `train_function` (made by `fit` before `on_train_begin`) to
    see each batch as the step takes it: `shapes` counts the steps of each batch signature
    (structure, shapes, dtypes), `compile_seconds` adds up the calls that met a new signature
    (JAX traces and compiles the step then). `flops()` then prices every signature once.
    """

    def __init__(self):
        super().__init__()
        self.steps = 0
        self.shapes = Counter()
        self.specs = {}
        self.compile_seconds = 0.0
        self._original = None

    def on_train_begin(self, logs=None):
        if keras.backend.backend() != "jax" or self.model.train_function is None:
            return
        self._original = original = self.model.train_function
        recorder = self

        class Recording:
            def __init__(self, iterator):
                self.iterator = iterator
                self.new_shape = False

            def __iter__(self):
                return self

            def __next__(self):
                data = next(self.iterator)
                recorder._record(data, self)
                return data

        def train_function(state, iterator):
            recording = Recording(iterator)
            start = time.perf_counter()
            result = original(state, recording)
            if recording.new_shape:
                recorder.compile_seconds += time.perf_counter() - start
            return result

        self.model.train_function = train_function

    def _record(self, data, recording):
        import jax

        leaves, treedef = jax.tree.flatten(data)
        key = (treedef, tuple((tuple(a.shape), str(a.dtype)) for a in leaves))
        if key not in self.specs:
            self.specs[key] = jax.tree.map(_spec, data)
            recording.new_shape = True
        self.shapes[key] += 1

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1

    def on_train_end(self, logs=None):
        if self._original is not None:
            self.model.train_function = self._original
            self._original = None

    def flops(self) -> float | None:
        """Total FLOPs of the recorded steps (JAX), or `None` (TensorFlow, no XLA count)."""
        if not self.shapes:
            return None
        total = 0.0
        for key, steps in self.shapes.items():
            flops = train_step_flops(self.model, self.specs[key])
            if flops is None:
                return None
            total += flops * steps
        return total


def device_name() -> tuple[str, str]:
    """`(name, platform)` of the backend's first device, e.g. `("NVIDIA H100 80GB HBM3", "gpu")`."""
    from pipelines.common.scale import accelerator

    platform = accelerator()
    if platform == "cpu":
        return f"{cpu_name()} ({os.cpu_count()} cores)", platform
    if keras.backend.backend() == "jax":
        import jax

        return jax.devices()[0].device_kind, platform
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return details.get("device_name", "GPU"), platform
    return platform, platform


def split_overrides(overrides) -> dict[str, list[str]]:
    """`key=value` for every pipeline, `asr.key=value` / `medimg.key=value` for one."""
    result = {name: [] for name in PIPELINES}
    for item in overrides:
        head, _, rest = item.partition(".")
        if head in PIPELINES and rest:
            result[head].append(rest)
        else:
            for name in PIPELINES:
                result[name].append(item)
    return result


def _quality(name, metrics) -> tuple[str, dict]:
    if name == "asr":
        cer, wer = metrics.get("best_dev_cer"), metrics.get("best_dev_wer")
        text = f"dev CER {_percent(cer)} / WER {_percent(wer)}"
        return text, {"best_dev_cer": cer, "best_dev_wer": wer}
    split = metrics.get("evaluated_split", "test")
    val_auc, test_auc = metrics.get("best_val_auc"), metrics.get(split, {}).get("auc")
    text = f"val AUC {fmt(val_auc)} / {split} AUC {fmt(test_auc)}"
    return text, {"best_val_auc": val_auc, f"{split}_auc": test_auc}


def _percent(value):
    return "n/a" if value is None else f"{value:.1%}"


def run_pipeline(name, minutes, config=None, overrides=(), out=None, tracking=False,
                 progress=True) -> dict:  # fmt: skip
    """Train one pipeline for `minutes` and measure it (one row of the table, as a dict)."""
    if name == "asr":
        from pipelines.asr.train import resolve_config, train
    elif name == "medimg":
        from pipelines.medimg.train import resolve_config, train
    else:
        raise ValueError(f"pipeline must be one of {PIPELINES}. Received: {name!r}")
    settings = [f"optim.max_minutes={minutes}", f"tracking={'on' if tracking else 'off'}"]
    config = resolve_config(config, [*settings, *overrides])
    if out is not None and (Path(out) / "config.yaml").exists():
        # `train` would resume that run: its epochs would mix with this one's steps.
        raise UserError(f"{out} already holds a training run; give the benchmark a new --out")
    keras.backend.clear_session()
    recorder = StepRecorder()
    print(f"== {name}: training for at most {minutes:g} min -> {out}", file=sys.stderr, flush=True)
    metrics = train(config, out=out, callbacks=[recorder], progress=progress)
    train_seconds = sum(epoch["train_seconds"] for epoch in metrics["epochs"])
    print(f"== {name}: counting FLOPs of {len(recorder.shapes)} batch shapes", file=sys.stderr,
          flush=True)  # fmt: skip
    total_flops = recorder.flops()
    steps = recorder.steps
    device, platform = device_name()
    devices = metrics.get("devices", 1)
    row = {
        "pipeline": name,
        "backend": keras.backend.backend(),
        "device": device,
        "platform": platform,
        "devices": devices,
        "precision": metrics.get("precision"),
        "budget_minutes": minutes,
        "steps": steps,
        "batch_shapes": len(recorder.shapes) or None,
        "train_seconds": train_seconds,
        "compile_seconds": recorder.compile_seconds if recorder.shapes else None,
        "examples_per_second": (
            steps * config.data.batch_size / train_seconds if train_seconds else None
        ),
        "loader_share": metrics.get("loader_share"),
        "flops_per_step": total_flops / steps if total_flops is not None and steps else None,
        "achieved_flops": (
            total_flops / train_seconds if total_flops is not None and train_seconds else None
        ),
        "peak": None,
        "mfu": None,
        "parameters": metrics.get("parameters"),
        "out": metrics.get("out"),
    }
    row["quality"], row["quality_values"] = _quality(name, metrics)
    if platform != "cpu":
        utilisation = model_flops_utilisation(
            row["achieved_flops"], device, row["precision"] or "float32", devices
        )
        if utilisation is not None:
            row["mfu"], row["peak"] = utilisation
    return row


def _si(value, unit):
    if value is None:
        return "n/a"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def table(rows, command: str) -> str:
    """The Markdown section: what ran where, then one row per pipeline."""
    import platform as platform_module

    first = rows[0]
    machine = first["device"]
    if first["platform"] != "cpu":
        machine += f" ({cpu_name()}, {os.cpu_count()} CPU cores)"
    versions = f"Keras {keras.__version__}, backend {first['backend']}"
    if first["backend"] == "jax":
        import jax

        versions += f" (JAX {jax.__version__})"
    lines = [
        f"### Scale: throughput and FLOP utilisation ({time.strftime('%Y-%m-%d')}, "
        f"backend {first['backend']}, {first['device']})",
        "",
        f"Command: `{command}`. Machine: {machine}, {platform_module.system()}; {versions}. "
        "Each pipeline trained for at most the budget on its built-in data. Examples/s = steps x batch size / training "
        "seconds (XLA compilation included, its share in `compile`); FLOPs/step = XLA cost "
        "analysis of the training step, mean over the batch shapes met; MFU = achieved / "
        "dense peak of the device for the precision.",
        "",
        "| backend | device | precision | pipeline | budget | steps | compile | examples/s | "
        "loader share | FLOPs/step | achieved FLOP/s | MFU | quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        device = row["device"] if row["devices"] == 1 else f"{row['devices']} x {row['device']}"
        compile_ = "n/a" if row["compile_seconds"] is None else f"{row['compile_seconds']:.0f} s"
        share = "n/a" if row["loader_share"] is None else f"{row['loader_share']:.1%}"
        mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%} of {row['peak']}"
        if row["mfu"] is None and row["platform"] == "cpu":
            mfu = "n/a (CPU)"
        lines.append(
            f"| {row['backend']} | {device} | {row['precision']} | {row['pipeline']} | "
            f"{row['budget_minutes']:g} min | {row['steps']} | {compile_} | "
            f"{fmt(row['examples_per_second'], 2)} | {share} | "
            f"{_si(row['flops_per_step'], 'FLOP')} | {_si(row['achieved_flops'], 'FLOP/s')} | "
            f"{mfu} | {row['quality']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pipeline", choices=[*PIPELINES, "both"], default="both")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget each")
    parser.add_argument("--config", default=None, help="a shipped config name or YAML file")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--tracking", action="store_true", help="log the runs to MLflow")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--markdown-out", type=Path, default=None, help="append the table here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)
    from pipelines.common.cli import run_command

    def body():
        out = args.out or Path("runs") / "benchmarks" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}"
        names = PIPELINES if args.pipeline == "both" else (args.pipeline,)
        overrides = split_overrides(args.overrides)
        rows = [
            run_pipeline(name, args.minutes, args.config, overrides[name], out / name,
                         tracking=args.tracking, progress=not args.no_progress)
            for name in names
        ]  # fmt: skip
        given = " ".join(argv if argv is not None else sys.argv[1:])
        command = f"KERAS_BACKEND={keras.backend.backend()} python -m benchmarks.scale {given}"
        text = table(rows, command.strip())
        out.mkdir(parents=True, exist_ok=True)
        (out / "scale.json").write_text(json.dumps(rows, indent=2, default=str))
        print(text)
        if args.markdown_out is not None:
            append_markdown(args.markdown_out, "\n" + text)
        return 0

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
