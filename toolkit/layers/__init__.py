"""Public attention layers. Every class here is registered for `.keras` serialization."""

from toolkit.layers.bahdanau_attention import BahdanauAttention
from toolkit.layers.luong_attention import LuongAttention
from toolkit.layers.sinusoidal_position_encoding import SinusoidalPositionEncoding
from toolkit.layers.learned_position_embedding import LearnedPositionEmbedding
from toolkit.layers.rotary_embedding import RotaryEmbedding
from toolkit.layers.feed_forward import FeedForward
from toolkit.layers.attention_gate import AttentionGate
from toolkit.layers.gated_attention_pooling import GatedAttentionPooling
from toolkit.layers.patch_embedding import PatchEmbedding
from toolkit.layers.spec_augment import SpecAugment
from toolkit.layers.multi_head_attention import MultiHeadAttention
from toolkit.layers.scaled_dot_product_attention import ScaledDotProductAttention
from toolkit.layers.self_attention import SelfAttention
from toolkit.layers.transformer_encoder_block import TransformerEncoderBlock
from toolkit.layers.transformer_decoder_block import TransformerDecoderBlock
