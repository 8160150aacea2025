"""Training the recognizer: configuration, data, callbacks, outputs and tracking.

`train(config, data=None, out=None)` runs one training:

1. resolves the corpus (`data.path`, else the built-in espeak-ng corpus, built on first use),
   caches log-mel features (`FeatureExtractor.prepare`) and computes the normalisation
   statistics on the training split; bad entries (missing, empty, unreadable audio, empty
   transcripts, recordings longer than the largest frame bucket) are skipped, each named in a
   warning line, counted, and reported in one `data: ...; skipped N (reason=n, ...)` line
   (and under `skipped` in `metrics.json`); training goes on with the rest;
2. builds the model named by `model.architecture` with the tokenizer, feature parameters and
   statistics inside it, and compiles it with Adam;
3. fits on bucketed batches (`ASRBatches`) with, in order: the learning-rate schedule
   (`optim.lr_schedule`: warm-up then linear decay to the end of the run, `LinearDecay`, by
   default; or the Noam schedule inside the optimizer), `DevEvaluation` (greedy decoding of
   the dev split each epoch, `dev_cer`/`dev_wer` in the logs, the best model saved as
   `model.keras`), the MLflow callback (loss, dev CER/WER, learning rate per epoch at steps
   0..E-1, an alignment plot of a fixed dev utterance per epoch, the final model),
   `EarlyStopping` on `dev_cer`, an optional time budget, and `BackupAndRestore`, so a killed
   run started again with the same `--out` continues from its last finished epoch;
4. writes `config.yaml` (the resolved configuration), `model.keras` and `metrics.json` in the
   output folder (default `runs/asr/<timestamp>/`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Literal

import keras
import numpy as np

from pipelines.asr.corpus import DEFAULT_UTTERANCES
from pipelines.asr.ctc import DEFAULT_BEAM_SIZE, DEFAULT_CTC_WEIGHT
from pipelines.asr.lm import (
    DEFAULT_LM_WEIGHT,
    DEFAULT_ORDER,
    DEFAULT_WORD_ORDER,
    CharNgramLM,
    WordNgramLM,
)
from pipelines.asr.model import ModelConfig, NoamSchedule, build_recognizer
from pipelines.common.callbacks import (
    InterruptAtSafePoints,
    LinearDecay,
    SafeBackupAndRestore,
    TimeBudget,
)
from pipelines.common.cli import interrupts_at_safe_points
from pipelines.common.config import config_to_dict, load_config, save_config
from pipelines.common.scale import Distribute, Precision, setup_scale
from toolkit.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_RUNS_DIR = Path("runs") / "asr"
MODEL_FILENAME = "model.keras"
CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.json"
HISTORY_FILENAME = "history.json"
LR_UPDATE_EVERY = 20  # batches between updates of the linear decay within an epoch


@dataclasses.dataclass
class DataConfig:
    """Where the data comes from and how it is batched."""

    path: str | None = None  # a corpus (manifest folder, LJSpeech, wav+txt); None = built-in
    builtin_utterances: int = DEFAULT_UTTERANCES  # size of the built-in corpus (about 15 h)
    max_train_utterances: int | None = None  # use only the first N training utterances
    max_dev_utterances: int | None = 300  # dev utterances decoded each epoch
    batch_size: int = 16
    frame_buckets: list[int] = dataclasses.field(
        default_factory=lambda: [256, 384, 512, 768, 1024, 1536, 2048]
    )
    token_buckets: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 192, 256])
    feature_cache: str = "default"  # a folder, "default" (under the toolkit home) or "off"
    workers: int = 1  # PyDataset worker threads

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive. Received: {self.batch_size}")


@dataclasses.dataclass
class OptimConfig:
    """Optimisation: Adam with a warm-up schedule, early stopping, time budget.

    `lr_schedule`: `linear` warms up over `warmup_steps`, then falls linearly to
    `final_lr_fraction` x `peak_learning_rate` at the end of the run (the epochs, or
    `max_minutes` when that ends training first; `LinearDecay`); `noam` warms up, then decays as
    `1/sqrt(step)` whatever the length of the run (`NoamSchedule`).
    """

    epochs: int = 100
    peak_learning_rate: float = 1e-3
    warmup_steps: int = 1000
    lr_schedule: Literal["linear", "noam"] = "linear"
    final_lr_fraction: float = 0.02
    beta_2: float = 0.98
    clipnorm: float | None = 5.0
    patience: int = 10  # epochs without a better dev CER before stopping
    max_minutes: float | None = None  # stop after this much training time

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be positive. Received: {self.epochs}")
        if self.peak_learning_rate <= 0:
            raise ValueError(f"peak_learning_rate must be positive: {self.peak_learning_rate}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be positive. Received: {self.warmup_steps}")
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(
                f"final_lr_fraction must be in [0, 1]. Received: {self.final_lr_fraction}"
            )


@dataclasses.dataclass
class DecodeConfig:
    """Decoding: defaults for `evaluate` and `transcribe` (stored inside the model).

    `lm_order`: the order of the character n-gram language model fitted on the training
    transcripts and saved inside `model.keras` for beam search (`pipelines.asr.lm`); 0: none.
    `word_lm_order`: the order of a word n-gram model over the training transcripts' words, read
    out character by character on top of the character model (which spells the words outside
    its lexicon); 0: the character model alone. It needs `lm_order` > 0.
    """

    beam_size: int = DEFAULT_BEAM_SIZE
    ctc_weight: float = DEFAULT_CTC_WEIGHT
    batch_size: int = 16
    lm_order: int = DEFAULT_ORDER
    lm_weight: float = DEFAULT_LM_WEIGHT
    word_lm_order: int = DEFAULT_WORD_ORDER

    def __post_init__(self):
        if self.lm_order < 0:
            raise ValueError(f"lm_order must not be negative. Received: {self.lm_order}")
        if self.word_lm_order < 0:
            raise ValueError(
                f"word_lm_order must not be negative. Received: {self.word_lm_order}"
            )
        if self.lm_weight < 0:
            raise ValueError(f"lm_weight must not be negative. Received: {self.lm_weight}")


@dataclasses.dataclass
class TrainConfig:
    """The whole training configuration (one YAML file in `pipelines/asr/configs/`)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    seed: int = 0
    # "auto", "true" or "false": Keras' jit_compile (XLA) on TensorFlow. JAX always compiles
    # (its uncompiled mode runs op by op, far too slow to train).
    jit_compile: str = "auto"
    tracking: str = "on"  # "on" or "off"
    tracking_uri: str | None = None
    # "auto" (float32 on CPU, mixed_bfloat16 on GPU/TPU), "float32", "mixed_bfloat16" or
    # "mixed_float16" (with loss scaling); see pipelines/common/scale.py.
    precision: Precision = "auto"
    distribute: Distribute = "none"  # or "data-parallel": every device (and host) shares a batch


