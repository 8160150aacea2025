"""Speech recognizer benchmark: quality after a time budget, speed, and the keras.io baseline.

    python -m benchmarks.asr [--minutes 30] [--data CORPUS] [--config transformer]
                             [--model model.keras] [--baseline-minutes M | --no-baseline]
                             [--eval-utterances N] [--markdown-out docs/benchmarks.md]

1. Quality: trains the default config on the built-in corpus (or `--data`) for `--minutes` of
   wall time (`optim.max_minutes`), or takes an existing `--model`; reports the dev CER curve
   against training minutes, and test CER/WER with greedy decoding, with beam search (beam 4,
   the model's CTC weight) and, when the model has its language model, with beam search and the
   LM at its default weight (the default decoding) and with beam 8 and the LM. Targets (30 min,
   2-core CPU): CER <= 5 %, WER <= 15 % with beam search.
2. Speed: training utterances per second; decoding real-time factor for greedy (target <= 0.05)
   and beam 4 (target <= 0.2); cached vs uncached greedy decoding time for 100 output tokens
   (target >= 5x).
3. Baseline: the keras.io "Automatic Speech Recognition with Transformer" architecture
   (`benchmarks/asr_baseline.py`) trained on the same data for the same time; target: ours has
   at least 3x lower CER.

Prints a Markdown table; `--markdown-out` appends it to a file. This is a long run (the default
is 30 minutes of training per model): use `--minutes 1 --eval-utterances 10` for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.report import append_markdown, cpu_name


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_speedup(model, features, tokens=100, repeats=3) -> dict:
    """Seconds to greedily decode exactly `tokens` tokens with and without the decoder cache."""
    from pipelines.asr.decode import Decoder, pad_batch

    decoder = Decoder(model, max_length=tokens, suppress_end=True)
    batch, lengths = pad_batch([features])
    timings = {}
    for use_cache in (True, False):
        decoder.greedy(batch, lengths, use_cache=use_cache)  # compile
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            hyp = decoder.greedy(batch, lengths, use_cache=use_cache)[0]
            best = min(best, time.perf_counter() - start)
        assert len(hyp.tokens) == tokens, len(hyp.tokens)
        timings["cached" if use_cache else "uncached"] = best
    timings["speedup"] = timings["uncached"] / timings["cached"]
    return timings


def dev_curve(metrics: dict) -> list[tuple[float, float]]:
    minutes, curve = 0.0, []
    for epoch in metrics["epochs"]:
        minutes += epoch["train_seconds"] / 60.0
        curve.append((minutes, epoch["dev_cer"]))
    return curve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.asr", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0, help="training budget per model")
    parser.add_argument("--data", type=Path, default=None, help="corpus (default: built-in)")
    parser.add_argument("--config", default="transformer", help="config name or YAML file")
    parser.add_argument("--model", type=Path, default=None, help="skip training, use this model")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: temporary)")
    parser.add_argument("--baseline-minutes", type=float, default=None,
                        help="baseline budget (default: --minutes)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the keras.io baseline")
    parser.add_argument("--eval-utterances", type=int, default=200,
                        help="test utterances decoded (default 200)")
    parser.add_argument("--markdown-out", type=Path, default=None, help="append the table here")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    import keras

    from pipelines.asr import corpus as corpus_module
    from pipelines.asr.ctc import DEFAULT_BEAM_SIZE
    from pipelines.asr.data import load_splits
    from pipelines.asr.evaluate import evaluate
    from pipelines.asr.lm import DEFAULT_LM_WEIGHT
    from pipelines.asr.train import resolve_config, train
    from pipelines.asr.transcribe import feature_extractor_for, load_recognizer

    data = args.data or corpus_module.ensure_builtin_corpus()
    splits = load_splits(data)
    test_split = "test" if "test" in splits else "dev"
    test_manifest = Path(data) / f"{test_split}.jsonl"
    rows = []
    load_before = os.getloadavg()[0]

    metrics = None
    if args.model is None:
        out = args.out or Path(tempfile.mkdtemp(prefix="asr-bench-")) / "run"
        config = resolve_config(args.config, [
            f"optim.max_minutes={args.minutes}", "tracking=off", *args.overrides])
        log(f"training {config.model.architecture} for {args.minutes} min -> {out}")
        metrics = train(config, data=data, out=out, progress=False)
        model_path = out / "model.keras"
    else:
        model_path = args.model
        metrics_path = model_path.parent / "metrics.json"
        if metrics_path.is_file():
            metrics = json.loads(metrics_path.read_text())

    model = load_recognizer(model_path)
    results = {}
    decodings = [(1, 0.0), (DEFAULT_BEAM_SIZE, 0.0)]  # (beam, LM weight)
    if model.language_model is not None:  # the default decoding, then a wider beam
        decodings += [(DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT),
                      (2 * DEFAULT_BEAM_SIZE, DEFAULT_LM_WEIGHT)]  # fmt: skip
    for beam, lm_weight in decodings:
        log(f"evaluating beam {beam}, LM weight {lm_weight:g} on {args.eval_utterances} "
            f"{test_split} utterances")
        results[beam, lm_weight] = evaluate(model_path, test_manifest, beam_size=beam,
                                            lm_weight=lm_weight, limit=args.eval_utterances)
    default_lm_weight = DEFAULT_LM_WEIGHT if model.language_model is not None else 0.0
    best = results[DEFAULT_BEAM_SIZE, default_lm_weight]  # the default decoding
    extractor = feature_extractor_for(model)
    long_utt = max(splits[test_split].utterances[:50], key=lambda u: u.duration)
    speed = cache_speedup(model, extractor.compute(long_utt.audio_filepath))

    if metrics:
        curve = dev_curve(metrics)
        rows.append(("training utterances / s", f"{metrics['train_utterances_per_second']:.1f}",
                     "tens"))
        rows.append(("parameters", f"{metrics['parameters']:,}", ""))
        rows.append(("dev CER curve (min: CER)",
                     ", ".join(f"{m:.1f}: {c:.1%}" for m, c in curve), ""))
    if metrics and metrics.get("language_model"):
        lm = metrics["language_model"]
        kind = f"character {lm['order']}-gram LM"
        if lm.get("word_order"):
            kind = (f"word {lm['word_order']}-gram LM ({lm['vocabulary']:,} words, OOV rate "
                    f"{lm['oov_rate']:.1%}) over a {kind}")
        rows.append((f"{kind}, dev perplexity per character",
                     f"{lm['dev_perplexity']:.2f}", ""))
    for (beam, lm_weight), result in results.items():
        name = "greedy" if beam == 1 else f"beam {beam} + CTC {result['ctc_weight']:g}"
        if lm_weight:
            name += f" + LM {lm_weight:g}"
        rows.append((f"{test_split} CER / WER, {name}",
                     f"{result['cer']:.2%} / {result['wer']:.2%}",
                     "<= 5% / <= 15%" if result is best else ""))
    rows.append(("decoding RTF, greedy (batched)", f"{results[1, 0.0]['rtf']:.4f}", "<= 0.05"))
    for (beam, lm_weight), result in results.items():
        if beam > 1:
            name = f"beam {beam}" + (f" + LM {lm_weight:g}" if lm_weight else "")
            rows.append((f"decoding RTF, {name}", f"{result['rtf']:.4f}",
                         "<= 0.2" if beam == DEFAULT_BEAM_SIZE else ""))
    rows.append(("greedy 100 tokens: cached / uncached",
                 f"{speed['cached']:.3f} s / {speed['uncached']:.3f} s "
                 f"({speed['speedup']:.1f}x)", ">= 5x"))

    if not args.no_baseline:
        from benchmarks.asr_baseline import evaluate_baseline, train_baseline

        minutes = args.baseline_minutes or args.minutes
        keras.backend.clear_session()
        baseline, base_curve = train_baseline(
            splits["train"].utterances, splits["dev"].utterances[:100], minutes, log=log)
        base = evaluate_baseline(baseline, splits[test_split].utterances[: args.eval_utterances])
        rows.append((f"keras.io baseline {test_split} CER / WER ({minutes:g} min)",
                     f"{base['cer']:.2%} / {base['wer']:.2%}", ""))
        rows.append(("keras.io baseline dev CER curve",
                     ", ".join(f"{m:.1f}: {c:.1%}" for m, c in base_curve), ""))
        rows.append(("keras.io baseline RTF (uncached greedy)", f"{base['rtf']:.4f}", ""))
        ratio = base["cer"] / max(best["cer"], 1e-9)
        rows.append(("CER ratio baseline / ours (default decoding)", f"{ratio:.1f}x", ">= 3x"))

    header = (
        f"\n### ASR recognizer ({time.strftime('%Y-%m-%d')})\n\n"
        f"`python -m benchmarks.asr {' '.join(argv if argv is not None else sys.argv[1:])}` on "
        f"{cpu_name()} ({os.cpu_count()} cores, load {load_before:.1f} at start), Keras "
        f"{keras.__version__}, backend {keras.backend.backend()}; corpus {data}.\n\n"
        "| measure | value | target |\n|---|---|---|\n"
    )
    table = header + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)
    print(table)
    if args.markdown_out:
        append_markdown(args.markdown_out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
