"""Lesion classifiers of the medical pipeline, chosen by `model.name` in the config.

Both models take a batch of preprocessed volumes `(B, X, Y, Z, 1)` on the model grid (RAS+,
see `preprocess.py`) and return the probability that a scan holds a lesion, `(B, 1)`. Each one
carries its own explanation:

- `attention-gated` (default): a 3D CNN in the AG-Sononet style (Schlemper et al., 2019). A
  strided stem and `len(filters) - 1` strided stages of two 3x3x3 convolutions halve the grid
  each time. The intermediate stages listed in `gated_stages` (0 is the stem) are multiplied
  by `AttentionGate` coefficients; each gate's gating signal is the next stage and the
  coarsest one, upsampled to the gated stage's grid, so there is one coefficient per cell of
  that stage, decided with near and far context. Every gated stage, plus
  the coarsest stage itself, is pooled over its spatial positions by `GatedAttentionPooling`
  (Ilse et al., 2018), restricted to the cells that contain foreground (`ForegroundMask`: the
  head, not air or padding). The pooled vectors and the largest coefficient of each gate are
  concatenated and a single logit gives the probability. Where the training data has lesion
  masks, the gates are fitted to them (`train.py`, `optim.mask_loss_weight`): each gate
  becomes a lesion map and its peak a lesion-detector score, which is what makes the model
  learn from a few hundred scans instead of memorising them. The gate coefficients and pooling
  weights, which the forward pass computes anyway, are the model's native heatmap
  (`heatmaps.native_heatmaps`): no gradients needed.
- `vit`: a small 3D Vision Transformer: `PatchEmbedding` (with a class token and learned
  position embeddings), `num_layers` pre-norm `TransformerEncoderBlock`s, a final LayerNorm, and
  the class token's logit. Its heatmap is the attention rollout (Abnar & Zuidema, 2020) from the
  class token to the patches.

Every model starts with a `ScanPreprocessing` layer: the identity on the tensor, it stores the
preprocessing parameters (voxel spacing, grid, normalisation) and the pipeline's metadata (class
names, decision threshold, heatmap settings) in the model's config, so `model.keras` is
self-contained: `load_model` (with `safe_mode=True` and no `custom_objects`, once this module is
imported) gives everything `predict` needs. The classifier's last two layers are `logit`
(`Dense(1)`) and `probability` (sigmoid): Grad-CAM differentiates the logit, which does not
saturate.

References:
    - Schlemper et al., 2019. Attention gated networks: Learning to leverage salient regions in
      medical images. https://arxiv.org/abs/1808.08114
    - Ilse et al., 2018. Attention-based Deep Multiple Instance Learning.
      https://arxiv.org/abs/1802.04712
    - Dosovitskiy et al., 2021. An Image is Worth 16x16 Words. https://arxiv.org/abs/2010.11929
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import keras

from pipelines.medimg.preprocess import PreprocessConfig
from toolkit.layers import (
    AttentionGate,
    GatedAttentionPooling,
    PatchEmbedding,
    TransformerEncoderBlock,
)

__all__ = [
    "CLASS_NAMES",
    "ClassToken",
    "ForegroundMask",
    "MODEL_NAMES",
    "ModelConfig",
    "ScanPreprocessing",
    "build_model",
    "model_metadata",
    "preprocess_config_of",
    "preprocess_to_dict",
]

PACKAGE = "medimg"
MODEL_NAMES = ("attention-gated", "vit")
CLASS_NAMES = ("normal", "lesion")


@dataclasses.dataclass
class ModelConfig:
    """The `model:` section of a config.

    Attributes:
        name: `"attention-gated"` (default) or `"vit"`.
        filters: attention-gated: channels of the stem and of each strided stage; the last
            stage is the coarsest. Each entry halves the grid.
        gated_stages: attention-gated: indices of the stages multiplied by attention gates
            (0 = stem, up to `len(filters) - 2`).
        gate_dim: attention-gated: `intermediate_dim` of each `AttentionGate`.
        pooling_dim: attention-gated: `intermediate_dim` of each `GatedAttentionPooling`.
        dropout: dropout before the logit (both models) and inside the Transformer (vit).
        patch_size: vit: patch edge in voxels (the grid must be divisible by it).
        hidden_dim: vit: token width.
        num_layers: vit: Transformer blocks.
        num_heads: vit: attention heads.
        intermediate_dim: vit: feed-forward width.
    """

    name: Literal["attention-gated", "vit"] = "attention-gated"
    filters: list[int] = dataclasses.field(default_factory=lambda: [16, 32, 64, 128])
    gated_stages: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    gate_dim: int = 32
    pooling_dim: int = 64
    dropout: float = 0.3
    patch_size: int = 16
    hidden_dim: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_dim: int = 256

    def __post_init__(self):
        if len(self.filters) < 2 or any(f <= 0 for f in self.filters):
            raise ValueError(
                "filters needs at least two positive entries (stem and gating stage). "
                f"Received: filters={self.filters}"
            )
        if not self.gated_stages or any(
            not 0 <= s <= len(self.filters) - 2 for s in self.gated_stages
        ):
            raise ValueError(
                f"gated_stages must be indices in [0, {len(self.filters) - 2}] (0 = stem). "
                f"Received: gated_stages={self.gated_stages}"
            )
        if len(set(self.gated_stages)) != len(self.gated_stages):
            raise ValueError(f"gated_stages has duplicates. Received: {self.gated_stages}")
        for key in ("gate_dim", "pooling_dim", "patch_size", "hidden_dim", "num_layers"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive. Received: {key}={getattr(self, key)}")
        if self.num_heads <= 0 or self.hidden_dim % self.num_heads:
            raise ValueError(
                "num_heads must be positive and divide hidden_dim. Received: "
                f"num_heads={self.num_heads}, hidden_dim={self.hidden_dim}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={self.dropout}")


@keras.saving.register_keras_serializable(package=PACKAGE)
class ScanPreprocessing(keras.layers.Layer):
    """Identity layer that keeps the preprocessing parameters and metadata inside a model.

    The volumes a model sees are prepared outside the graph (`preprocess.preprocess`: RAS+
    reorientation, resampling, crop/pad, intensity normalisation). This layer stores the
    parameters of that preparation, and what else `predict` must know (class names, threshold,
    heatmap settings), in the model's config, so a saved `.keras` file describes its own input.

    Args:
        preprocess: dict. The fields of `preprocess.PreprocessConfig`.
        metadata: dict or None. JSON-serialisable pipeline metadata. Defaults to `None` (`{}`).
        **kwargs: base layer arguments.

    Call arguments:
        inputs: (B, X, Y, Z, 1) preprocessed volumes.

    Returns:
        `inputs`, unchanged.
    """

    def __init__(self, preprocess, metadata=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(preprocess, dict):
            raise ValueError(f"preprocess must be a dict. Received: {type(preprocess)}")
        self.preprocess = copy.deepcopy(preprocess)
        self.metadata = copy.deepcopy(metadata or {})

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update({"preprocess": self.preprocess, "metadata": self.metadata})
        return config


def preprocess_to_dict(preprocess: PreprocessConfig) -> dict:
    """The fields of a `PreprocessConfig` as a JSON-ready dict (what `ScanPreprocessing` keeps)."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(preprocess, f.name)) for f in dataclasses.fields(preprocess)}