def default_config_path() -> Path:
    return CONFIG_DIR / "transformer.yaml"


def resolve_config(config_path=None, overrides=()) -> TrainConfig:
    """The default config (`configs/transformer.yaml`) <- `config_path` <- `overrides`."""
    if config_path is not None and not Path(config_path).exists():
        named = CONFIG_DIR / f"{config_path}.yaml"
        if named.exists():  # `--config rnn` picks a shipped config by name
            config_path = named
    return load_config(
        TrainConfig, path=config_path, overrides=overrides, default_path=default_config_path()
    )


def default_out_dir() -> Path:
    return DEFAULT_RUNS_DIR / time.strftime("%Y%m%d-%H%M%S")


# ------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class PreparedData:
    """Features and token ids of the train and dev splits."""

    extractor: object
    stats: object
    tokenizer: object
    train: list
    train_frames: list
    dev: list
    dev_frames: list
    skipped: dict
    source: str


def prepare_data(config: TrainConfig, data=None, progress: bool = True) -> PreparedData:
    """Load the corpus, cache its features and compute the normalisation statistics."""
    from pipelines.asr import corpus
    from pipelines.asr import data as data_module
    from pipelines.asr.features import FeatureExtractor, FeatureParams, FeatureStats
    from pipelines.asr.tokenizer import CharTokenizer

    path = data if data is not None else config.data.path
    if path is None:
        path = corpus.ensure_builtin_corpus(
            utterances=config.data.builtin_utterances, progress=progress
        )
    splits = data_module.load_splits(path, seed=config.seed)
    train_utts = list(splits["train"].utterances)
    if config.data.max_train_utterances:
        train_utts = train_utts[: config.data.max_train_utterances]
    dev_utts = list(splits["dev"].utterances)
    if config.data.max_dev_utterances:
        dev_utts = dev_utts[: config.data.max_dev_utterances]
    if not train_utts:
        raise UserError(f"corpus {path} has no usable training utterances")
    if not dev_utts:
        raise UserError(f"corpus {path} has no usable dev utterances")
    cache = config.data.feature_cache
    cache_dir = None if cache == "off" else cache
    extractor = FeatureExtractor(FeatureParams(), cache_dir=cache_dir)
    # Bad entries of either split are skipped and counted (each named in a warning line).
    skipped = Counter(splits["train"].skipped) + Counter(splits["dev"].skipped)
    # Longer than the largest bucket: never batched, and a long dev utterance would make the
    # per-epoch decoding attend over its whole length. Dropped by the header's duration before
    # any features are computed (a 10-minute file would cost seconds and hundreds of MB), and
    # again by the computed frame counts below.
    longest = max(config.data.frame_buckets)
    params = extractor.params

    def header_frames(utts):
        return [params.num_frames(round(u.duration * params.sample_rate)) for u in utts]

    train_utts, _ = _drop_too_long(train_utts, header_frames(train_utts), longest, skipped)
    dev_utts, _ = _drop_too_long(dev_utts, header_frames(dev_utts), longest, skipped)
    if extractor.cache_dir is not None:
        # Worker processes pay a start-up cost: small corpora are faster in this process.
        workers = 0 if len(train_utts) + len(dev_utts) < 500 else None
        prepared = extractor.prepare(train_utts, workers=workers, progress=progress)
        train_utts, train_frames = prepared.utterances, prepared.num_frames
        skipped.update(prepared.skipped)
        prepared = extractor.prepare(dev_utts, workers=workers, progress=progress)
        dev_utts, dev_frames = prepared.utterances, prepared.num_frames
        skipped.update(prepared.skipped)
    else:
        train_utts, train_frames = _frames_uncached(extractor, train_utts, skipped)
        dev_utts, dev_frames = _frames_uncached(extractor, dev_utts, skipped)
    train_utts, train_frames = _drop_too_long(train_utts, train_frames, longest, skipped)
    dev_utts, dev_frames = _drop_too_long(dev_utts, dev_frames, longest, skipped)
    if not train_utts:
        raise UserError(f"corpus {path} has no usable training utterances")
    if not dev_utts:
        raise UserError(f"corpus {path} has no usable dev utterances")
    skipped = dict(skipped)
    stats = FeatureStats.from_features(extractor.compute(u.audio_filepath) for u in train_utts)
    return PreparedData(
        extractor=extractor,
        stats=stats,
        tokenizer=CharTokenizer(),
        train=train_utts,
        train_frames=train_frames,
        dev=dev_utts,
        dev_frames=dev_frames,
        skipped=skipped,
        source=str(path),
    )


