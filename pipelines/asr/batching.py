"""Batches for training: a `keras.utils.PyDataset` bucketing utterances into fixed padded shapes.

Each utterance goes to the smallest bucket `(F, L)` with `F` in `frame_buckets` at least its
frame count and `L` in `token_buckets` at least its token count plus one (for `<s>`/`</s>`).
Every batch of a bucket has the same shape `(batch_size, F, ...)`: the last, partial batch of a
bucket is filled with other utterances of that bucket (`fill_last_batch=True`), so a compiled
(XLA) training step sees at most `len(frame_buckets) * len(token_buckets)` shapes — in practice
the handful that the data populates (`bucket_shapes`). Utterances longer than the largest bucket
are dropped and counted in `skipped["too_long"]`.

A batch is `(inputs, targets)`, two dicts of NumPy arrays:

| key | dtype | shape | content |
|-----|-------|-------|---------|
| `inputs["features"]` | float32 | (B, F, n_mels) | log-mel frames (normalised if `normalizer`), `pad_value` beyond the length |
| `inputs["feature_mask"]` | bool | (B, F) | True for the utterance's real frames |
| `inputs["decoder_tokens"]` | int32 | (B, L) | `<s>` then the characters, padded with 0 |
| `targets["decoder"]` | int32 | (B, L) | the characters then `</s>`, padded with 0 (next-token targets) |
| `targets["ctc"]` | int32 | (B, L) | the characters only, padded with 0 (CTC labels) |

Id 0 is the CTC blank and the padding id and never a label, so the decoder mask is
`decoder_tokens != 0`, the target length is `count_nonzero(targets)` and the feature length is
`sum(feature_mask)`. Name the model's inputs and outputs after these keys.

Shuffling is our own, seeded: `on_epoch_end()` (called by `fit`) draws a new order from
`(seed, epoch)`, within buckets and of the batches. Pass `shuffle=False` to `model.fit` so Keras
does not reorder batches unseeded. `workers`/`use_multiprocessing`/`max_queue_size` go to
`PyDataset` (batches are assembled in parallel threads or processes).
"""

from __future__ import annotations

import bisect
import sys
from collections import Counter
from collections.abc import Sequence

import keras
import numpy as np

DEFAULT_FRAME_BUCKETS = (256, 512, 768, 1024, 1536, 2048)
DEFAULT_TOKEN_BUCKETS = (48, 96, 160, 256)


class CachedFeatures(Sequence):
    """A lazy sequence of features: item `i` is `extractor.compute(paths[i])` (from the cache).

    Picklable, so `use_multiprocessing=True` workers can read the cache themselves.
    """

    def __init__(self, extractor, paths):
        self.extractor = extractor
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.extractor.compute(self.paths[index])


