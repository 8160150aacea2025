"""Run by `test_distributed.py` in a fresh process (`KERAS_BACKEND=jax`, simulated devices).

`python -m tests.pipelines.distributed_worker` trains the tiny model of each pipeline for two
epochs on fixed synthetic batches, once on one device (`distribute=none`) and once on every
device (`distribute=data-parallel`), from the same seed (dropout, SpecAugment and augmentation
included), and prints one JSON object: the per-step losses of each run.
"""

from __future__ import annotations

import json
import time

import keras
import numpy as np

from pipelines.common.scale import setup_scale


def _fit(scale, build, batches, epochs=2):
    keras.utils.set_random_seed(0)
    with scale.scope():
        model = build()
    losses = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"]))
    )
    model.fit(
        scale.batches(batches),
        epochs=epochs,
        shuffle=False,
        verbose=0,
        callbacks=[scale.callback(), record],
    )
    return losses


def asr_run(distribute: str) -> list[float]:
    from pipelines.asr.batching import ASRBatches
    from pipelines.asr.model import NoamSchedule, build_recognizer
    from pipelines.asr.train import resolve_config

    config = resolve_config("tiny", ["model.encoder_layers=1", "model.d_model=32",
                                     "model.intermediate_dim=64", "model.num_heads=2"])  # fmt: skip
    rng = np.random.default_rng(0)
    frames = rng.integers(60, 120, size=16)
    features = [rng.normal(size=(n, 80)).astype("float32") for n in frames]
    tokens = [rng.integers(3, 30, size=rng.integers(4, 12)) for _ in frames]
    batches = ASRBatches(features, tokens, batch_size=8, frame_buckets=[128],
                         token_buckets=[16], seed=0)  # fmt: skip

    def build():
        stats = {"mean": [0.0] * 80, "std": [1.0] * 80, "frames": 1}
        model = build_recognizer(config.model, feature_stats=stats)
        schedule = NoamSchedule(config.optim.peak_learning_rate, config.optim.warmup_steps)
        optimizer = keras.optimizers.Adam(schedule, beta_2=config.optim.beta_2, clipnorm=5.0)
        model.compile(optimizer=optimizer, jit_compile=True)
        return model

    scale = setup_scale("float32", distribute, config.data.batch_size)
    return _fit(scale, build, batches)


def medimg_run(distribute: str, scans: int = 8) -> list[float]:
    from pipelines.medimg.model import build_model
    from pipelines.medimg.train import VolumeBatches, Volumes, class_weights, resolve_config

    config = resolve_config("tiny", ["preprocess.shape=[16,20,16]"])
    rng = np.random.default_rng(0)
    images = rng.normal(size=(scans, 16, 20, 16)).astype("float16")
    labels = np.arange(scans) % 2
    volumes = Volumes(images, labels, np.zeros(images.shape, np.uint8), np.zeros(scans, bool), [])
    batches = VolumeBatches(volumes, config.data.batch_size, augment=config.augment,
                            class_weight=class_weights(labels), seed=0)  # fmt: skip

    def build():
        model = build_model(config.model, config.preprocess)
        model.compile(optimizer=keras.optimizers.AdamW(config.optim.learning_rate),
                      loss="binary_crossentropy", jit_compile=True)  # fmt: skip
        return model

    scale = setup_scale("float32", distribute, config.data.batch_size)
    return _fit(scale, build, batches)


def main():
    results = {"devices": len(keras.distribution.list_devices()), "seconds": {}}
    for name, run in (("asr", asr_run), ("medimg", medimg_run)):
        results[name] = {}
        for distribute in ("none", "data-parallel"):
            start = time.perf_counter()
            results[name][distribute] = run(distribute)
            results["seconds"][f"{name} {distribute}"] = round(time.perf_counter() - start, 1)
        keras.distribution.set_distribution(None)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
