"""Log-mel features against librosa, the feature cache, and normalisation statistics."""

from __future__ import annotations

import json
import os

import librosa
import numpy as np
import pytest
import soundfile

from pipelines.asr import features as features_module
from pipelines.asr.data import Utterance
from pipelines.asr.features import (
    FeatureExtractor,
    FeatureParams,
    FeatureStats,
    compute_stats,
    load_audio,
    log_mel,
)
from toolkit.errors import UserError


def _tone(path, seconds=1.0, rate=16000, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    y = np.stack(
        [0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=-1
    ) + 0.01 * rng.standard_normal((t.size, channels))
    soundfile.write(str(path), y.astype("float32"), rate, subtype="PCM_16")
    return path


def _librosa_reference(path):
    y, _ = librosa.load(str(path), sr=16000, mono=True)
    mel = librosa.feature.melspectrogram(
        y=y, sr=16000, n_fft=512, win_length=400, hop_length=160, n_mels=80, htk=False,
        norm="slaney", power=2.0,
    )  # fmt: skip
    return librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=80.0).T


@pytest.mark.parametrize("rate, channels", [(16000, 1), (44100, 2), (8000, 1)])
def test_features_equal_direct_librosa(tmp_path, rate, channels):
    path = _tone(tmp_path / "a.wav", 0.8, rate, channels)
    got = FeatureExtractor().compute(path)
    expected = _librosa_reference(path)
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (1 + len(load_audio(path)) // 160, 80)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_log_mel_matches_numpy_formula():
    # Independent check of the documented formula for one frame, without librosa's STFT.
    params = FeatureParams()
    y = np.random.default_rng(3).standard_normal(16000).astype("float32") * 0.1
    got = log_mel(y, params)
    window = np.zeros(512)
    window[56:456] = librosa.filters.get_window("hann", 400)  # centred in n_fft
    frame = np.pad(y, 256)[1600 : 1600 + 512]  # frame 10, centred padding of n_fft // 2
    power = np.abs(np.fft.rfft(frame * window)) ** 2
    mel_basis = librosa.filters.mel(sr=16000, n_fft=512, n_mels=80, norm="slaney", htk=False)
    db = 10 * np.log10(np.maximum(mel_basis @ power, 1e-10))
    np.testing.assert_allclose(got[10], np.maximum(db, got.max() - 80.0), atol=2e-3)


def test_stereo_is_down_mixed_and_rates_resampled(tmp_path):
    path = _tone(tmp_path / "s.wav", 0.5, 48000, 2)
    y = load_audio(path)
    assert y.ndim == 1 and y.dtype == np.float32 and abs(len(y) - 8000) <= 1


def test_cache_hit_reads_no_audio(tmp_path, monkeypatch):
    path = _tone(tmp_path / "a.wav")
    extractor = FeatureExtractor(cache_dir=tmp_path / "cache")
    first = extractor.compute(path)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1

    def no_audio(*args, **kwargs):
        raise AssertionError("audio was read on a cache hit")

    monkeypatch.setattr(features_module, "load_audio", no_audio)
    monkeypatch.setattr(soundfile, "read", no_audio)
    np.testing.assert_array_equal(
        FeatureExtractor(cache_dir=tmp_path / "cache").compute(path), first
    )
    assert extractor.num_frames_cached(path) == first.shape[0]


def test_cache_invalidated_by_parameters_and_file_change(tmp_path, monkeypatch):
    path = _tone(tmp_path / "a.wav")
    cache = tmp_path / "cache"
    base = FeatureExtractor(cache_dir=cache)
    base.compute(path)
    calls = []
    real = features_module.load_audio
    monkeypatch.setattr(
        features_module, "load_audio", lambda *a, **k: calls.append(a[0]) or real(*a, **k)
    )
    other = FeatureExtractor(FeatureParams(n_mels=40), cache_dir=cache)
    assert other.cache_path(path) != base.cache_path(path)
    assert other.compute(path).shape[1] == 40 and len(calls) == 1
    base.compute(path)
    assert len(calls) == 1  # the 80-band entry is still valid
    _tone(path, seconds=0.5, seed=1)  # rewrite the audio: new size and mtime
    os.utime(path, ns=(1, 1))
    assert base.compute(path).shape[0] == 1 + 8000 // 160 and len(calls) == 2
    assert len(list(cache.rglob("*.npy"))) == 3


def test_prepare_counts_frames_and_skips_bad_audio(tmp_path, capsys):
    utts = []
    for i, seconds in enumerate([0.3, 0.5]):
        p = _tone(tmp_path / f"u{i}.wav", seconds, seed=i)
        utts.append(Utterance(str(p), "text", seconds, p.stem))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF0000WAVEjunkjunkjunk")
    utts.insert(1, Utterance(str(bad), "text", 1.0, "bad"))
    extractor = FeatureExtractor(cache_dir=tmp_path / "cache")
    result = extractor.prepare(utts, workers=1, progress=False)
    assert [u.id for u in result.utterances] == ["u0", "u1"]
    assert result.num_frames == [1 + 4800 // 160, 1 + 8000 // 160]
    assert dict(result.skipped) == {"unreadable_audio": 1}
    err = capsys.readouterr().err
    assert err.count("warning: skipping") == 1 and "bad.wav" in err


def test_load_audio_errors_are_user_errors(tmp_path):
    (tmp_path / "e.wav").write_bytes(b"")
    with pytest.raises(UserError, match=r"e\.wav: unreadable audio"):
        load_audio(tmp_path / "e.wav")
    with pytest.raises(UserError, match="not found"):
        FeatureExtractor(cache_dir=tmp_path).compute(tmp_path / "missing.wav")


def test_stats_match_numpy_and_serialise(tmp_path):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(3.0, 2.0, size=(n, 80)).astype("float32") for n in (10, 25, 7)]
    stats = FeatureStats.from_features(arrays)
    stacked = np.concatenate(arrays)
    np.testing.assert_allclose(stats.mean, stacked.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.std, stacked.std(axis=0), rtol=1e-4)
    assert stats.frames == 42
    again = FeatureStats.from_config(json.loads(json.dumps(stats.get_config())))
    np.testing.assert_array_equal(again.mean, stats.mean)
    normed = again.normalize(stacked)
    np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normed.std(axis=0), 1.0, atol=1e-3)
    paths = [_tone(tmp_path / f"t{i}.wav", 0.2, seed=i) for i in range(2)]
    utts = [Utterance(str(p), "x", 0.2, p.stem) for p in paths]
    extractor = FeatureExtractor(cache_dir=tmp_path / "c")
    from_files = compute_stats(extractor, utts)
    expected = np.concatenate([extractor.compute(p) for p in paths])
    np.testing.assert_allclose(from_files.mean, expected.mean(axis=0), atol=1e-4)


def test_params_validation_and_config():
    params = FeatureParams(n_mels=64)
    assert FeatureParams.from_config(params.get_config()) == params
    assert params.cache_key() != FeatureParams().cache_key()
    with pytest.raises(ValueError, match="win_length must be <= n_fft"):
        FeatureParams(win_length=600)