class ASRBatches(keras.utils.PyDataset):
    """Bucketed, padded, masked batches of features and token ids.

    Args:
        features: sequence of float arrays `(frames_i, n_mels)` (a list, or a lazy sequence such
            as `CachedFeatures`).
        token_ids: sequence of int sequences: each utterance's character ids, without `<s>`/`</s>`
            (`CharTokenizer.encode(text)`).
        num_frames: sequence of int or None. Frame counts; read from `features` when `None`
            (give them for lazy features to avoid loading everything).
        batch_size: int. Utterances per batch. Defaults to `16`.
        frame_buckets: sequence of int. Padded frame counts, ascending. Defaults to
            `(256, 512, 768, 1024, 1536, 2048)` (2.6 to 20.5 s; multiples of 4 for
            4x subsampling).
        token_buckets: sequence of int. Padded token counts (with `<s>` or `</s>`), ascending.
            Defaults to `(48, 96, 160, 256)`.
        shuffle: bool. Shuffle (seeded) at construction and after every epoch. Defaults to `True`.
        seed: int. Seed of the shuffling. Defaults to `0`.
        fill_last_batch: bool. Fill each bucket's last batch up to `batch_size` with other
            utterances of the bucket (fixed shapes); `False` keeps partial batches (use it for
            evaluation). Defaults to `True`.
        normalizer: object with `normalize(x)` (e.g. `FeatureStats`), or None.
        pad_value: float. Feature value of padded frames. Defaults to `0.0`.
        start_id, end_id: int. Ids of `<s>` and `</s>`. Default to `1` and `2`.
        workers, use_multiprocessing, max_queue_size: passed to `keras.utils.PyDataset`.

    Example:

    ```python
    tokenizer = CharTokenizer()
    data = ASRBatches(features, [tokenizer.encode(t) for t in texts], batch_size=8)
    inputs, targets = data[0]
    model.fit(data, epochs=10, shuffle=False)
    ```
    """

    def __init__(
        self,
        features,
        token_ids,
        num_frames=None,
        batch_size: int = 16,
        frame_buckets=DEFAULT_FRAME_BUCKETS,
        token_buckets=DEFAULT_TOKEN_BUCKETS,
        shuffle: bool = True,
        seed: int = 0,
        fill_last_batch: bool = True,
        normalizer=None,
        pad_value: float = 0.0,
        start_id: int = 1,
        end_id: int = 2,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ):
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive. Received: batch_size={batch_size}")
        for name, buckets in (("frame_buckets", frame_buckets), ("token_buckets", token_buckets)):
            if not buckets or list(buckets) != sorted(set(buckets)) or min(buckets) < 1:
                raise ValueError(
                    f"{name} must be distinct positive integers in ascending order. "
                    f"Received: {name}={buckets}"
                )
        if len(features) != len(token_ids):
            raise ValueError(
                f"features and token_ids differ in length: {len(features)} != {len(token_ids)}"
            )
        self.features = features
        self.token_ids = [np.asarray(t, dtype=np.int32) for t in token_ids]
        if num_frames is None:
            num_frames = [int(np.shape(features[i])[0]) for i in range(len(features))]
        if len(num_frames) != len(features):
            raise ValueError("num_frames must have one entry per utterance")
        self.num_frames = [int(n) for n in num_frames]
        self.batch_size = int(batch_size)
        self.frame_buckets = tuple(int(b) for b in frame_buckets)
        self.token_buckets = tuple(int(b) for b in token_buckets)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.fill_last_batch = bool(fill_last_batch)
        self.normalizer = normalizer
        self.pad_value = float(pad_value)
        self.start_id = int(start_id)
        self.end_id = int(end_id)
        self.epoch = 0
        self.skipped = Counter()

        self._buckets: dict[tuple[int, int], list[int]] = {}
        for i, (frames, tokens) in enumerate(zip(self.num_frames, self.token_ids)):
            fb = bisect.bisect_left(self.frame_buckets, frames)
            tb = bisect.bisect_left(self.token_buckets, len(tokens) + 1)
            if frames < 1 or fb == len(self.frame_buckets) or tb == len(self.token_buckets):
                self.skipped["too_long" if frames >= 1 else "empty_audio"] += 1
                continue
            self._buckets.setdefault((self.frame_buckets[fb], self.token_buckets[tb]), []).append(i)
        if self.skipped:
            print(
                f"warning: batching skipped {sum(self.skipped.values())} utterances longer than "
                f"the largest bucket ({self.frame_buckets[-1]} frames, "
                f"{self.token_buckets[-1] - 1} characters)",
                file=sys.stderr,
                flush=True,
            )
        if not self._buckets:
            raise ValueError("no utterance fits the buckets: nothing to batch")
        self._plan = self._make_plan()

    @property
    def bucket_shapes(self) -> list[tuple[int, int]]:
        """The `(frames, tokens)` padded shapes used, sorted."""
        return sorted(self._buckets)

    @property
    def num_utterances(self) -> int:
        return sum(len(v) for v in self._buckets.values())

    def _make_plan(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        plan = []
        for key in sorted(self._buckets):
            members = np.asarray(self._buckets[key])
            if self.shuffle:
                members = members[rng.permutation(len(members))]
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                short = self.batch_size - len(batch)
                if short and self.fill_last_batch:
                    pool = members[:start] if start else members
                    extra = rng.choice(pool, size=short, replace=short > len(pool))
                    batch = np.concatenate([batch, extra])
                plan.append((key, batch.tolist()))
        if self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return _spec_friendly_order(plan)

    @property
    def num_batches(self) -> int:
        return len(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def on_epoch_end(self):
        """Advance the epoch and draw the next (seeded) order."""
        self.epoch += 1
        if self.shuffle:
            self._plan = self._make_plan()

    def __getitem__(self, index: int):
        if index < 0 or index >= len(self._plan):
            raise IndexError(f"batch index {index} out of range [0, {len(self._plan)})")
        (frames, tokens), members = self._plan[index]
        size = len(members)
        first = np.asarray(self.features[members[0]])
        n_mels = first.shape[-1]
        features = np.full((size, frames, n_mels), self.pad_value, dtype=np.float32)
        feature_mask = np.zeros((size, frames), dtype=bool)
        decoder_tokens = np.zeros((size, tokens), dtype=np.int32)
        decoder_targets = np.zeros((size, tokens), dtype=np.int32)
        ctc_labels = np.zeros((size, tokens), dtype=np.int32)
        for row, i in enumerate(members):
            x = first if row == 0 else np.asarray(self.features[i])
            if self.normalizer is not None:
                x = self.normalizer.normalize(x)
            n = min(x.shape[0], frames)
            features[row, :n] = x[:n]
            feature_mask[row, :n] = True
            ids = self.token_ids[i]
            k = len(ids)
            decoder_tokens[row, 0] = self.start_id
            decoder_tokens[row, 1 : k + 1] = ids
            decoder_targets[row, :k] = ids
            decoder_targets[row, k] = self.end_id
            ctc_labels[row, :k] = ids
        inputs = {
            "features": features,
            "feature_mask": feature_mask,
            "decoder_tokens": decoder_tokens,
        }
        targets = {"decoder": decoder_targets, "ctc": ctc_labels}
        return inputs, targets

    @classmethod
    def from_utterances(cls, utterances, extractor, tokenizer, workers_prepare=None, **kwargs):
        """Batches of `utterances` with features from `extractor`'s cache (filled first).

        Returns:
            `(batches, skipped)`: the dataset and a `Counter` of utterances skipped because
            their audio could not be decoded (each also reported in one warning line).
        """
        prepared = extractor.prepare(utterances, workers=workers_prepare)
        features = CachedFeatures(extractor, [u.audio_filepath for u in prepared.utterances])
        token_ids = [tokenizer.encode(u.text) for u in prepared.utterances]
        batches = cls(features, token_ids, num_frames=prepared.num_frames, **kwargs)
        skipped = Counter(prepared.skipped)
        skipped.update(batches.skipped)
        return batches, skipped


def _spec_friendly_order(plan):
    """Put two batches first whose padded shapes differ in both the frame and the token axis.

    On the TensorFlow backend, Keras derives the `tf.data` signature from batches 0 and 1 only:
    an axis on which those two agree is fixed for the whole run, and a later batch of another
    bucket fails. So batch 0 comes from the bucket smallest in frames (then tokens) and batch 1
    from a bucket that differs from it on both axes; when no populated bucket does, batch 1 is
    padded up to the largest frame and token sizes in use (one extra configured shape).
    """
    if len(plan) < 2:
        return plan
    frames = sorted({key[0] for key, _ in plan})
    tokens = sorted({key[1] for key, _ in plan})
    first = min(range(len(plan)), key=lambda i: plan[i][0])
    f0, l0 = plan[first][0]
    rest = [i for i in range(len(plan)) if i != first]
    both = [i for i in rest if plan[i][0][0] != f0 and plan[i][0][1] != l0]
    if both:
        second = both[0]
        entry = plan[second]
    else:
        second = rest[0]
        widest = (frames[-1], tokens[-1])
        entry = (
            widest if widest[0] != f0 and widest[1] != l0 else plan[second][0],
            plan[second][1],
        )
    others = [plan[i] for i in rest if i != second]
    return [plan[first], entry, *others]
