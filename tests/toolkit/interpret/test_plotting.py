"""Tests of the plotting helpers: PNG files and the texts of the figures."""

import numpy as np
import pytest
from matplotlib.image import imread

from toolkit.interpret import plot_attention, plot_volume_overlay

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == _PNG_MAGIC
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01, "the image is blank"


def test_plot_attention_writes_png_with_texts(tmp_path):
    weights = np.random.default_rng(0).random((1, 5, 8))
    path = tmp_path / "figs" / "alignment.png"
    fig = plot_attention(
        weights,
        "encoder frame",
        "output token",
        "Cross-attention, layer 2",
        path=path,
        y_tick_labels=list("hello"),
    )
    _assert_png(path)
    ax, colorbar_ax = fig.axes  # the matrix and its colour bar
    assert ax.get_title() == "Cross-attention, layer 2"
    assert ax.get_xlabel() == "encoder frame" and ax.get_ylabel() == "output token"
    assert [t.get_text() for t in ax.get_yticklabels()] == list("hello")
    assert colorbar_ax.get_ylabel() == "attention weight"
    np.testing.assert_allclose(ax.images[0].get_array(), weights[0])


def test_plot_attention_rejects_non_matrix():
    with pytest.raises(ValueError, match="weights must be 2D"):
        plot_attention(np.zeros((2, 3, 4)), "x", "y", "t")


def test_plot_volume_overlay_planes_through_maximum(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.random((20, 24, 16)).astype("float32")
    heatmap = np.zeros((20, 24, 16), "float32")
    heatmap[5, 17, 9] = 1.0
    path = tmp_path / "overlay.png"
    fig = plot_volume_overlay(volume, heatmap, path=path, title="Lesion heatmap")
    _assert_png(path)
    assert fig._suptitle.get_text() == "Lesion heatmap"
    panels, colorbar_ax = fig.axes[:3], fig.axes[3]
    assert [ax.get_title() for ax in panels] == [
        "Sagittal (i = 5)",
        "Coronal (j = 17)",
        "Axial (k = 9)",
    ]
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in panels)
    assert colorbar_ax.get_ylabel() == "heatmap value"
    # Each panel shows the plane through the maximum: scan and heatmap, second axis upwards.
    np.testing.assert_allclose(panels[0].images[0].get_array(), volume[5].T)
    np.testing.assert_allclose(panels[2].images[1].get_array(), heatmap[:, :, 9].T)
    assert panels[1].images[1].get_array().max() == 1.0


def test_plot_volume_overlay_given_center_and_coarse_heatmap():
    volume = np.random.default_rng(2).random((1, 12, 12, 12, 1))
    coarse = np.zeros((4, 4, 4))
    coarse[2, 1, 3] = 1.0
    fig = plot_volume_overlay(volume, coarse)
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["Sagittal (i = 7)", "Coronal (j = 4)", "Axial (k = 10)"]
    fig = plot_volume_overlay(volume, coarse, center=(1, 2, 3))
    assert [ax.get_title() for ax in fig.axes[:3]] == [
        "Sagittal (i = 1)",
        "Coronal (j = 2)",
        "Axial (k = 3)",
    ]


def test_plot_volume_overlay_2d_image(tmp_path):
    image = np.random.default_rng(3).random((30, 40))
    heat = np.zeros((30, 40))
    heat[10, 25] = 2.0
    path = tmp_path / "slice.png"
    fig = plot_volume_overlay(image, heat, path=path, title="Slice")
    _assert_png(path)
    ax = fig.axes[0]
    assert len(fig.axes) == 2 and ax.get_title() == "Image"
    np.testing.assert_allclose(ax.images[0].get_array(), image)
    assert ax.lines[0].get_xdata()[0] == 25 and ax.lines[1].get_ydata()[0] == 10


def test_plot_volume_overlay_bad_center_raises():
    with pytest.raises(ValueError, match="center must be a voxel index"):
        plot_volume_overlay(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), center=(0, 9, 0))
