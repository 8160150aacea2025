"""Where a model looked: native attention maps, attention rollout and Grad-CAM, batched.

All functions take a batch of preprocessed volumes `(B, X, Y, Z, 1)` on the model grid and
return `(probabilities (B,), maps (B, X, Y, Z))`, each map scaled to [0, 1] per scan (min-max),
with the most important voxel the highest value. `Geometry.to_original` (see `preprocess.py`)
then maps a map back onto the stored grid of its scan.

- `native_heatmaps` reads what the forward pass computes anyway, without gradients:
  - attention-gated models: for each gated stage l, the `GatedAttentionPooling` weights `a_l`
    (scaled to a maximum of 1 per scan) times the `AttentionGate` coefficients `alpha_l`, both
    upsampled trilinearly to the input grid; the map is the mean over the gated stages. The gate
    says which regions pass on (coarse context), the pooling weight which positions the
    classifier reads (fine);
  - ViT models: the attention rollout (Abnar & Zuidema, 2020) from the class token to the
    patches, reshaped to the patch grid and upsampled.
- `grad_cam` (Selvaraju et al., 2017) works on any Functional Keras model: the gradient of the
  class score (the `logit` layer if there is one, else the output) with respect to a target
  layer's activation `A` gives channel weights `w_c = mean over positions of dS/dA_c`, and the
  map is `sum_c w_c A_c`, then a ReLU (positive evidence for the class). Without the ReLU the
  sign is kept: regions that speak against the class are negative. Token outputs `(B, T, D)`
  of Transformer blocks are mapped back to the patch grid. Gradients come from small
  per-backend helpers (`tf.GradientTape`, `jax.value_and_grad`, torch autograd), imported only
  when used, so a JAX run never imports TensorFlow.

References:
    - Selvaraju et al., 2017. Grad-CAM: Visual Explanations from Deep Networks via
      Gradient-based Localization. https://arxiv.org/abs/1610.02391
    - Abnar & Zuidema, 2020. Quantifying Attention Flow in Transformers.
      https://arxiv.org/abs/2005.00928
"""

from __future__ import annotations

import keras
import numpy as np

from toolkit.interpret import attention_rollout, upsample_map
from toolkit.layers import (
    AttentionGate,
    GatedAttentionPooling,
    PatchEmbedding,
    TransformerEncoderBlock,
)

__all__ = [
    "METHODS",
    "compute_heatmaps",
    "default_method",
    "grad_cam",
    "heatmap_model",
    "native_heatmaps",
    "normalize_maps",
    "resolve_jit",
]

METHODS = ("native", "gradcam")

# Per-model caches (the model is kept in the value, so an id is never reused by mistake).
_HEATMAP_MODELS: dict[int, tuple[keras.Model, keras.Model]] = {}
_GRAD_FUNCTIONS: dict[tuple, tuple] = {}


def resolve_jit(setting="auto") -> bool:
    """Keras' `jit_compile` for this backend: `"auto"` is off on TensorFlow, on elsewhere.

    XLA's CPU kernels for 3D convolutions are many times slower than TensorFlow's own (see
    `docs`), while JAX without `jit` runs op by op.
    """
    if isinstance(setting, bool):
        return setting
    text = str(setting).lower()
    if text in ("true", "on", "1"):
        return True
    if text in ("false", "off", "0"):
        return False
    return keras.backend.backend() != "tensorflow"


def normalize_maps(maps: np.ndarray) -> np.ndarray:
    """Scale each map of a batch `(B, ...)` to [0, 1] (min-max); a constant map becomes 0."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(len(maps), -1)
    low = flat.min(axis=1, keepdims=True)
    span = flat.max(axis=1, keepdims=True) - low
    scaled = np.where(span > 0, (flat - low) / np.where(span > 0, span, 1.0), 0.0)
    return scaled.reshape(maps.shape).astype(np.float32)


def _single_output(layer):
    """The layer's output tensor in the graph, or the first one when it returns a tuple."""
    output = layer.output
    return output[0] if isinstance(output, (list, tuple)) else output


def _scores_output(layer):
    """The attention scores a layer returned in the graph (second output), or `None`."""
    output = layer.output
    if isinstance(output, (list, tuple)) and len(output) > 1:
        return output[1]
    return None


def default_method(model: keras.Model) -> str:
    """`"native"` for models with attention maps in their graph, else `"gradcam"`."""
    for layer in model.layers:
        if isinstance(layer, (GatedAttentionPooling, TransformerEncoderBlock)):
            if _scores_output(layer) is not None:
                return "native"
    return "gradcam"


