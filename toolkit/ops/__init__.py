"""Attention core functions."""

from toolkit.ops.attention import scaled_dot_product_attention
