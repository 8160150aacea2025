"""Segmentation of long recordings: cuts in pauses, exact coverage, streaming, joined text."""

import numpy as np
import pytest
import soundfile
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.asr.features import load_audio
from pipelines.asr.segment import (
    cut_point,
    frame_rms,
    iter_segments,
    join_texts,
    split_signal,
    stream_audio,
    transcribe_long,
)
from toolkit.errors import UserError

RATE = 16000


def tones_and_pauses(seed, seconds=95.0, noise=1e-4, rate=RATE):
    """Tones of 0.4-3 s separated by pauses of 0.15-0.8 s (faint noise throughout).

    Returns the signal and the pauses as (start, end) sample pairs.
    """
    rng = np.random.default_rng(seed)
    parts, pauses, position = [], [], 0
    while position < seconds * rate:
        n = int(rng.uniform(0.4, 3.0) * rate)
        t = np.arange(n) / rate
        tone = rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
        gap = int(rng.uniform(0.15, 0.8) * rate)
        parts += [tone, np.zeros(gap)]
        pauses.append((position + n, position + n + gap))
        position += n + gap
    y = np.concatenate(parts)
    y = y + noise * rng.standard_normal(y.shape[0])
    return y.astype(np.float32), pauses


def check_cover(bounds, n, max_samples):
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    for (_, end), (start, _) in zip(bounds, bounds[1:]):
        assert start == end  # contiguous: every sample exactly once, in order
    assert all(0 < end - start <= max_samples for start, end in bounds)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cuts_fall_in_pauses_and_cover_the_signal_once(seed):
    y, pauses = tones_and_pauses(seed)
    bounds = split_signal(y, RATE, max_seconds=10.0)
    check_cover(bounds, len(y), 10 * RATE)
    assert len(bounds) >= 10  # 95 s in segments of at most 10 s
    for _, cut in bounds[:-1]:
        # Every cut inside a pause, at least 40 ms (a quarter of the shortest pause) from its
        # edges: in the silence, not at a tone's onset or tail.
        assert any(a + 0.04 * RATE <= cut <= b - 0.04 * RATE for a, b in pauses), cut / RATE
    # The search window is the last 4 s: segments are 6 to 10 s long (the last may be shorter).
    assert all(6 * RATE <= end - start for start, end in bounds[:-1])


def test_cut_goes_to_the_middle_of_the_longest_pause():
    rate = RATE
    y = 0.5 * np.sin(2 * np.pi * 300 * np.arange(12 * rate) / rate).astype(np.float32)
    y[int(7.0 * rate) : int(7.2 * rate)] = 0.0  # short pause
    y[int(8.0 * rate) : int(9.0 * rate)] = 0.0  # long pause: the cut goes to its middle
    cut = cut_point(y, 10 * rate, 4 * rate, rate)
    assert abs(cut - 8.5 * rate) <= 0.02 * rate


def test_cut_in_a_signal_without_pauses_stays_in_the_window():
    y = np.random.default_rng(0).standard_normal(30 * RATE).astype(np.float32)
    bounds = split_signal(y, RATE, max_seconds=10.0, search_seconds=2.0)
    check_cover(bounds, len(y), 10 * RATE)
    assert all(end - start >= 8 * RATE for start, end in bounds[:-1])


def test_short_and_empty_signals():
    y = np.ones(5 * RATE, np.float32)
    assert split_signal(y, RATE, max_seconds=10.0) == [(0, 5 * RATE)]
    assert split_signal(y[: 10 * RATE], RATE, max_seconds=5.0) == [(0, 5 * RATE)]
    assert split_signal(np.zeros(0, np.float32), RATE) == []


def test_invalid_arguments():
    y = np.zeros(RATE, np.float32)
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        split_signal(y, RATE, max_seconds=0.0)
    with pytest.raises(ValueError, match="search_seconds"):
        split_signal(y, RATE, max_seconds=5.0, search_seconds=6.0)


