"""Benchmark of the attention implementations against `keras.layers.MultiHeadAttention`.

    python -m benchmarks.attention [--backend tensorflow|jax] [--lengths 256,1024] [--repeats 3]

For each sequence length (batch 1, 4 heads, head size 64, float32, CPU) it times
`toolkit.ops.scaled_dot_product_attention` with the explicit, fused and chunked implementations
on (B, T, 4, 64) query/key/value, `keras.layers.MultiHeadAttention(4, 64)` on (B, T, 256) inputs
(it includes the four projections) and `toolkit.layers.MultiHeadAttention(4, 64)` on the same
inputs for a like-for-like ratio. Each configuration runs in a fresh subprocess: compiled
(`tf.function` on TensorFlow, `jax.jit` on JAX), one warm-up call, then the median of
`--repeats` timed calls. Peak memory is the growth of the process's maximum resident set size
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) from just before the first call to the end, which
covers compilation, the inputs' copies and every intermediate. Configurations whose estimated
memory exceeds the limit are reported as skipped rather than run. The table is printed and
appended to `docs/benchmarks.md` with the date, machine, backend and command.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BATCH, HEADS, HEAD_DIM = 1, 4, 64
CONFIGS = ("explicit", "fused", "chunked", "keras_mha", "toolkit_mha")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192, 16384)
DOC_HEADER = (
    "# Benchmarks\n\n"
    "Measured numbers only, each with the machine and the command that produced it. Sections are\n"
    "appended by `python -m benchmarks.<name>`.\n"
)


def _estimated_bytes(config, length):
    """Rough peak of a configuration: quadratic ones hold about three (B, N, T, T) float32 arrays."""
    linear = 64 * length * HEADS * HEAD_DIM * 4 + 512 * 2**20
    if config == "chunked":
        return linear
    if config == "toolkit_mha" and length * length >= 2048 * 2048:
        return linear  # "auto" picks the chunked path there
    return 3 * BATCH * HEADS * length * length * 4 + linear


def _available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _maxrss_bytes():
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage if sys.platform == "darwin" else usage * 1024


def _worker(config, length, repeats, backend):
    """Runs in the subprocess: time one configuration and print a JSON line."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    from toolkit.layers import MultiHeadAttention
    from toolkit.ops import scaled_dot_product_attention

    rng = np.random.default_rng(0)
    if config in ("keras_mha", "toolkit_mha"):
        x = rng.normal(size=(BATCH, length, HEADS * HEAD_DIM)).astype("float32")
        cls = keras.layers.MultiHeadAttention if config == "keras_mha" else MultiHeadAttention
        layer = cls(num_heads=HEADS, key_dim=HEAD_DIM)
        layer.build((BATCH, length, HEADS * HEAD_DIM), (BATCH, length, HEADS * HEAD_DIM))
        args = (x, x)

        def fn(q, v):
            return layer(q, v)

    else:
        q = rng.normal(size=(BATCH, length, HEADS, HEAD_DIM)).astype("float32")
        args = (q, q, q)

        def fn(q, k, v):
            return scaled_dot_product_attention(q, k, v, implementation=config)

    if backend == "tensorflow":
        import tensorflow as tf

        # Without XLA: on CPU TensorFlow's own kernels were faster for every configuration here.
        compiled = tf.function(fn, jit_compile=False)
        args = tuple(tf.constant(a) for a in args)
    else:
        import jax

        compiled = jax.jit(fn)
        args = tuple(jax.numpy.asarray(a) for a in args)
    before = _maxrss_bytes()
    np.asarray(compiled(*args))  # warm-up and compilation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.asarray(compiled(*args))
        times.append(time.perf_counter() - start)
    peak = _maxrss_bytes() - before
    print(json.dumps({"time_ms": 1e3 * statistics.median(times), "peak_mb": peak / 2**20}))