def _frames_uncached(extractor, utterances, skipped):
    """Frame counts without a feature cache; unreadable audio is skipped and counted."""
    kept, frames = [], []
    for utt in utterances:
        try:
            frames.append(len(extractor.compute(utt.audio_filepath)))
        except UserError as error:
            print(f"warning: skipping {error}", file=sys.stderr, flush=True)
            skipped["unreadable_audio"] += 1
            continue
        kept.append(utt)
    return kept, frames


def _drop_too_long(utterances, frames, longest, skipped):
    kept = [(u, n) for u, n in zip(utterances, frames) if n <= longest]
    for utt, n in zip(utterances, frames):
        if n > longest:
            print(
                f"warning: skipping {utt.audio_filepath}: {n} frames, longer than the largest "
                f"bucket ({longest} frames, data.frame_buckets)",
                file=sys.stderr,
                flush=True,
            )
            skipped["too_long"] += 1
    return [u for u, _ in kept], [n for _, n in kept]


def data_summary(prepared: PreparedData, skipped) -> str:
    """One line: utterances used per split and the skipped entries by reason."""
    line = (
        f"data: {len(prepared.train)} train and {len(prepared.dev)} dev utterances from "
        f"{prepared.source}"
    )
    total = sum(skipped.values())
    if total:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        line += f"; skipped {total} ({reasons})"
    return line


