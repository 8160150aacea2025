"""Long recordings: split at low-energy points, decode segment by segment, join the text.

The recognizer is trained on single sentences (the built-in corpus: 1 to 8.4 s, 95% under
5.3 s); attention over a 10-minute recording would need a (15,000 x 15,000) score matrix per
head, and an attention decoder drifts on inputs far longer than it was trained on. So a
recording longer than `max_seconds` is cut into segments of at most `max_seconds`:

1. the next cut is searched in the window `[start + max - search, start + max]`
   (`search_seconds`, default 40% of `max_seconds`);
2. in that window the frame RMS energy (as `librosa.feature.rms`, 25 ms frames, 10 ms hop) is
   smoothed over 100 ms; frames within 10% of the window's (minimum .. median) range above the
   minimum are "quiet", and the cut goes to the centre of the longest quiet run, i.e. into the
   middle of the longest pause, between words rather than inside one;
3. the segments are contiguous: they cover the recording exactly once, in order, and none is
   longer than `max_seconds`.

`iter_segments` streams the file (libsndfile blocks, down-mix, `soxr.ResampleStream`), so
memory is bounded by one segment plus one read block, whatever the recording's length; it gives
exactly the segments `split_signal(load_audio(path))` gives (same resampler, same length
rule). `transcribe_long` computes each segment's log-mel features and decodes them in batches
of `batch_size`, holding only one batch of features and decoder state at a time, and joins the
segments' texts in order with single spaces. `segment_features` gives the segments' features
of one file (`evaluate` uses it for long utterances).

Example:

```python
bounds = split_signal(y, 16000, max_seconds=10.0)     # [(0, 151040), (151040, 297600), ...]
result = transcribe_long("talk.wav", extractor, decoder, beam_size=1)
print(result.text, len(result.segments))
```
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipelines.asr.ctc import DEFAULT_CTC_WEIGHT
from toolkit.errors import UserError

DEFAULT_MAX_SECONDS = 10.0
"""Longest segment decoded at once: near the training utterances (built-in corpus <= 8.4 s)."""
SEARCH_FRACTION = 0.4
"""Default search window for a cut, as a fraction of `max_seconds` (4 s of 10 s)."""
FRAME_SECONDS = 0.025
HOP_SECONDS = 0.010
SMOOTH_SECONDS = 0.1
QUIET_FRACTION = 0.1
READ_BLOCK_SECONDS = 10.0


def _validate(max_seconds: float, search_seconds: float | None) -> float:
    if not (isinstance(max_seconds, (int, float)) and math.isfinite(max_seconds)) or (
        max_seconds <= 0
    ):
        raise ValueError(f"max_seconds must be positive. Received: max_seconds={max_seconds}")
    if search_seconds is None:
        return SEARCH_FRACTION * max_seconds
    if not 0 < search_seconds <= max_seconds:
        raise ValueError(
            "search_seconds must be in (0, max_seconds]. Received: "
            f"search_seconds={search_seconds}, max_seconds={max_seconds}"
        )
    return float(search_seconds)


def frame_rms(y: np.ndarray, frame_length: int, hop_length: int) -> np.ndarray:
    """RMS energy of each full frame, `sqrt(mean(frame ** 2))`: what
    `librosa.feature.rms(y=y, frame_length=frame_length, hop_length=hop_length, center=False)`
    computes, without librosa's first-call cost (lazy imports and compilation: seconds)."""
    frames = np.lib.stride_tricks.sliding_window_view(np.asarray(y, np.float32), frame_length)
    frames = frames[::hop_length]  # (frames, frame_length), a view
    return np.sqrt(np.mean(np.square(np.abs(frames)), axis=-1))


def cut_point(y: np.ndarray, max_samples: int, search_samples: int, sample_rate: int) -> int:
    """Where to end a segment that starts at `y[0]`: the middle of the quietest stretch.

    Args:
        y: float array `(samples,)`, at least `max_samples` long (the rest is ignored).
        max_samples: int. The longest allowed segment.
        search_samples: int. The cut lies in `[max_samples - search_samples, max_samples]`.
        sample_rate: int. Sets the 25 ms frame, 10 ms hop and 100 ms smoothing.

    Returns:
        int in `[max(1, max_samples - search_samples), max_samples]`.
    """
    import scipy.ndimage

    lo = max(1, max_samples - search_samples)
    window = np.asarray(y[lo:max_samples], dtype=np.float32)
    frame = max(2, round(FRAME_SECONDS * sample_rate))
    hop = max(1, round(HOP_SECONDS * sample_rate))
    if window.shape[0] < frame:
        return max_samples
    rms = frame_rms(window, frame, hop)
    size = max(1, round(SMOOTH_SECONDS / HOP_SECONDS))
    energy = scipy.ndimage.uniform_filter1d(rms.astype(np.float64), size=size, mode="nearest")
    low, typical = float(energy.min()), float(np.median(energy))
    quiet = energy <= low + QUIET_FRACTION * (typical - low) + 1e-12
    # The longest run of quiet frames: (start, end) pairs of the runs of True.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], quiet.astype(np.int8), [0]])))
    starts, ends = edges[0::2], edges[1::2]
    best = int(np.argmax(ends - starts))
    centre_frame = (starts[best] + ends[best] - 1) / 2.0
    cut = lo + int(round(centre_frame * hop)) + frame // 2
    return int(min(max(cut, lo), max_samples))