def run_config(config, length, repeats, backend, limit_bytes):
    """One configuration in a fresh subprocess: {"time_ms", "peak_mb"} or {"status"}."""
    estimate = _estimated_bytes(config, length)
    if estimate > limit_bytes:
        return {"status": f"skipped (est. {estimate / 2**30:.1f} GB)"}
    cmd = [
        sys.executable, "-m", "benchmarks.attention", "--worker", config, str(length),
        "--backend", backend, "--repeats", str(repeats),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr or "OOM" in proc.stderr:
            return {"status": "OOM"}
        tail = proc.stderr.strip().splitlines()[-1:] or ["?"]
        return {"status": f"failed: {tail[0][:60]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results, lengths):
    lines = [
        "| T | config | time (ms) | peak memory (MB) | speed vs keras MHA |",
        "|---:|---|---:|---:|---:|",
    ]
    for length in lengths:
        keras_ms = results[(length, "keras_mha")].get("time_ms")
        for config in CONFIGS:
            r = results[(length, config)]
            if "time_ms" not in r:
                lines.append(f"| {length} | {config} | {r['status']} | | |")
                continue
            ratio = f"{keras_ms / r['time_ms']:.2f}x" if keras_ms else "n/a"
            lines.append(
                f"| {length} | {config} | {r['time_ms']:.1f} | {r['peak_mb']:.0f} | {ratio} |"
            )
    return "\n".join(lines)


def _machine():
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = f", {mem:.0f} GiB RAM" if mem else ""
    return f"{platform.platform()}, {cpu}, {os.cpu_count()} CPUs{memory}, Python {platform.python_version()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="tensorflow", choices=("tensorflow", "jax"))
    parser.add_argument(
        "--lengths", default=",".join(map(str, DEFAULT_LENGTHS)), help="comma-separated T values"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration")
    parser.add_argument(
        "--max-memory-gb", type=float, default=16.0, help="skip configurations estimated above"
    )
    parser.add_argument("--output", default="docs/benchmarks.md", help="markdown file to append to")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.repeats, args.backend)
        return 0
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        print(
            f"error: --lengths must be comma-separated ints, got {args.lengths!r}", file=sys.stderr
        )
        return 2
    limit = args.max_memory_gb * 2**30
    available = _available_bytes()
    if available is not None:
        limit = min(limit, 0.8 * available)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    started = time.time()
    results = {}
    for length in lengths:
        for config in CONFIGS:
            results[(length, config)] = run_config(
                config, length, args.repeats, args.backend, limit
            )
            r = results[(length, config)]
            print(f"  T={length} {config}: {r}", file=sys.stderr, flush=True)
    table = format_table(results, lengths)
    command = "python -m benchmarks.attention " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    import keras

    record = (
        f"\n## Attention ({datetime.date.today().isoformat()}, backend {args.backend})\n\n"
        f"- Command: `{command.strip()}`\n"
        f"- Machine: {_machine()}\n"
        f"- Keras {keras.__version__}; batch {BATCH}, {HEADS} heads, head size {HEAD_DIM}, "
        f"float32, CPU; median of {args.repeats} calls after one warm-up call, compiled "
        f"({'tf.function' if args.backend == 'tensorflow' else 'jax.jit'}).\n"
        f"- explicit/fused/chunked: `toolkit.ops.scaled_dot_product_attention` on (1, T, 4, 64) "
        f"Q/K/V, no projections. keras_mha: `keras.layers.MultiHeadAttention(4, 64)` on (1, T, 256) "
        f"inputs, projections included; toolkit_mha: `toolkit.layers.MultiHeadAttention(4, 64)` "
        f"(`auto` implementation) on the same inputs. Speed vs keras = keras time / config time.\n"
        f"- Peak memory: growth of `ru_maxrss` in a fresh subprocess per configuration, from just "
        f"before the first call to the end (compilation and intermediates included). Skipped: "
        f"estimated above {limit / 2**30:.1f} GB (the smaller of --max-memory-gb and 80% of free "
        f"memory).\n"
        f"- The 2-core machine was shared with other jobs (1-minute load average {load:.1f} at "
        f"the start); timings are noisy. Total run time {time.time() - started:.0f} s.\n\n"
        f"{table}\n"
    )
    print(record)
    if not args.no_record:
        exists = os.path.exists(args.output)
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "a") as f:
            if not exists:
                f.write(DOC_HEADER)
            f.write(record)
        print(f"appended to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
