"""Shared checks that every public layer of `toolkit.layers` must pass.

`run_layer_test` is the one entry point. For a layer class, constructor arguments and example
inputs it checks, each with an assertion that can fail:

1. config round trip: `from_config(get_config())` gives the same config, and every constructor
   argument appears in the config with the value it was given;
2. eager call: output shapes equal `compute_output_shape` (and `expected_output_shape`);
3. symbolic call on `keras.Input`s with an unknown batch size gives the same shapes, also with
   `return_attention_scores=True` where the layer supports it;
4. `.keras` save/load round trip with `safe_mode=True` and no `custom_objects`: identical outputs;
5. one `fit` step on a small functional model: finite loss, and trainable weights change;
6. the `mixed_bfloat16` and `mixed_float16` dtype policies: the output has the compute dtype and is
   finite.
"""

from __future__ import annotations

import inspect
import os

import keras
import numpy as np

MIXED_POLICIES = ("mixed_bfloat16", "mixed_float16")


def _as_list(x):
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def _shape_of(x):
    return tuple(int(d) for d in keras.ops.shape(x))


def _to_numpy(x):
    return keras.ops.convert_to_numpy(keras.ops.cast(x, "float32"))


def _supports_scores(layer):
    return "return_attention_scores" in inspect.signature(layer.call).parameters


def _assert_config_round_trip(layer_cls, init_kwargs):
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for name, value in init_kwargs.items():
        assert name in config, f"{layer_cls.__name__}.get_config() forgets `{name}`"
        got = config[name]
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(got, tuple):
            got = list(got)
        if not isinstance(value, (dict, keras.layers.Layer)):
            assert got == value, f"{layer_cls.__name__} config[{name!r}] = {got!r}, expected {value!r}"
        assert getattr(layer, name, None) is not None or value is None, (
            f"{layer_cls.__name__} does not keep `{name}` as a public attribute"
        )
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config, f"{layer_cls.__name__} config does not round-trip"


def _build_model(layer, input_data, call_kwargs, with_scores):
    inputs = [
        keras.Input(shape=np.shape(x)[1:], dtype=str(np.asarray(x).dtype), name=f"input_{i}")
        for i, x in enumerate(input_data)
    ]
    kwargs = dict(call_kwargs)
    if with_scores:
        kwargs["return_attention_scores"] = True
    outputs = layer(*inputs, **kwargs)
    return keras.Model(inputs, outputs)


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_data,
    call_kwargs=None,
    expected_output_shape=None,
    tmp_path=None,
    run_training=True,
    run_mixed_precision=True,
    run_saving=True,
    atol=1e-5,
):
    """Run the standard battery of layer checks.

    Args:
        layer_cls: the layer class under test.
        init_kwargs: dict. Constructor arguments.
        input_data: array or list of arrays passed positionally to `call` (batch first).
        call_kwargs: dict. Non-tensor keyword arguments for `call`.
        expected_output_shape: tuple, or tuple of tuples for tuple outputs. Checked in eager mode.
        tmp_path: folder for the `.keras` file (pytest's `tmp_path`).
        run_training: bool. Whether to run one `fit` step.
        run_mixed_precision: bool. Whether to check the mixed dtype policies.
        run_saving: bool. Whether to check the `.keras` round trip.
        atol: float. Tolerance for the save/load output comparison.
    """
    call_kwargs = dict(call_kwargs or {})
    input_data = [np.asarray(x) for x in _as_list(input_data)]

    _assert_config_round_trip(layer_cls, init_kwargs)

    # Eager call and compute_output_shape.
    layer = layer_cls(**init_kwargs)
    eager_out = layer(*input_data, **call_kwargs)
    eager_shapes = [_shape_of(o) for o in _as_list(eager_out)]
    if expected_output_shape is not None:
        expected = expected_output_shape
        if not isinstance(expected[0], (tuple, list)):
            expected = [expected]
        assert [tuple(e) for e in expected] == eager_shapes, (
            f"eager output shapes {eager_shapes} != expected {expected}"
        )
    defines_shape = any(
        "compute_output_shape" in k.__dict__
        for k in type(layer).__mro__
        if not k.__module__.startswith("keras")
    )
    if defines_shape:
        shapes = [x.shape for x in input_data]
        computed = layer.compute_output_shape(*shapes)
        computed = computed if isinstance(computed[0], (tuple, list)) else [computed]
        assert [tuple(c) for c in computed] == eager_shapes, (
            f"compute_output_shape {computed} != eager shapes {eager_shapes}"
        )

    # Symbolic call with an unknown batch size, with and without attention scores.
    variants = [False] + ([True] if _supports_scores(layer) else [])
    for with_scores in variants:
        sym_layer = layer_cls(**init_kwargs)
        model = _build_model(sym_layer, input_data, call_kwargs, with_scores)
        sym_shapes = [tuple(o.shape) for o in _as_list(model.outputs)]
        out = model(input_data)
        got = [_shape_of(o) for o in _as_list(out)]
        for sym, real in zip(sym_shapes, got):
            assert sym[0] is None, f"symbolic batch dimension should be None, got {sym}"
            assert len(sym) == len(real), f"symbolic rank {sym} != eager rank {real}"
            for s, r in zip(sym[1:], real[1:]):
                assert s is None or s == r, f"symbolic shape {sym} != eager shape {real}"
        if with_scores:
            assert len(got) >= 2, "return_attention_scores=True must return (output, weights, ...)"
            eager = sym_layer(*input_data, return_attention_scores=True, **call_kwargs)
            assert isinstance(eager, tuple) and len(eager) >= 2

        if run_saving and tmp_path is not None:
            path = os.path.join(str(tmp_path), f"{layer_cls.__name__}_{int(with_scores)}.keras")
            model.save(path)
            loaded = keras.saving.load_model(path, safe_mode=True)
            again = loaded(input_data)
            for a, b in zip(_as_list(out), _as_list(again)):
                np.testing.assert_allclose(_to_numpy(a), _to_numpy(b), atol=atol, rtol=atol)

    if run_training:
        train_layer = layer_cls(**init_kwargs)
        model = _build_model(train_layer, input_data, call_kwargs, False)
        if model.trainable_weights:
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
            out = model(input_data)
            target = np.random.default_rng(0).normal(size=_shape_of(_as_list(out)[0]))
            before = [np.array(w) for w in model.trainable_weights]
            history = model.fit(
                input_data,
                target.astype("float32"),
                batch_size=len(target),
                epochs=1,
                verbose=0,
            )
            loss = history.history["loss"][0]
            assert np.isfinite(loss), f"loss after one fit step is {loss}"
            after = [np.array(w) for w in model.trainable_weights]
            assert any(not np.allclose(a, b) for a, b in zip(before, after)), (
                "no trainable weight changed after one fit step"
            )

    if run_mixed_precision:
        for policy in MIXED_POLICIES:
            kwargs = dict(init_kwargs, dtype=policy)
            mp_layer = layer_cls(**kwargs)
            out = mp_layer(*input_data, **call_kwargs)
            first = _as_list(out)[0]
            compute_dtype = keras.mixed_precision.Policy(policy).compute_dtype
            assert keras.backend.standardize_dtype(first.dtype) == compute_dtype, (
                f"{policy}: output dtype {first.dtype}, expected {compute_dtype}"
            )
            assert np.all(np.isfinite(_to_numpy(first))), f"{policy}: non-finite output"