def heatmap_model(model: keras.Model) -> keras.Model:
    """A model sharing `model`'s layers whose outputs are the probability and the raw maps.

    Outputs a dict: `"probability"` and, per layer, `"gate/<name>"` (B, *S, 1),
    `"pool/<name>"` (B, *S) or `"attention/<name>"` (B, N, T, T), for every `AttentionGate`,
    `GatedAttentionPooling` and `TransformerEncoderBlock` that returned its scores in the
    graph. Cached per model.
    """
    cached = _HEATMAP_MODELS.get(id(model))
    if cached is not None and cached[0] is model:
        return cached[1]
    outputs = {"probability": model.outputs[0]}
    for layer in model.layers:
        scores = _scores_output(layer)
        if scores is None:
            continue
        if isinstance(layer, AttentionGate):
            outputs[f"gate/{layer.name}"] = scores
        elif isinstance(layer, GatedAttentionPooling):
            outputs[f"pool/{layer.name}"] = scores
        elif isinstance(layer, TransformerEncoderBlock):
            outputs[f"attention/{layer.name}"] = scores
    if len(outputs) == 1:
        raise ValueError(
            f"model {model.name!r} has no attention maps in its graph; use method='gradcam'"
        )
    maps_model = keras.Model(model.inputs[0], outputs, name=f"{model.name}_heatmaps")
    _HEATMAP_MODELS[id(model)] = (model, maps_model)
    return maps_model


def _patch_embedding(model):
    for layer in model.layers:
        if isinstance(layer, PatchEmbedding):
            return layer
    return None


def _combine_native(raw: dict, model: keras.Model, spatial) -> np.ndarray:
    """Native maps (B, *spatial) from the raw outputs of `heatmap_model`."""
    attention = [raw[k] for k in sorted(raw, key=_layer_order(model)) if k.startswith("attention/")]
    if attention:
        rollout = attention_rollout([np.asarray(a, np.float32) for a in attention])
        embed = _patch_embedding(model)
        if embed is None:
            raise ValueError("a Transformer model without PatchEmbedding has no patch grid")
        row = rollout[:, 0, 1:] if embed.use_class_token else rollout.mean(axis=1)
        grid = row.reshape((len(row), *embed.grid_shape))  # (B, P) -> (B, *grid)
        return upsample_map(grid, spatial)
    pools = {k.split("/", 1)[1]: v for k, v in raw.items() if k.startswith("pool/")}
    gates = {k.split("/", 1)[1]: v for k, v in raw.items() if k.startswith("gate/")}
    total, count = None, 0
    for gate_name, alpha in gates.items():
        pool_name = "pool_" + gate_name.split("_", 1)[1] if "_" in gate_name else None
        weights = pools.get(pool_name)
        alpha = np.asarray(alpha, np.float32)[..., 0]  # (B, *S, 1) -> (B, *S)
        if weights is not None:
            weights = np.asarray(weights, np.float32)
            peak = weights.reshape(len(weights), -1).max(axis=1)
            weights = weights / np.maximum(peak, 1e-12).reshape((-1,) + (1,) * (weights.ndim - 1))
            level = weights * alpha
        else:
            level = alpha
        level = upsample_map(level, spatial)
        total = level if total is None else total + level
        count += 1
    if total is None:  # pooling only: mean of the scaled pooling maps
        for weights in pools.values():
            weights = np.asarray(weights, np.float32)
            peak = weights.reshape(len(weights), -1).max(axis=1)
            weights = weights / np.maximum(peak, 1e-12).reshape((-1,) + (1,) * (weights.ndim - 1))
            level = upsample_map(weights, spatial)
            total = level if total is None else total + level
            count += 1
    return total / max(count, 1)


def _layer_order(model):
    names = {layer.name: i for i, layer in enumerate(model.layers)}

    def key(output_key):
        return names.get(output_key.split("/", 1)[-1], 0)

    return key