def make_batches(config: TrainConfig, prepared: PreparedData):
    from pipelines.asr.batching import ASRBatches, CachedFeatures

    features = CachedFeatures(prepared.extractor, [u.audio_filepath for u in prepared.train])
    tokens = [prepared.tokenizer.encode(u.text) for u in prepared.train]
    frame_buckets = list(config.data.frame_buckets)
    token_buckets = list(config.data.token_buckets)
    return ASRBatches(
        features,
        tokens,
        num_frames=prepared.train_frames,
        batch_size=config.data.batch_size,
        frame_buckets=frame_buckets,
        token_buckets=token_buckets,
        seed=config.seed,
        workers=config.data.workers,
    )


# ------------------------------------------------------------------------------------------
# Callbacks


class DevEvaluation(keras.callbacks.Callback):
    """Decodes the dev split greedily each epoch: `dev_cer`/`dev_wer` in the logs, best model saved.

    Also keeps `history.json` (every epoch's logs, so a resumed run keeps its history) and the
    alignment of a fixed dev utterance for the tracking callback.
    """

    def __init__(self, features, texts, out_dir, batch_size=16):
        super().__init__()
        self.features = features
        self.texts = texts
        self.out_dir = Path(out_dir)
        self.batch_size = batch_size
        self.decoder = None
        self.history: list[dict] = []
        self.best_cer = float("inf")
        self.best_epoch = None
        self.last_alignment = None
        self.epoch_start = None
        self.train_utterances = 0
        self.train_seconds = 0.0

    @property
    def history_path(self):
        return self.out_dir / HISTORY_FILENAME

    def on_train_begin(self, logs=None):
        from pipelines.asr.decode import Decoder

        self.decoder = Decoder(self.model)
        if self.history_path.is_file():
            state = json.loads(self.history_path.read_text())
            self.history = state["epochs"]
            self.best_cer = state.get("best_dev_cer", float("inf"))
            self.best_epoch = state.get("best_epoch")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1

    def on_epoch_end(self, epoch, logs=None):
        from pipelines.asr.metrics import error_rates

        logs = logs if logs is not None else {}
        train_time = time.perf_counter() - self.epoch_start
        start = time.perf_counter()
        hyps = self.decoder.decode(self.features, beam_size=1, batch_size=self.batch_size)
        texts = [self.decoder.tokenizer.decode(h.tokens) for h in hyps]
        rates = error_rates(self.texts, texts)
        decode_time = time.perf_counter() - start
        logs["dev_cer"] = rates.cer
        logs["dev_wer"] = rates.wer
        first = self.decoder.greedy(
            self.features[0][None], np.array([len(self.features[0])]), return_alignment=True
        )[0]
        self.last_alignment = (first.alignment, self.decoder.tokenizer.decode(first.tokens))
        record = {"epoch": epoch}
        record.update({k: float(v) for k, v in logs.items() if np.ndim(v) == 0})
        record["train_seconds"] = train_time
        record["dev_decode_seconds"] = decode_time
        record["train_batches"] = self.batches
        record["dev_example"] = {"reference": self.texts[0], "hypothesis": texts[0]}
        self.history = [h for h in self.history if h["epoch"] < epoch] + [record]
        if rates.cer < self.best_cer:
            self.best_cer = rates.cer
            self.best_epoch = epoch
            # Saved beside, then renamed: a kill while saving never leaves a broken model.keras.
            partial = self.out_dir / f".{MODEL_FILENAME}.partial.keras"
            self.model.save(partial)
            os.replace(partial, self.out_dir / MODEL_FILENAME)
        state = {
            "epochs": self.history,
            "best_dev_cer": self.best_cer,
            "best_epoch": self.best_epoch,
        }
        _atomic_write_json(self.history_path, state)
        print(
            f"epoch {epoch + 1}: dev CER {rates.cer:.2%}  dev WER {rates.wer:.2%}  ({texts[0]!r})",
            file=sys.stderr,
            flush=True,
        )


