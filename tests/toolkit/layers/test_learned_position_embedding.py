"""Tests for `LearnedPositionEmbedding`: table rows, start offsets, limits."""

import keras
import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import LearnedPositionEmbedding


def test_layer_battery(tmp_path):
    run_layer_test(
        LearnedPositionEmbedding,
        {"sequence_length": 10},
        np.random.default_rng(0).normal(size=(2, 7, 6)).astype("float32"),
        expected_output_shape=(2, 7, 6),
        tmp_path=tmp_path,
    )


def test_returns_table_rows_broadcast_over_batch():
    layer = LearnedPositionEmbedding(sequence_length=12)
    out = np.asarray(layer(np.ones((3, 5, 4), "float32")))
    table = np.asarray(layer.position_embeddings)
    assert table.shape == (12, 4)
    assert out.shape == (3, 5, 4)
    for b in range(3):
        np.testing.assert_array_equal(out[b], table[:5])


@pytest.mark.parametrize("start_index", [0, 3, 11])
def test_start_index_gives_rows_of_full_embedding(start_index):
    layer = LearnedPositionEmbedding(sequence_length=12)
    full = np.asarray(layer(np.zeros((2, 12, 4), "float32")))
    for start in (start_index, keras.ops.convert_to_tensor(start_index, "int32")):
        step = np.asarray(layer(np.zeros((2, 1, 4), "float32"), start_index=start))
        np.testing.assert_array_equal(step, full[:, start_index : start_index + 1])


def test_too_long_input_is_an_error():
    layer = LearnedPositionEmbedding(sequence_length=4)
    with pytest.raises(ValueError, match="at most sequence_length=4"):
        layer(np.zeros((1, 3, 2), "float32"), start_index=2)


def test_rejects_bad_sequence_length():
    with pytest.raises(ValueError, match="sequence_length must be a positive integer"):
        LearnedPositionEmbedding(sequence_length=0)