def split_signal(
    y: np.ndarray,
    sample_rate: int = 16000,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    search_seconds: float | None = None,
) -> list[tuple[int, int]]:
    """Segment bounds `(start, end)` (samples) of a signal, cut at low-energy points.

    Args:
        y: float array `(samples,)`.
        sample_rate: int. Defaults to `16000`.
        max_seconds: float. Longest segment. Defaults to `DEFAULT_MAX_SECONDS` (10 s).
        search_seconds: float or None. Width of the window before `max_seconds` in which each
            cut is searched; `None` is 40% of `max_seconds`.

    Returns:
        list of `(start, end)`: contiguous (each `start` is the previous `end`), from `0` to
        `len(y)`, each at most `max_seconds` long; one segment when `y` is that short; empty
        for an empty signal.
    """
    search_seconds = _validate(max_seconds, search_seconds)
    max_samples = max(1, int(max_seconds * sample_rate))
    search_samples = max(1, int(search_seconds * sample_rate))
    n = int(np.shape(y)[0])
    bounds, start = [], 0
    while n - start > max_samples:
        cut = start + cut_point(y[start : start + max_samples], max_samples, search_samples,
                                sample_rate)  # fmt: skip
        bounds.append((start, cut))
        start = cut
    if n > start:
        bounds.append((start, n))
    return bounds