def _batches(images, batch_size):
    """Yield `(batch, count)`: batches of `batch_size` scans, `count` of them real.

    On JAX the last, partial batch is padded with zeros: every call then has the same shape and
    is compiled once (a new shape means a new XLA compilation, seconds for a 3D CNN on CPU).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 4:
        images = images[..., None]  # (B, X, Y, Z) -> (B, X, Y, Z, 1)
    batch_size = max(1, min(batch_size, len(images)))
    pad = keras.backend.backend() == "jax"
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        count = len(batch)
        if pad and count < batch_size:
            filler = np.zeros((batch_size - count, *batch.shape[1:]), np.float32)
            batch = np.concatenate([batch, filler])
        yield batch, count


def native_heatmaps(model: keras.Model, images, batch_size: int = 4):
    """Probabilities and native maps (gates and pooling, or rollout) of a batch, no gradients.

    Args:
        model: a model from `model.build_model` (or any Functional model whose attention layers
            returned their scores in the graph).
        images: array (B, X, Y, Z, 1) or (B, X, Y, Z), preprocessed.
        batch_size: int. Scans per forward pass. Defaults to `4`.

    Returns:
        `(probabilities (B,), maps (B, X, Y, Z))`, maps in [0, 1] per scan.
    """
    maps_model = heatmap_model(model)
    probabilities, maps = [], []
    for batch, count in _batches(images, batch_size):
        raw = maps_model.predict_on_batch(batch)
        raw = {k: np.asarray(keras.ops.convert_to_numpy(v))[:count] for k, v in raw.items()}
        probabilities.append(raw.pop("probability").reshape(-1))
        maps.append(normalize_maps(_combine_native(raw, model, batch.shape[1:-1])))
    return np.concatenate(probabilities), np.concatenate(maps)


# --------------------------------------------------------------------------------------------
# Grad-CAM.


# Layers that only resample or stack feature maps (the gating signals of the attention-gated
# model): Grad-CAM targets the features themselves.
_NOT_FEATURES = (
    keras.layers.UpSampling2D,
    keras.layers.UpSampling3D,
    keras.layers.Cropping2D,
    keras.layers.Cropping3D,
    keras.layers.Concatenate,
)


def _default_target_layer(model):
    """The last layer whose output is a spatial feature map (not a resampled or stacked copy);
    for a ViT, the input of the last Transformer block (after it only the class token is read,
    so the patches get no gradient).
    """
    rank = len(model.inputs[0].shape)
    candidate, tokens = None, []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, (TransformerEncoderBlock, PatchEmbedding)):
            tokens.append(layer)
            continue
        try:
            shape = tuple(_single_output(layer).shape)
        except (AttributeError, ValueError):
            continue
        if len(shape) == rank and not isinstance(layer, (AttentionGate, *_NOT_FEATURES)):
            if all(s is not None and s > 1 for s in shape[1:-1]):
                candidate = layer
    if len(tokens) >= 2:
        return tokens[-2]
    if candidate is None:
        raise ValueError(f"model {model.name!r} has no spatial layer for Grad-CAM")
    return candidate


def _score_tensor(model):
    names = {layer.name for layer in model.layers}
    if "logit" in names:
        return _single_output(model.get_layer("logit"))
    output_layer = model.layers[-1]
    if isinstance(output_layer, keras.layers.Activation) and output_layer.get_config().get(
        "activation"
    ) in ("sigmoid", "softmax"):
        return output_layer.input
    return model.outputs[0]


def _gradient_function(score_model, injected, sign):
    """A function `(batch, delta) -> (dS/d delta, activation, probability)` as NumPy arrays.

    S is `sign * sum(score)` over the batch (the samples do not interact: inference mode).
    TensorFlow: an eager `GradientTape`. JAX: `jax.value_and_grad` of a `stateless_call`,
    compiled once per batch shape (op-by-op JAX is many times slower). Torch: autograd.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def run(batch, delta):
            delta = tf.convert_to_tensor(delta)
            with tf.GradientTape() as tape:
                tape.watch(delta)
                injected.delta = delta
                score, probability = score_model(batch, training=False)
                total = sign * tf.reduce_sum(score)
            gradient = tape.gradient(total, delta)
            return np.asarray(gradient), np.asarray(injected.activation), np.asarray(probability)

        return run
    if backend == "jax":
        import jax

        def pure(trainable, non_trainable, batch, delta):
            injected.delta = delta
            (score, probability), _ = score_model.stateless_call(
                trainable, non_trainable, batch, training=False
            )
            return sign * keras.ops.sum(score), (injected.activation, probability)

        compiled = jax.jit(jax.value_and_grad(pure, argnums=3, has_aux=True))

        def run(batch, delta):
            trainable = [v.value for v in score_model.trainable_variables]
            non_trainable = [v.value for v in score_model.non_trainable_variables]
            with injected:  # the patched call must be in place while tracing
                (_, (activation, probability)), gradient = compiled(
                    trainable, non_trainable, batch, delta
                )
            return np.asarray(gradient), np.asarray(activation), np.asarray(probability)

        return run
    if backend == "torch":
        import torch

        def run(batch, delta):
            delta = torch.as_tensor(delta).requires_grad_(True)
            injected.delta = delta
            score, probability = score_model(batch, training=False)
            (gradient,) = torch.autograd.grad(sign * score.sum(), delta)
            return (
                gradient.detach().cpu().numpy(),
                injected.activation.detach().cpu().numpy(),
                probability.detach().cpu().numpy(),
            )

        return run
    raise NotImplementedError(f"Grad-CAM has no gradient helper for the {backend!r} backend")