def _preprocessing_layer(model: keras.Model) -> ScanPreprocessing:
    for layer in model.layers:
        if isinstance(layer, ScanPreprocessing):
            return layer
    raise ValueError(
        f"model {model.name!r} has no ScanPreprocessing layer: it was not built by "
        "pipelines.medimg.model.build_model"
    )


def preprocess_config_of(model: keras.Model) -> PreprocessConfig:
    """The `PreprocessConfig` stored in a model built by `build_model`."""
    stored = dict(_preprocessing_layer(model).preprocess)
    known = {f.name for f in dataclasses.fields(PreprocessConfig)}
    values = {}
    for key, value in stored.items():
        if key in known:
            values[key] = tuple(value) if isinstance(value, list) else value
    return PreprocessConfig(**values)


def model_metadata(model: keras.Model) -> dict:
    """The metadata dict stored in a model built by `build_model` (a copy)."""
    return copy.deepcopy(_preprocessing_layer(model).metadata)


# --------------------------------------------------------------------------------------------
# Architectures.


@keras.saving.register_keras_serializable(package=PACKAGE)
class ForegroundMask(keras.layers.Layer):
    """Which cells of a stride-`factor` feature grid contain foreground (head, not air).

    A voxel is foreground when its intensity exceeds `min + fraction * (max - min)` of its
    volume (air and the padding outside the field of view are the minimum after
    normalisation); a cell of the grid downsampled by `factor` (as stride-2 "same" convolutions
    do, `ceil(n / factor)` cells per axis) is foreground when at least `coverage` of its voxels
    are. Attention pooling restricted to these cells cannot settle on the grid's border, on
    empty space or on cells that are mostly air at the head's edge, whose features stand out
    through the edge and the zero padding rather than through tissue.

    Args:
        factor: int. Downsampling factor of the feature grid.
        fraction: float. Threshold between the volume's minimum and maximum. Defaults to `0.1`.
        coverage: float. Share of foreground voxels a cell needs. Defaults to `0.5`.

    Call arguments:
        inputs: (B, X, Y, Z, 1) volumes.

    Returns:
        Boolean mask (B, ceil(X / f), ceil(Y / f), ceil(Z / f)).
    """

    def __init__(self, factor, fraction=0.1, coverage=0.5, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive integer. Received: factor={factor}")
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1). Received: fraction={fraction}")
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1]. Received: coverage={coverage}")
        self.factor = factor
        self.fraction = fraction
        self.coverage = coverage

    def call(self, inputs):
        axes = tuple(range(1, len(inputs.shape)))
        low = keras.ops.min(inputs, axis=axes, keepdims=True)
        high = keras.ops.max(inputs, axis=axes, keepdims=True)
        voxels = keras.ops.cast(inputs > low + self.fraction * (high - low), "float32")
        if self.factor > 1:
            # (B, X, Y, Z, 1) -> (B, X/f, Y/f, Z/f, 1): the foreground share of each cell.
            voxels = keras.ops.average_pool(voxels, self.factor, self.factor, padding="same")
        return voxels[..., 0] >= self.coverage  # (B, *S, 1) -> (B, *S)

    def compute_output_shape(self, inputs_shape):
        spatial = [None if n is None else -(-n // self.factor) for n in inputs_shape[1:-1]]
        return (inputs_shape[0], *spatial)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="bool")

    def get_config(self):
        config = super().get_config()
        config.update({"factor": self.factor, "fraction": self.fraction, "coverage": self.coverage})
        return config


def _conv_bn_relu(x, filters, strides, name):
    x = keras.layers.Conv3D(
        filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    # Momentum 0.9: the moving statistics settle within tens of steps (small 3D batches).
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def _on_grid(tensor, factor, shape, name):
    """`tensor` upsampled `factor` times (nearest) and cropped to the spatial `shape`.

    Stride-2 "same" convolutions round odd sizes up, so the upsampled grid can be one cell
    larger than the finer stage it is brought to; the extra cells are at the far end.
    """
    if factor > 1:
        tensor = keras.layers.UpSampling3D(factor, name=f"{name}_up")(tensor)
    extra = [int(have) - int(want) for have, want in zip(tensor.shape[1:-1], shape)]
    if any(extra):
        tensor = keras.layers.Cropping3D(tuple((0, e) for e in extra), name=f"{name}_crop")(tensor)
    return tensor


def _attention_gated(x, config: ModelConfig):
    filters = config.filters
    stages = [_conv_bn_relu(x, filters[0], 2, "stem")]
    for index, width in enumerate(filters[1:], start=1):
        h = _conv_bn_relu(stages[-1], width, 2, f"stage{index}_a")
        stages.append(_conv_bn_relu(h, width, 1, f"stage{index}_b"))
    last = len(filters) - 1
    pooled, peaks = [], []
    for index in [*sorted(config.gated_stages), last]:
        features = stages[index]
        if index != last:
            # The gating signal: the next stage and the coarsest one, brought to this stage's
            # grid, so the gate decides per cell of this stage (a lesion-sized region) with
            # near and far context.
            deeper = [
                _on_grid(stages[d], 2 ** (d - index), features.shape[1:-1], f"gating{index}_{d}")
                for d in sorted({index + 1, last})
            ]
            gating = (
                deeper[0]
                if len(deeper) == 1
                else keras.layers.Concatenate(name=f"gating_{index}")(deeper)
            )
            gate = AttentionGate(config.gate_dim, name=f"gate_{index}")
            features, alpha = gate(features, gating, return_attention_scores=True)
            # The strongest gate coefficient: a lesion-detector score the classifier reads
            # directly (with mask supervision the gate is a lesion map, see train.py).
            peaks.append(keras.layers.GlobalMaxPooling3D(name=f"gate_peak_{index}")(alpha))
        # Stage i is the input downsampled 2^(i+1) times (stem = stage 0).
        mask = ForegroundMask(2 ** (index + 1), name=f"foreground_{index}")(x)
        pool = GatedAttentionPooling(config.pooling_dim, name=f"pool_{index}")
        vector, _ = pool(features, mask=mask, return_attention_scores=True)
        pooled.append(vector)
    return keras.layers.Concatenate(name="pooled")(pooled + peaks)


def _vit(x, config: ModelConfig):
    embed = PatchEmbedding(
        config.patch_size, config.hidden_dim, use_class_token=True, name="patch_embedding"
    )
    tokens = embed(x)
    for index in range(config.num_layers):
        block = TransformerEncoderBlock(
            num_heads=config.num_heads,
            key_dim=config.hidden_dim // config.num_heads,
            intermediate_dim=config.intermediate_dim,
            dropout=0.0,
            name=f"block_{index}",
        )
        # The weights are outputs of the graph, so the heatmap model can read them.
        tokens, _ = block(tokens, return_attention_scores=True)
    tokens = keras.layers.LayerNormalization(epsilon=1e-5, name="final_norm")(tokens)
    return ClassToken(name="class_token")(tokens)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClassToken(keras.layers.Layer):
    """Takes the class token (index 0) of a token sequence: (B, T, D) -> (B, D)."""

    def call(self, tokens):
        return tokens[:, 0]  # (B, T, D) -> (B, D)

    def compute_output_shape(self, inputs_shape):
        return (inputs_shape[0], inputs_shape[-1])


def build_model(
    config: ModelConfig,
    preprocess: PreprocessConfig,
    metadata: dict | None = None,
    name: str | None = None,
) -> keras.Model:
    """Build the classifier named by `config.name` for the grid of `preprocess`.

    Args:
        config: `ModelConfig`.
        preprocess: `PreprocessConfig`. Its `shape` is the input grid; all its fields are stored
            in the model.
        metadata: dict or None. Extra metadata stored in the model (threshold, ...); the
            architecture name and class names are added.
        name: str or None. Model name. Defaults to the architecture name.

    Returns:
        A Functional `keras.Model` from `(B, X, Y, Z, 1)` to probabilities `(B, 1)`.

    Example:

    ```python
    model = build_model(ModelConfig(), PreprocessConfig(shape=(32, 40, 32)))
    model.output.shape  # (None, 1)
    ```
    """
    shape = tuple(int(n) for n in preprocess.shape)
    info = {"architecture": config.name, "class_names": list(CLASS_NAMES), "threshold": 0.5}
    info.update(metadata or {})
    info["model_config"] = dataclasses.asdict(config)
    inputs = keras.Input((*shape, 1), name="scan")
    x = ScanPreprocessing(preprocess_to_dict(preprocess), info, name="scan_preprocessing")(inputs)
    if config.name == "attention-gated":
        divisor = 2 ** (len(config.filters))
        if any(n < divisor // 2 for n in shape):
            raise ValueError(
                f"the grid {shape} is too small for {len(config.filters)} stride-2 stages"
            )
        features = _attention_gated(x, config)
    elif config.name == "vit":
        if any(n % config.patch_size for n in shape):
            raise ValueError(
                f"the grid {shape} must be divisible by model.patch_size={config.patch_size}"
            )
        features = _vit(x, config)
    else:  # pragma: no cover - the config's Literal type rejects it first
        raise ValueError(f"unknown model name {config.name!r}; known: {MODEL_NAMES}")
    features = keras.layers.Dropout(config.dropout, name="dropout")(features)
    logit = keras.layers.Dense(1, name="logit")(features)
    probability = keras.layers.Activation("sigmoid", name="probability", dtype="float32")(logit)
    return keras.Model(inputs, probability, name=name or config.name.replace("-", "_"))