def _open(path: str) -> object:
    import soundfile

    if not os.path.exists(path):
        raise UserError(f"{path}: audio file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise UserError(f"{path}: empty file (0 bytes)")
    try:
        return soundfile.SoundFile(path)
    except Exception as error:  # libsndfile raises several types for corrupt files
        reason = str(error).split("\n")[0] or type(error).__name__
        raise UserError(f"{path}: unreadable audio ({reason})") from None


def audio_seconds(path: str | Path) -> float:
    """Duration from the audio header (no samples read).

    Raises:
        UserError: the file is missing, empty or not audio libsndfile reads.
    """
    with _open(str(path)) as handle:
        return handle.frames / handle.samplerate if handle.samplerate > 0 else 0.0


def stream_audio(
    path: str | Path, sample_rate: int = 16000, block_seconds: float = READ_BLOCK_SECONDS
) -> Iterator[np.ndarray]:
    """Mono float32 blocks at `sample_rate`, read and resampled block by block.

    The concatenated blocks equal `pipelines.asr.features.load_audio(path, sample_rate)`:
    the same down-mix (channel mean), the same soxr resampler (`soxr_hq`) run as a stream, and
    the same output length, `ceil(samples * sample_rate / rate)`.

    Raises:
        UserError: the file is missing, empty, not audio, or fails while being read.
    """
    import soxr

    path = str(path)
    with _open(path) as handle:
        rate = handle.samplerate
        block = max(1, int(block_seconds * rate))
        resampler = None
        if rate != sample_rate:
            resampler = soxr.ResampleStream(rate, sample_rate, 1, dtype="float32",
                                            quality="soxr_hq")  # fmt: skip
        read = emitted = 0
        held = None  # one block is held back so the last can be fixed to the exact length
        while True:
            try:
                data = handle.read(block, dtype="float32", always_2d=True)
            except Exception as error:
                reason = str(error).split("\n")[0] or type(error).__name__
                raise UserError(f"{path}: unreadable audio ({reason})") from None
            last = data.shape[0] < block
            read += data.shape[0]
            y = data.mean(axis=1) if data.shape[0] else np.zeros(0, np.float32)
            if resampler is not None:
                y = resampler.resample_chunk(np.ascontiguousarray(y, np.float32), last=last)
            y = np.asarray(y, np.float32)
            if last:
                if read == 0:
                    raise UserError(f"{path}: empty audio (zero samples)")
                size = int(np.ceil(read * sample_rate / rate)) if resampler is not None else read
                tail = y if held is None else np.concatenate([held, y])
                want = size - emitted
                tail = np.pad(tail, (0, max(0, want - tail.shape[0])))[: max(want, 0)]
                if tail.shape[0]:
                    yield tail
                return
            if held is not None and held.shape[0]:
                emitted += held.shape[0]
                yield held
            held = y


def iter_segments(
    path: str | Path,
    sample_rate: int = 16000,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    search_seconds: float | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream a file's segments as `(start sample, samples)`, without loading the whole file.

    Gives the segments of `split_signal(load_audio(path, sample_rate), ...)`, in order.

    Raises:
        UserError: the file is missing, empty or not readable audio.
    """
    search_seconds = _validate(max_seconds, search_seconds)
    max_samples = max(1, int(max_seconds * sample_rate))
    search_samples = max(1, int(search_seconds * sample_rate))
    buffer = np.zeros(0, np.float32)
    offset = 0
    for block in stream_audio(path, sample_rate):
        buffer = np.concatenate([buffer, block])
        while buffer.shape[0] > max_samples:
            cut = cut_point(buffer, max_samples, search_samples, sample_rate)
            yield offset, buffer[:cut].copy()
            buffer = buffer[cut:]
            offset += cut
    if buffer.shape[0]:
        yield offset, buffer


@dataclasses.dataclass
class LongTranscript:
    """The outcome of `transcribe_long`.

    Attributes:
        text: str. The segments' texts in order, joined by `join_texts`.
        segments: list of `(start, end)` in seconds.
        texts: list of str. Each segment's own text.
        alignments: list of arrays or None. Each segment's cross-attention, when asked for.
        decode_seconds: float. Time spent decoding (features excluded).
    """

    text: str
    segments: list
    texts: list
    alignments: list | None
    decode_seconds: float

    @property
    def seconds(self) -> float:
        return self.segments[-1][1] if self.segments else 0.0


def transcribe_long(
    path,
    extractor,
    decoder,
    beam_size: int = 1,
    ctc_weight: float = DEFAULT_CTC_WEIGHT,
    batch_size: int = 8,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    search_seconds: float | None = None,
    return_alignment: bool = False,
    lm_weight: float = 0.0,
) -> LongTranscript:
    """Transcribe a recording of any length segment by segment (see the module docstring).

    Args:
        path: str or Path. The audio file.
        extractor: `pipelines.asr.features.FeatureExtractor` (its `params` are used; segments are
            not cached).
        decoder: `pipelines.asr.decode.Decoder`.
        beam_size: int. `1` decodes each batch greedily. Defaults to `1`.
        ctc_weight: float. CTC weight of the beam search. Defaults to `DEFAULT_CTC_WEIGHT`.
        lm_weight: float. Language model weight of the beam search. Defaults to `0.0`.
        batch_size: int. Segments whose features and decoder state are held at once.
            Defaults to `8`.
        max_seconds, search_seconds: see `split_signal`.
        return_alignment: bool. Keep each segment's cross-attention alignment.

    Raises:
        UserError: the file is missing, empty or not readable audio.
    """
    import time

    from pipelines.asr.features import log_mel

    params = extractor.params
    rate = params.sample_rate
    texts, segments, alignments = [], [], [] if return_alignment else None
    pending: list[np.ndarray] = []
    decode_seconds = 0.0

    def flush():
        nonlocal decode_seconds
        if not pending:
            return
        start = time.perf_counter()
        hyps = decoder.decode(
            pending,
            beam_size=beam_size,
            batch_size=len(pending),
            ctc_weight=ctc_weight,
            lm_weight=lm_weight,
            return_alignment=return_alignment,
        )
        decode_seconds += time.perf_counter() - start
        texts.extend(decoder.tokenizer.decode(h.tokens) for h in hyps)
        if return_alignment:
            alignments.extend(h.alignment for h in hyps)
        pending.clear()

    for start, samples in iter_segments(path, rate, max_seconds, search_seconds):
        segments.append((start / rate, (start + samples.shape[0]) / rate))
        pending.append(log_mel(samples, params))
        if len(pending) >= batch_size:
            flush()
    flush()
    return LongTranscript(join_texts(texts), segments, texts, alignments, decode_seconds)


def join_texts(texts) -> str:
    """One text from segments' texts in order: a single text unchanged, else each stripped and
    the non-empty ones joined with single spaces (segments end at pauses, i.e. between words)."""
    texts = list(texts)
    if len(texts) == 1:
        return texts[0]
    return " ".join(t.strip() for t in texts if t.strip())


def segment_features(
    path,
    params,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    search_seconds: float | None = None,
) -> list[np.ndarray]:
    """Log-mel features `(frames, n_mels)` of each segment of a file (see `iter_segments`).

    Args:
        path: str or Path. The audio file.
        params: `pipelines.asr.features.FeatureParams`.

    Raises:
        UserError: the file is missing, empty or not readable audio.
    """
    from pipelines.asr.features import log_mel

    return [
        log_mel(samples, params)
        for _, samples in iter_segments(path, params.sample_rate, max_seconds, search_seconds)
    ]