class _Injected:
    """Temporarily adds `delta` to a layer's (first) output and records the activation.

    Differentiating the score with respect to a zero `delta` gives dS/dA at the layer's
    activation A, whatever the graph around the layer (skips, gates), on every backend.
    """

    def __init__(self, layer):
        self.layer = layer
        self.delta = None
        self.activation = None

    def __enter__(self):
        if "call" in self.layer.__dict__:  # already patched (nested use)
            return self
        original = type(self.layer).call.__get__(self.layer)

        def call(*args, **kwargs):
            output = original(*args, **kwargs)
            # In the activation's dtype: float16/bfloat16 under mixed precision.
            if isinstance(output, (list, tuple)):
                self.activation = output[0]
                return (output[0] + keras.ops.cast(self.delta, output[0].dtype), *output[1:])
            self.activation = output
            return output + keras.ops.cast(self.delta, output.dtype)

        object.__setattr__(self.layer, "call", call)
        return self

    def __exit__(self, *exc):
        if "call" in self.layer.__dict__:
            object.__delattr__(self.layer, "call")
        return False


def grad_cam(
    model: keras.Model,
    images,
    layer_name: str | None = None,
    class_index: int = 1,
    relu: bool = True,
    batch_size: int = 4,
    normalize: bool = True,
):
    """Grad-CAM maps of a batch for any Functional Keras model.

    Args:
        model: a Functional model with a single input `(B, *spatial, C)`.
        images: array (B, X, Y, Z, 1) or (B, X, Y, Z).
        layer_name: str or None. Target layer; default: the last layer with a spatial feature
            map output (or the last Transformer block, whose tokens are mapped to the patch
            grid).
        class_index: int. 1: evidence for the positive class (score = logit); 0: for the
            negative class (score = -logit). Defaults to `1`.
        relu: bool. Keep only positive evidence, as in the paper. Defaults to `True`.
        batch_size: int. Defaults to `4`.
        normalize: bool. Scale each map to [0, 1] (min-max). Defaults to `True`; with `False`
            the raw signed maps are returned.

    Returns:
        `(probabilities (B,), maps (B, *spatial))`; the most important voxel has the highest
        value.
    """
    if class_index not in (0, 1):
        raise ValueError(f"class_index must be 0 or 1. Received: class_index={class_index}")
    layer = model.get_layer(layer_name) if layer_name else _default_target_layer(model)
    activation_shape = tuple(_single_output(layer).shape[1:])
    embed = _patch_embedding(model)
    sign = 1.0 if class_index == 1 else -1.0
    key = (id(model), layer.name, sign)
    cached = _GRAD_FUNCTIONS.get(key)
    if cached is None or cached[0] is not model:
        score_model = keras.Model(model.inputs[0], [_score_tensor(model), model.outputs[0]])
        injected = _Injected(layer)
        cached = (model, injected, _gradient_function(score_model, injected, sign))
        _GRAD_FUNCTIONS[key] = cached
    _, injected, run = cached
    probabilities, maps = [], []
    for batch, count in _batches(images, batch_size):
        spatial = batch.shape[1:-1]
        delta = np.zeros((len(batch), *activation_shape), np.float32)
        with injected:
            gradient, activation, probability = run(batch, delta)
        gradient, activation = gradient[:count], activation[:count]
        batch = batch[:count]
        probabilities.append(probability[:count].reshape(-1))
        if activation.ndim == 3:  # tokens (B, T, D) of a Transformer block
            if embed is None:
                raise ValueError("token activations need a PatchEmbedding to find the grid")
            skip = 1 if embed.use_class_token else 0
            activation, gradient = activation[:, skip:], gradient[:, skip:]
        weights = gradient.reshape(len(batch), -1, gradient.shape[-1]).mean(axis=1)  # (B, C)
        cam = np.einsum("b...c,bc->b...", activation, weights)  # (B, *S, C) -> (B, *S)
        if cam.ndim == 2:  # (B, P) -> (B, *grid)
            cam = cam.reshape((len(batch), *embed.grid_shape))
        if relu:
            cam = np.maximum(cam, 0.0)
        cam = upsample_map(cam.astype(np.float32), spatial)
        maps.append(normalize_maps(cam) if normalize else cam)
    return np.concatenate(probabilities), np.concatenate(maps)


def compute_heatmaps(model: keras.Model, images, method: str = "native", batch_size: int = 4):
    """`native_heatmaps` or `grad_cam` by name (`"native"`, `"gradcam"`)."""
    if method == "native":
        return native_heatmaps(model, images, batch_size=batch_size)
    if method == "gradcam":
        return grad_cam(model, images, batch_size=batch_size)
    raise ValueError(f"method must be one of {METHODS}. Received: method={method!r}")