def _atomic_write_json(path, data):
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False))
    os.replace(tmp, path)


def _jit(value: str):
    if keras.backend.backend() == "jax":
        return True
    value = str(value).lower()
    if value == "auto":
        return "auto"
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise UserError(f"jit_compile must be auto, true or false. Received: {value!r}")


# ------------------------------------------------------------------------------------------
# Training


def _train_language_model(decode: DecodeConfig, texts, dev_texts, tokenizer):
    """The language model `decode` asks for, fitted on `texts`, and its summary (or None)."""
    if not decode.lm_order:
        return None, None
    lm = CharNgramLM.train(texts, tokenizer, order=decode.lm_order)
    summary = {"order": decode.lm_order, "word_order": decode.word_lm_order}
    kind = f"character {decode.lm_order}-gram"
    if decode.word_lm_order:
        lm = WordNgramLM.train(texts, lm, order=decode.word_lm_order, dev_texts=dev_texts)
        summary.update(vocabulary=len(lm.words), oov_rate=lm.oov_rate)
        kind = (f"word {decode.word_lm_order}-gram ({len(lm.words)} words, OOV rate "
                f"{lm.oov_rate:.1%}) over a {kind}")  # fmt: skip
    summary["dev_perplexity"] = lm.perplexity(dev_texts)
    print(f"{kind} language model: dev perplexity {summary['dev_perplexity']:.2f} per character",
          file=sys.stderr, flush=True)  # fmt: skip
    return lm, summary


