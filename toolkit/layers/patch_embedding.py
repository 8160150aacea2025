"""ViT-style patch embedding for 2D images and 3D volumes."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toolkit")
class PatchEmbedding(keras.layers.Layer):
    """Splits an image or volume into non-overlapping patches and embeds each one (ViT).

    A convolution with kernel = stride = `patch_size` ("valid" padding) maps every patch to a
    `hidden_dim` vector, the same as flattening each patch and applying one dense layer. The
    grid of patches (H/p, W/p) or (D/p, H/p, W/p) is flattened in row-major order to
    P = prod(grid) tokens. Optionally a learned class token is prepended (giving P + 1 tokens,
    the class token at index 0) and a learned position embedding, one vector per token (class
    token included), is added.

    Works channels-last in 2D (B, H, W, C) and 3D (B, D, H, W, C); the rank is inferred in
    `build()`. The spatial dimensions must be static and divisible by the patch size (crop or pad
    beforehand), since the learned position embedding is tied to the grid.

    To turn one value per patch (for instance the class token's row of an attention rollout,
    without the class token itself) back into a map, reshape it to
    `layer.compute_grid_shape(input_shape)` (or `layer.grid_shape` once built); the patch at
    token index i (after the class token) sits at `np.unravel_index(i, grid_shape)`.

    Args:
        patch_size: int or tuple of ints. Patch size, the same along every spatial axis or one
            entry per axis.
        hidden_dim: int. Size of each patch embedding.
        use_class_token: bool. Whether to prepend a learned class token. Defaults to `False`.
        use_position_embedding: bool. Whether to add a learned position embedding. Defaults to
            `True`.
        kernel_initializer: string or initializer. Initializer of the patch projection.
            Defaults to `"glorot_uniform"`.
        bias_initializer: string or initializer. Defaults to `"zeros"`.
        embeddings_initializer: string or initializer. Initializer of the class token and the
            position embedding. Defaults to a truncated normal with standard deviation 0.02.
        **kwargs: base layer arguments such as `name` and `dtype`.

    Call arguments:
        inputs: (B, H, W, C) images or (B, D, H, W, C) volumes.

    Returns:
        Tokens (B, P, hidden_dim), or (B, P + 1, hidden_dim) with the class token at index 0.

    Example:

    >>> import numpy as np
    >>> embed = PatchEmbedding(patch_size=4, hidden_dim=32, use_class_token=True)
    >>> volume = np.random.rand(2, 16, 16, 8, 1).astype("float32")
    >>> tuple(embed(volume).shape), embed.grid_shape
    ((2, 33, 32), (4, 4, 2))

    References:
        - [Dosovitskiy et al., 2021. An Image is Worth 16x16 Words: Transformers for Image
          Recognition at Scale](https://arxiv.org/abs/2010.11929)
    """

    def __init__(
        self,
        patch_size,
        hidden_dim,
        use_class_token=False,
        use_position_embedding=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        embeddings_initializer=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        sizes = patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,)
        if not sizes or any(not isinstance(p, int) or p <= 0 for p in sizes):
            raise ValueError(
                "patch_size must be a positive integer or a tuple of them. "
                f"Received: patch_size={patch_size}"
            )
        if not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(
                f"hidden_dim must be a positive integer. Received: hidden_dim={hidden_dim}"
            )
        self.patch_size = tuple(patch_size) if isinstance(patch_size, list) else patch_size
        self.hidden_dim = hidden_dim
        self.use_class_token = bool(use_class_token)
        self.use_position_embedding = bool(use_position_embedding)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        if embeddings_initializer is None:
            embeddings_initializer = keras.initializers.TruncatedNormal(stddev=0.02)
        self.embeddings_initializer = keras.initializers.get(embeddings_initializer)
        self._grid_shape = None

    def _patch_tuple(self, rank):
        if isinstance(self.patch_size, int):
            return (self.patch_size,) * rank
        if len(self.patch_size) != rank:
            raise ValueError(
                f"patch_size has {len(self.patch_size)} entries but the input has {rank} "
                f"spatial axes. Received: patch_size={self.patch_size}"
            )
        return tuple(self.patch_size)

    def compute_grid_shape(self, input_shape):
        """Grid of patches for an input shape (B, *S, C): `(S_i // p_i for each axis)`."""
        input_shape = tuple(input_shape)
        if len(input_shape) not in (4, 5):
            raise ValueError(
                "PatchEmbedding expects (B, H, W, C) or (B, D, H, W, C). "
                f"Received: input_shape={input_shape}"
            )
        spatial = input_shape[1:-1]
        patch = self._patch_tuple(len(spatial))
        if any(s is None or s % p for s, p in zip(spatial, patch)):
            raise ValueError(
                f"The spatial shape {spatial} must be static and divisible by the patch size "
                f"{patch}. Received: input_shape={input_shape}"
            )
        return tuple(s // p for s, p in zip(spatial, patch))

    @property
    def grid_shape(self):
        """The patch grid (H/p, W/p) or (D/p, H/p, W/p) of the built layer."""
        if self._grid_shape is None:
            raise ValueError("PatchEmbedding.grid_shape is known once the layer is built.")
        return self._grid_shape

    @property
    def num_patches(self):
        """Number of patch tokens P of the built layer (the class token not included)."""
        return math.prod(self.grid_shape)

    def build(self, inputs_shape):
        self._grid_shape = self.compute_grid_shape(inputs_shape)
        rank = len(self._grid_shape)
        conv_cls = keras.layers.Conv2D if rank == 2 else keras.layers.Conv3D
        patch = self._patch_tuple(rank)
        self._projection = conv_cls(
            self.hidden_dim,
            kernel_size=patch,
            strides=patch,
            padding="valid",
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name="projection",
        )
        self._projection.build(inputs_shape)
        num_tokens = self.num_patches + int(self.use_class_token)
        self.class_token = None
        self.position_embedding = None
        if self.use_class_token:
            self.class_token = self.add_weight(
                shape=(1, 1, self.hidden_dim),
                initializer=self.embeddings_initializer,
                name="class_token",
            )
        if self.use_position_embedding:
            self.position_embedding = self.add_weight(
                shape=(num_tokens, self.hidden_dim),
                initializer=self.embeddings_initializer,
                name="position_embedding",
            )
        self.built = True

    def call(self, inputs):
        x = self._projection(inputs)  # (B, *S, C) -> (B, *grid, E)
        x = ops.reshape(x, (ops.shape(x)[0], self.num_patches, self.hidden_dim))  # -> (B, P, E)
        if self.class_token is not None:
            token = ops.cast(self.class_token, x.dtype)
            token = ops.broadcast_to(token, (ops.shape(x)[0], 1, self.hidden_dim))  # (B, 1, E)
            x = ops.concatenate([token, x], axis=1)  # (B, P, E) -> (B, P + 1, E)
        if self.position_embedding is not None:
            x = x + ops.cast(self.position_embedding, x.dtype)[None]  # (1, P(+1), E)
        return x

    def compute_output_shape(self, inputs_shape):
        grid = self.compute_grid_shape(inputs_shape)
        return (inputs_shape[0], math.prod(grid) + int(self.use_class_token), self.hidden_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "patch_size": self.patch_size,
                "hidden_dim": self.hidden_dim,
                "use_class_token": self.use_class_token,
                "use_position_embedding": self.use_position_embedding,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "embeddings_initializer": keras.initializers.serialize(self.embeddings_initializer),
            }
        )
        return config
