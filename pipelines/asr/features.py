"""Log-mel features with librosa, a disk cache, and global normalisation statistics.

`log_mel` computes, for 16 kHz mono audio `y`,

    S = |STFT(y)|^2   (Hann window of 400 samples = 25 ms, zero-padded to n_fft = 512,
                       hop 160 samples = 10 ms, centred frames, constant padding)
    M = mel(S)        (80 Slaney-style mel bands, Slaney area normalisation, 0 Hz .. 8 kHz)
    X = 10 log10(max(M, amin)), then floored at max(X) - top_db  (librosa.power_to_db)

and returns `X` with shape `(frames, n_mels)`, `frames = 1 + samples // hop_length`. The result
equals `librosa.power_to_db(librosa.feature.melspectrogram(...)).T` with the parameters of
`FeatureParams` (tested to 1e-5 dB): the mel basis is librosa's, and the STFT repeats librosa's
steps and dtypes, without librosa's per-call overhead and slow-to-import submodules, which
is what makes extraction several times faster. `n_fft = 512` (a power of two, faster FFT) with
`win_length = 400` keeps the 25 ms analysis window of the literature.

`load_audio` reads any format libsndfile reads, down-mixes channels (mean, as `librosa.to_mono`)
and resamples from any rate to `sample_rate` with soxr (`soxr_hq`, length `ceil(n * ratio)`) —
the same steps as `librosa.load`.

`FeatureExtractor` caches each utterance's features as a `.npy` file keyed by the audio file
(absolute path, size and modification time) and by the feature parameters: the second epoch and
the second run read no audio, and changing any parameter (or the file) gives a new key.
`FeatureExtractor.prepare` fills the cache in parallel threads.

`FeatureStats` holds the per-band mean and standard deviation over all training frames; it is a
small JSON-able dict (`get_config`/`from_config`) saved with the model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import sys
import uuid
from collections import Counter
from pathlib import Path

import librosa
import numpy as np
import scipy.fft
import soundfile
import soxr

from pipelines.common.paths import toolkit_home
from pipelines.common.progress import progress_bar
from toolkit.errors import UserError

CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FeatureParams:
    """Log-mel parameters (see the module docstring for the formula).

    Args:
        sample_rate: int. Audio is resampled to this rate. Defaults to `16000`.
        n_fft: int. FFT size in samples. Defaults to `512`.
        win_length: int. Hann window length in samples (25 ms). Defaults to `400`.
        hop_length: int. Frame shift in samples (10 ms). Defaults to `160`.
        n_mels: int. Number of Slaney mel bands. Defaults to `80`.
        fmin: float. Lowest band edge in Hz. Defaults to `0.0`.
        fmax: float or None. Highest band edge in Hz; `None` is `sample_rate / 2`.
        amin: float. Power floor before the logarithm. Defaults to `1e-10` (-100 dB).
        top_db: float or None. Dynamic-range floor below each utterance's maximum, in dB.
            Defaults to `80.0`.
    """

    sample_rate: int = 16000
    n_fft: int = 512
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    fmin: float = 0.0
    fmax: float | None = None
    amin: float = 1e-10
    top_db: float | None = 80.0

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")
        if self.win_length > self.n_fft:
            raise ValueError(
                f"win_length must be <= n_fft. Received: win_length={self.win_length}, "
                f"n_fft={self.n_fft}"
            )
        if self.amin <= 0:
            raise ValueError(f"amin must be positive. Received: amin={self.amin}")

    def get_config(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict) -> FeatureParams:
        return cls(**config)

    def cache_key(self) -> str:
        """A short hash of the parameters (and the librosa version and cache format)."""
        payload = json.dumps(
            [CACHE_VERSION, librosa.__version__, self.get_config()], sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def num_frames(self, num_samples: int) -> int:
        """Frames of a signal of `num_samples` samples at `sample_rate` (centred frames)."""
        return 1 + int(num_samples) // self.hop_length


def load_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as mono float32 at `sample_rate` (down-mix, then soxr resampling).

    Raises:
        UserError: the file is missing, not audio libsndfile can read, or has no samples.
    """
    path = str(path)
    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise UserError(f"{path}: audio file not found") from None
    except Exception as error:  # libsndfile raises LibsndfileError/RuntimeError/TypeError
        if not os.path.exists(path):
            raise UserError(f"{path}: audio file not found") from None
        reason = str(error).split("\n")[0] or type(error).__name__
        raise UserError(f"{path}: unreadable audio ({reason})") from None
    if data.shape[0] == 0:
        raise UserError(f"{path}: empty audio (zero samples)")
    y = data.mean(axis=1)  # (samples, channels) -> (samples,), as librosa.to_mono
    if rate != sample_rate:
        # librosa.resample(res_type="soxr_hq"): soxr, then the length fixed to ceil(n * ratio).
        size = int(np.ceil(y.shape[0] * sample_rate / rate))
        y = soxr.resample(y, rate, sample_rate, quality="soxr_hq")
        y = np.pad(y, (0, max(0, size - y.shape[0])))[:size]
    return np.ascontiguousarray(y, dtype=np.float32)


