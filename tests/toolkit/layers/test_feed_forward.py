"""Tests for `FeedForward` against NumPy references for GELU, ReLU and SwiGLU."""

import math

import numpy as np
import pytest

from tests.layer_testing import run_layer_test
from toolkit.layers import FeedForward

RNG = np.random.default_rng(3)
_erf = np.vectorize(math.erf)


def _numpy_ffn(layer, x):
    def dense(sublayer, h):
        out = h @ np.asarray(sublayer.kernel)
        return out + np.asarray(sublayer.bias) if layer.use_bias else out

    hidden = dense(layer.intermediate_dense, x)
    if layer.activation == "gelu":
        hidden = 0.5 * hidden * (1.0 + _erf(hidden / np.sqrt(2.0)))
    elif layer.activation == "relu":
        hidden = np.maximum(hidden, 0.0)
    else:
        gate = dense(layer.gate_dense, x)
        hidden = hidden * gate / (1.0 + np.exp(-gate))  # x W1 * swish(x W2)
    return dense(layer.output_dense, hidden)


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
def test_layer_battery(activation, tmp_path):
    run_layer_test(
        FeedForward,
        {"intermediate_dim": 12, "activation": activation, "dropout": 0.1, "output_dim": 5},
        RNG.normal(size=(2, 4, 6)).astype("float32"),
        expected_output_shape=(2, 4, 5),
        tmp_path=tmp_path,
    )


@pytest.mark.parametrize("activation", ["gelu", "relu", "swiglu"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_matches_numpy_reference(activation, use_bias):
    x = RNG.normal(size=(2, 4, 6)).astype("float32")
    layer = FeedForward(intermediate_dim=10, activation=activation, use_bias=use_bias)
    layer.build(x.shape)
    for weight in layer.weights:  # non-zero biases so that they are checked too
        weight.assign(RNG.normal(size=weight.shape).astype("float32") * 0.5)
    out = np.asarray(layer(x))
    assert out.shape == (2, 4, 6)
    np.testing.assert_allclose(out, _numpy_ffn(layer, x), rtol=1e-5, atol=1e-5)


def test_swiglu_has_three_matrices_and_dropout_only_in_training():
    layer = FeedForward(intermediate_dim=8, activation="swiglu", dropout=0.5)
    x = RNG.normal(size=(2, 3, 4)).astype("float32")
    inference = np.asarray(layer(x))
    np.testing.assert_allclose(inference, _numpy_ffn(layer, x), rtol=1e-5, atol=1e-5)
    assert sorted(tuple(w.shape) for w in layer.weights if len(w.shape) == 2) == [
        (4, 8),
        (4, 8),
        (8, 4),
    ]
    assert not np.allclose(np.asarray(layer(x, training=True)), inference)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"intermediate_dim": 0}, "intermediate_dim must be a positive integer"),
        ({"intermediate_dim": 4, "activation": "tanh"}, "activation must be one of"),
        ({"intermediate_dim": 4, "dropout": 1.0}, "dropout must be in"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FeedForward(**kwargs)