def train(config: TrainConfig, data=None, out=None, callbacks=(), progress: bool = True) -> dict:
    """Train a recognizer and write `model.keras`, `config.yaml` and `metrics.json` to `out`.

    Args:
        config: `TrainConfig` (see `resolve_config`).
        data: str or Path or None. A corpus; overrides `config.data.path`.
        out: str or Path or None. The output folder; default `runs/asr/<timestamp>/`. Training
            again with the same folder resumes an interrupted run.
        callbacks: extra Keras callbacks, run after the pipeline's own.
        progress: bool. Show progress bars.

    Returns:
        The `metrics.json` content as a dict.
    """
    from toolkit.tracking import tracking_run

    scale = setup_scale(config.precision, config.distribute, config.data.batch_size)
    out = scale.output_dir(Path(out) if out is not None else default_out_dir())
    out.mkdir(parents=True, exist_ok=True)
    config_path = save_config(config, out / CONFIG_FILENAME)
    keras.utils.set_random_seed(config.seed)
    started = time.time()
    prepared = prepare_data(config, data, progress=progress)
    batches = make_batches(config, prepared)
    print(data_summary(prepared, _merge_counts(prepared.skipped, batches.skipped)),
          file=sys.stderr, flush=True)  # fmt: skip
    with scale.scope():  # dtype policy, distribution strategy
        model = build_recognizer(
            config.model,
            tokenizer=prepared.tokenizer,
            feature_params=prepared.extractor.params.get_config(),
            feature_stats=prepared.stats.get_config(),
            decoding={key: getattr(config.decode, key)
                      for key in ("beam_size", "ctc_weight", "lm_weight")},  # fmt: skip
        )
        optim = config.optim
        if optim.lr_schedule == "noam":
            learning_rate = NoamSchedule(optim.peak_learning_rate, optim.warmup_steps)
        else:  # set before every step by `LinearDecay`
            learning_rate = optim.peak_learning_rate / optim.warmup_steps
        optimizer = keras.optimizers.Adam(
            learning_rate=learning_rate, beta_2=optim.beta_2, clipnorm=optim.clipnorm
        )
        model.compile(optimizer=optimizer, jit_compile=_jit(config.jit_compile))
    dev_features = [prepared.extractor.compute(u.audio_filepath) for u in prepared.dev]
    dev_texts = [u.text for u in prepared.dev]
    model.language_model, lm_summary = _train_language_model(
        config.decode, [u.text for u in prepared.train], dev_texts, prepared.tokenizer
    )  # seconds; saved inside every model.keras written from now on
    evaluation = DevEvaluation(dev_features, dev_texts, out, config.decode.batch_size)

    from pipelines.asr.transcribe import alignment_figure

    def images(epoch, model):
        if evaluation.last_alignment is None or evaluation.last_alignment[0] is None:
            return {}
        alignment, text = evaluation.last_alignment
        title = f"Epoch {epoch + 1}: dev utterance 0 ({prepared.dev[0].id})"
        return {"dev_alignment": alignment_figure(alignment, text, title)}

    budget = TimeBudget(config.optim.max_minutes) if config.optim.max_minutes else None
    schedule = []
    if config.optim.lr_schedule == "linear":
        schedule.append(
            LinearDecay(
                config.optim.peak_learning_rate,
                config.optim.epochs,
                max_minutes=config.optim.max_minutes,
                final_fraction=config.optim.final_lr_fraction,
                warmup_steps=config.optim.warmup_steps,
                update_every=LR_UPDATE_EVERY,
            )
        )
    with tracking_run(
        pipeline="asr",
        config=config_to_dict(config),
        out_dir=out,
        tracking_uri=config.tracking_uri,
        enabled=scale.tracking(config.tracking),
        config_path=config_path,
        run_name=None,
    ) as tracker:
        example = {k: v[:1] for k, v in model.dummy_inputs().items()}
        fit_callbacks = [
            InterruptAtSafePoints(),  # Ctrl-C/SIGTERM between steps, before the epoch's work
            *schedule,  # first: `learning_rate` in the logs the others see
            scale.callback(),  # `loader_share` in the logs the others see
            evaluation,
            scale.chief_callback(tracker.callback(image_fn=images, input_example=example)),
            keras.callbacks.EarlyStopping(
                monitor="dev_cer", mode="min", patience=config.optim.patience
            ),
        ]
        if budget is not None:
            fit_callbacks.append(budget)
        # Last of the pipeline's callbacks: it saves the state the others leave behind.
        backup = SafeBackupAndRestore(out / "backup", callbacks=fit_callbacks)
        fit_callbacks.append(backup)
        fit_callbacks.extend(callbacks)
        fit_start = time.perf_counter()
        with interrupts_at_safe_points():
            model.fit(
                scale.batches(batches),
                epochs=config.optim.epochs,
                shuffle=False,
                callbacks=fit_callbacks,
                verbose=1 if progress else 0,
            )
        fit_seconds = time.perf_counter() - fit_start
        metrics = _summary(config, prepared, batches, model, evaluation, fit_seconds, started)
        metrics.update(scale.summary())
        metrics["language_model"] = lm_summary
        _atomic_write_json(out / METRICS_FILENAME, metrics)
        if tracker.enabled:
            tracker.log_metrics(
                {"best_dev_cer": metrics["best_dev_cer"], "best_dev_wer": metrics["best_dev_wer"]}
            )
    backup.delete()  # kept until now: a kill after `fit` resumes without training
    return metrics


def _merge_counts(*counts) -> dict:
    total = Counter()
    for count in counts:
        total.update(count)
    return dict(total)


def _summary(config, prepared, batches, model, evaluation, fit_seconds, started):
    history = evaluation.history
    best = min(history, key=lambda h: h["dev_cer"]) if history else {}
    train_seconds = sum(h["train_seconds"] for h in history) or fit_seconds
    utterances = sum(h["train_batches"] for h in history) * config.data.batch_size
    return {
        "best_epoch": best.get("epoch"),
        "best_dev_cer": best.get("dev_cer"),
        "best_dev_wer": best.get("dev_wer"),
        "epochs": history,
        "train_utterances": len(prepared.train),
        "dev_utterances": len(prepared.dev),
        "skipped": _merge_counts(prepared.skipped, batches.skipped),
        "train_utterances_per_second": utterances / train_seconds if train_seconds else None,
        "parameters": int(model.count_params()),
        "architecture": config.model.architecture,
        "backend": keras.backend.backend(),
        "corpus": prepared.source,
        "elapsed_seconds": time.time() - started,
        "out": str(evaluation.out_dir),
    }
