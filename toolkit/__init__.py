"""Keras 3 attention toolkit: attention ops, layers, interpretation and tracking.

Backend-agnostic: everything under `toolkit` uses `keras.ops` only, so the same code runs on
TensorFlow (the default backend) and JAX.
"""

__version__ = "0.1.0"
