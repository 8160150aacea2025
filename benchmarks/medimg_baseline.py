"""The baseline of the medical benchmark: keras.io's "3D image classification from CT scans".

The model of https://keras.io/examples/vision/3D_image_classification/ (Zunair, 2020), as
published: four blocks of `Conv3D` (64, 64, 128, 256 filters, kernel 3, ReLU, "valid"
padding), `MaxPool3D(2)` and `BatchNormalization`, then global average pooling, `Dense(512)`
with ReLU, dropout 0.3 and one sigmoid unit. Two mechanical changes so it fits the pipeline,
neither of which changes what it computes: the final `Dense(1, activation="sigmoid")` is split
into `Dense(1)` named `logit` and a sigmoid `Activation` (Grad-CAM differentiates the logit),
and a `ScanPreprocessing` identity layer stores the preprocessing parameters, so `predict` and
`evaluate` read the file like any other model of the pipeline. Its heatmaps are Grad-CAM maps
of the last convolutional block (`heatmaps.grad_cam`).
"""

from __future__ import annotations

import keras

from pipelines.medimg.model import CLASS_NAMES, ScanPreprocessing, preprocess_to_dict

ARCHITECTURE = "keras-io-3d-cnn"


def build_baseline(model_config=None, preprocess=None, metadata=None) -> keras.Model:
    """The keras.io 3D CT classifier for the grid of `preprocess` (signature of `model_fn`).

    Args:
        model_config: ignored (the architecture is fixed); accepted for `train(model_fn=...)`.
        preprocess: `PreprocessConfig`; its `shape` is the input grid.
        metadata: dict or None. Stored in the model like `model.build_model` does.

    Returns:
        A Functional model `(B, X, Y, Z, 1) -> (B, 1)`.
    """
    info = {"architecture": ARCHITECTURE, "class_names": list(CLASS_NAMES), "threshold": 0.5}
    info.update(metadata or {})
    info["architecture"] = ARCHITECTURE
    inputs = keras.Input((*preprocess.shape, 1), name="scan")
    x = ScanPreprocessing(preprocess_to_dict(preprocess), info, name="scan_preprocessing")(inputs)
    for index, filters in enumerate((64, 64, 128, 256), start=1):
        x = keras.layers.Conv3D(filters, 3, activation="relu", name=f"conv{index}")(x)
        x = keras.layers.MaxPool3D(2, name=f"pool{index}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
    x = keras.layers.GlobalAveragePooling3D(name="gap")(x)
    x = keras.layers.Dense(512, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(0.3, name="dropout")(x)
    logit = keras.layers.Dense(1, name="logit")(x)
    probability = keras.layers.Activation("sigmoid", name="probability", dtype="float32")(logit)
    return keras.Model(inputs, probability, name="keras_io_3d_cnn")