_ANALYSIS: dict = {}


def _hann(length: int) -> np.ndarray:
    """Periodic Hann window, computed as `scipy.signal.get_window("hann", length)` does."""
    fac = np.linspace(-np.pi, np.pi, length + 1)
    return (0.5 + 0.5 * np.cos(fac))[:-1]


def _analysis(params: FeatureParams):
    """Hann window zero-padded to n_fft (as librosa centres it) and librosa's mel basis.

    Cached per parameter set.
    """
    entry = _ANALYSIS.get(params)
    if entry is None:
        window = np.zeros(params.n_fft)
        offset = (params.n_fft - params.win_length) // 2
        window[offset : offset + params.win_length] = _hann(params.win_length)
        basis = librosa.filters.mel(
            sr=params.sample_rate,
            n_fft=params.n_fft,
            n_mels=params.n_mels,
            fmin=params.fmin,
            fmax=params.fmax,
            htk=False,
            norm="slaney",
            dtype=np.float32,
        )
        entry = _ANALYSIS[params] = (window, basis)
    return entry


def power_spectrogram(y: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """`|STFT|^2` as `librosa.stft(..., center=True, pad_mode="constant")` computes it: (T, F).

    Same steps and dtypes as librosa (float64 windowing, scipy's real FFT, complex64 result),
    with frames along the first axis.
    """
    window, _ = _analysis(params)
    y = np.asarray(y, dtype=np.float32)
    half = params.n_fft // 2
    padded = np.pad(y, (half, half), mode="constant")
    frames = np.lib.stride_tricks.sliding_window_view(padded, params.n_fft)[:: params.hop_length]
    spectrum = scipy.fft.rfft(frames * window, axis=-1).astype(np.complex64)  # (T, n_fft) -> (T, F)
    return np.abs(spectrum) ** 2


def log_mel(y: np.ndarray, params: FeatureParams = FeatureParams()) -> np.ndarray:
    """Log-mel spectrogram of mono audio at `params.sample_rate`.

    Equal to `librosa.power_to_db(librosa.feature.melspectrogram(y=y, ...)).T` with the
    parameters of `params` (tested to 1e-5 dB), computed without librosa's per-call overhead:
    the window and librosa's mel basis are computed once per parameter set, and power values
    below 1e-30 are set to zero before the mel projection (float32 subnormals make the BLAS
    product about 50 times slower; anything below `amin` is floored anyway).

    Args:
        y: float array `(samples,)`.
        params: `FeatureParams`.

    Returns:
        float32 array `(frames, n_mels)` in dB, `frames = 1 + samples // hop_length`.
    """
    _, basis = _analysis(params)
    power = power_spectrogram(y, params)  # (T, F)
    power[power < 1e-30] = 0.0
    # (n_mels, F) @ (F, T) -> (n_mels, T): the memory layout of librosa's product, so the
    # float32 sums are accumulated in the same order.
    mel = (basis @ power.T).T  # -> (T, n_mels)
    # librosa.power_to_db with ref=1.0:
    db = 10.0 * np.log10(np.maximum(params.amin, mel))
    db -= 10.0 * np.log10(np.maximum(params.amin, 1.0))
    if params.top_db is not None and db.size:
        db = np.maximum(db, db.max() - params.top_db)
    return np.ascontiguousarray(db, dtype=np.float32)


def default_cache_dir() -> Path:
    """`<toolkit home>/feature-cache` (see `pipelines.common.paths`)."""
    return toolkit_home() / "feature-cache"


@dataclasses.dataclass
class PrepareResult:
    """Outcome of `FeatureExtractor.prepare`: frame counts of the kept utterances."""

    utterances: list
    num_frames: list[int]
    skipped: Counter = dataclasses.field(default_factory=Counter)


class FeatureExtractor:
    """Log-mel features of audio files, with an optional on-disk cache.

    Args:
        params: `FeatureParams`. Defaults to `FeatureParams()`.
        cache_dir: str, Path or None. Folder of cached `.npy` features; `None` disables the
            cache. `"default"` uses `default_cache_dir()`.

    Example:

    ```python
    extractor = FeatureExtractor(cache_dir=tmp_path)
    x = extractor.compute("a.wav")        # (frames, 80) float32, computed and cached
    x = extractor.compute("a.wav")        # read from the cache, no audio decoded
    ```
    """

    def __init__(self, params: FeatureParams | None = None, cache_dir=None):
        self.params = params or FeatureParams()
        if cache_dir == "default":
            cache_dir = default_cache_dir()
        self.cache_dir = Path(cache_dir).expanduser().absolute() if cache_dir else None
        self._key = self.params.cache_key()

    def cache_path(self, audio_path: str | Path) -> Path | None:
        """Cache file of `audio_path` (from its absolute path, size, mtime and the params)."""
        if self.cache_dir is None:
            return None
        audio_path = os.path.abspath(audio_path)
        stat = os.stat(audio_path)
        ident = f"{audio_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{self._key}"
        digest = hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()
        return self.cache_dir / self._key / digest[:2] / f"{digest}.npy"

    def compute(self, audio_path: str | Path) -> np.ndarray:
        """Features `(frames, n_mels)` of one file, from the cache when present.

        Raises:
            UserError: the audio is missing, unreadable or empty.
        """
        try:
            cached = self.cache_path(audio_path)
        except FileNotFoundError:
            raise UserError(f"{audio_path}: audio file not found") from None
        if cached is not None:
            try:
                return np.load(cached, allow_pickle=False)
            except (FileNotFoundError, ValueError, OSError, EOFError):
                pass  # not cached yet, or a damaged entry: recompute below
        features = log_mel(load_audio(audio_path, self.params.sample_rate), self.params)
        if cached is not None:
            _atomic_save(cached, features)
        return features

    def num_frames_cached(self, audio_path: str | Path) -> int | None:
        """Frame count from the cache file's header, or `None` when not cached."""
        cached = self.cache_path(audio_path)
        try:
            return int(np.load(cached, mmap_mode="r", allow_pickle=False).shape[0])
        except (FileNotFoundError, ValueError, OSError, EOFError, TypeError):
            return None

    def prepare(self, utterances, workers: int | None = None, progress: bool = True):
        """Make sure every utterance's features are cached; return their frame counts.

        Uncached files are computed in `workers` threads (default: one per core). Audio that
        cannot be decoded is skipped with one warning line naming the file and counted under
        `"unreadable_audio"`.

        Returns:
            `PrepareResult` with the kept utterances (input order) and their frame counts.
        """
        if self.cache_dir is None:
            raise ValueError("prepare() needs a cache_dir")
        utterances = list(utterances)
        frames: list[int | None] = [None] * len(utterances)
        errors: dict[int, str] = {}
        todo = []
        for i, utt in enumerate(utterances):
            try:
                frames[i] = self.num_frames_cached(utt.audio_filepath)
            except FileNotFoundError:
                errors[i] = f"{utt.audio_filepath}: audio file not found"
                continue
            if frames[i] is None:
                todo.append(i)
        if workers is None:
            workers = os.cpu_count() or 1
        items = [(i, utterances[i].audio_filepath) for i in todo]
        chunks = [items[k : k + 8] for k in range(0, len(items), 8)]
        if todo:
            _analysis(self.params)  # once, before the threads share it
        with (
            progress_bar(
                len(todo), "log-mel features", "file", enabled=progress and bool(todo)
            ) as bar,
            single_blas_thread(),
        ):
            # Threads, not processes: reading, resampling, the FFT and the mel product release
            # the GIL, and threads cost nothing to start (worker processes need seconds each to
            # import their modules, which a 2-core machine does not win back).
            with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
                for results in pool.map(
                    functools.partial(_compute_chunk, self.params, str(self.cache_dir)), chunks
                ):
                    for i, n, error in results:
                        frames[i] = n
                        if error:
                            errors[i] = error
                    bar.update(len(results))
        kept, counts, skipped = [], [], Counter()
        for i, utt in enumerate(utterances):
            if i in errors or frames[i] is None:
                message = errors.get(i, f"{utt.audio_filepath}: no features")
                print(f"warning: skipping {message}", file=sys.stderr, flush=True)
                skipped["missing_audio" if "not found" in message else "unreadable_audio"] += 1
                continue
            kept.append(utt)
            counts.append(int(frames[i]))
        return PrepareResult(kept, counts, skipped)


def single_blas_thread():
    """Limit BLAS to one thread: the small mel product gains nothing from threads, and on a
    busy machine waking them for every utterance costs more than the product itself."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up (threadpoolctl comes with scikit-learn)
        return contextlib.nullcontext()
    return threadpool_limits(1)


def _compute_chunk(params, cache_dir, items):
    extractor = FeatureExtractor(params, cache_dir)
    results = []
    for i, path in items:
        try:
            results.append((i, int(extractor.compute(path).shape[0]), None))
        except UserError as error:
            results.append((i, None, str(error)))
    return results


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


@dataclasses.dataclass
class FeatureStats:
    """Per-band mean and standard deviation of the training features.

    `normalize(x) = (x - mean) / std`. `get_config()` is plain JSON (lists of floats), to be
    stored with the model (e.g. as the weights of a `keras.layers.Normalization`).
    """

    mean: np.ndarray
    std: np.ndarray
    frames: int

    @classmethod
    def from_features(cls, features, min_std: float = 1e-3) -> FeatureStats:
        """Accumulate statistics over an iterable of `(frames, n_mels)` arrays (float64 sums)."""
        total = sq = None
        count = 0
        for x in features:
            x = np.asarray(x, dtype=np.float64)
            if total is None:
                total = np.zeros(x.shape[-1])
                sq = np.zeros(x.shape[-1])
            total += x.sum(axis=0)
            sq += np.square(x).sum(axis=0)
            count += x.shape[0]
        if not count:
            raise UserError("cannot compute feature statistics: no training frames")
        mean = total / count
        var = np.maximum(sq / count - np.square(mean), 0.0)
        std = np.maximum(np.sqrt(var), min_std)
        return cls(mean.astype(np.float32), std.astype(np.float32), int(count))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float32) - self.mean) / self.std).astype(np.float32)

    def get_config(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "frames": self.frames}

    @classmethod
    def from_config(cls, config: dict) -> FeatureStats:
        return cls(
            np.asarray(config["mean"], np.float32),
            np.asarray(config["std"], np.float32),
            int(config["frames"]),
        )


def compute_stats(extractor: FeatureExtractor, utterances) -> FeatureStats:
    """`FeatureStats` over the (cached) features of `utterances` (the training split)."""
    return FeatureStats.from_features(extractor.compute(u.audio_filepath) for u in utterances)