@settings(max_examples=40, deadline=None)
@given(
    seconds=st.floats(0.01, 60.0),
    max_seconds=st.floats(0.05, 12.0),
    search=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    silent=st.booleans(),
)
def test_segments_always_cover_exactly_once_within_the_maximum(
    seconds, max_seconds, search, seed, silent
):
    rate = 8000
    n = max(1, int(seconds * rate))
    rng = np.random.default_rng(seed)
    y = np.zeros(n, np.float32) if silent else rng.standard_normal(n).astype(np.float32)
    bounds = split_signal(y, rate, max_seconds=max_seconds, search_seconds=search * max_seconds)
    check_cover(bounds, n, max(1, int(max_seconds * rate)))


def test_frame_rms_is_the_rms_of_each_full_frame():
    # The formula of librosa.feature.rms(center=False); librosa's own first call costs seconds.
    y = np.random.default_rng(3).standard_normal(12345).astype(np.float32)
    count = 1 + (len(y) - 400) // 160
    expected = [np.sqrt(np.mean(np.square(y[k * 160 : k * 160 + 400], dtype=np.float64)))
                for k in range(count)]  # fmt: skip
    np.testing.assert_allclose(frame_rms(y, 400, 160), expected, rtol=1e-5)


@pytest.mark.parametrize("rate,channels,subtype", [(16000, 1, "PCM_16"), (48000, 2, "PCM_24")])
def test_streamed_segments_equal_segments_of_the_loaded_file(tmp_path, rate, channels, subtype):
    y, _ = tones_and_pauses(5, seconds=35.0, rate=rate)
    data = np.stack([y * (0.5 + 0.5 * c) for c in range(channels)], axis=-1)
    path = tmp_path / "long.wav"
    soundfile.write(str(path), data, rate, subtype=subtype)
    full = load_audio(path)
    streamed = np.concatenate(list(stream_audio(path, block_seconds=3.3)))
    np.testing.assert_array_equal(streamed, full)  # same down-mix, resampler and length
    segments = list(iter_segments(path, max_seconds=8.0))
    bounds = split_signal(full, RATE, max_seconds=8.0)
    assert [(s, s + len(x)) for s, x in segments] == bounds
    for (start, end), (_, samples) in zip(bounds, segments):
        np.testing.assert_array_equal(samples, full[start:end])


@pytest.mark.parametrize(
    "content,message",
    [(b"", "empty file"), (b"\x00\x01" * 500, "unreadable audio"), (None, "not found")],
)
def test_bad_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.wav"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        list(iter_segments(path))


def test_header_only_wav_is_empty_audio(tmp_path):
    path = tmp_path / "header.wav"
    soundfile.write(str(path), np.zeros(0, np.float32), RATE, subtype="PCM_16")
    with pytest.raises(UserError, match="header.wav: empty audio"):
        list(iter_segments(path))


def test_join_texts():
    assert join_texts(["only one "]) == "only one "
    assert join_texts(["a b ", "", "  ", " c"]) == "a b c"
    assert join_texts([]) == ""


def test_transcribe_long_joins_the_segments_texts_in_order(tmp_path):
    from pipelines.asr.decode import Decoder
    from pipelines.asr.features import FeatureExtractor, log_mel
    from pipelines.asr.model import ModelConfig, build_recognizer

    model = build_recognizer(
        ModelConfig(d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                    intermediate_dim=64, conv_channels=4, dropout=0.0)
    )  # fmt: skip
    # Segments of at most 2.5 s all pad to 256 frames: two compiled shapes, (2, 256), (1, 256).
    decoder = Decoder(model, max_length=12)
    y, _ = tones_and_pauses(9, seconds=9.0)
    path = tmp_path / "a.wav"
    soundfile.write(str(path), y, RATE, subtype="FLOAT")
    extractor = FeatureExtractor()
    result = transcribe_long(path, extractor, decoder, batch_size=2, max_seconds=2.5)
    bounds = split_signal(y, RATE, max_seconds=2.5)
    assert result.segments == [(a / RATE, b / RATE) for a, b in bounds]
    assert len(bounds) >= 4 and len(bounds) % 2 == 1  # several batches, the last one partial
    one_by_one = [
        decoder.transcribe([log_mel(y[a:b], extractor.params)], beam_size=1)[0]
        for a, b in bounds
    ]
    assert result.texts == one_by_one
    assert result.text == join_texts(one_by_one) and len(result.text) > len(bounds)
    assert result.seconds == pytest.approx(len(y) / RATE)
