"""Figures for attention: alignment matrices and heatmaps over scans (PNG, Agg, no pyplot)."""

from __future__ import annotations

import os

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

# Figures are built on `matplotlib.figure.Figure` directly: no pyplot global state, no GUI
# backend, nothing to close, safe in threads and on headless machines (PNG through Agg).


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    try:
        from keras import ops

        return np.asarray(ops.convert_to_numpy(x))
    except Exception:  # noqa: BLE001 - anything array-like NumPy understands
        return np.asarray(x)


def _squeeze_to(x, rank, name):
    x = np.asarray(_to_numpy(x), dtype="float32")
    while x.ndim > rank and x.shape[0] == 1:
        x = x[0]
    while x.ndim > rank and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != rank:
        raise ValueError(
            f"{name} must be {rank}D (after dropping size-1 axes). Received: {x.shape}"
        )
    return x


def _save(fig, path):
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def plot_attention(
    weights,
    x_label,
    y_label,
    title,
    path=None,
    x_tick_labels=None,
    y_tick_labels=None,
    cmap="viridis",
):
    """Draws an attention or alignment matrix (rows: queries, columns: keys) with a colour bar.

    Args:
        weights: array or tensor (T, S), or with leading size-1 axes such as (1, T, S).
        x_label: string. Label of the horizontal (key/source, S) axis.
        y_label: string. Label of the vertical (query/target, T) axis.
        title: string. Figure title.
        path: optional path of a PNG file to write. Defaults to `None` (not saved).
        x_tick_labels: optional list of S strings (e.g. input tokens or frame times).
        y_tick_labels: optional list of T strings (e.g. output characters).
        cmap: string. Matplotlib colour map. Defaults to `"viridis"`.

    Returns:
        The `matplotlib.figure.Figure` (its first axes hold the matrix, the last the colour bar).

    Example:

    >>> import numpy as np
    >>> fig = plot_attention(np.eye(4), "encoder frame", "output token", "Alignment")
    >>> fig.axes[0].get_xlabel()
    'encoder frame'
    """
    matrix = _squeeze_to(weights, 2, "weights")
    rows, cols = matrix.shape
    width = min(12.0, 2.5 + 0.25 * cols)
    height = min(10.0, 2.0 + 0.25 * rows)
    fig = Figure(figsize=(max(width, 4.0), max(height, 3.0)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix, aspect="auto", origin="upper", interpolation="nearest", cmap=cmap)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title)
    if x_tick_labels is not None:
        ax.set_xticks(range(cols), labels=[str(t) for t in x_tick_labels], rotation=90)
    if y_tick_labels is not None:
        ax.set_yticks(range(rows), labels=[str(t) for t in y_tick_labels])
    colorbar = fig.colorbar(image, ax=ax)
    colorbar.set_label("attention weight")
    _save(fig, path)
    return fig


# Plane names for a volume in RAS+ voxel order (i: left -> right, j: posterior -> anterior,
# k: inferior -> superior), as `nibabel.as_closest_canonical` gives.
_PLANES = (
    ("Sagittal", 0, ("j (posterior \u2192 anterior)", "k (inferior \u2192 superior)")),
    ("Coronal", 1, ("i (left \u2192 right)", "k (inferior \u2192 superior)")),
    ("Axial", 2, ("i (left \u2192 right)", "j (posterior \u2192 anterior)")),
)


def plot_volume_overlay(
    volume,
    heatmap,
    path=None,
    title="Attention heatmap",
    center=None,
    alpha=0.6,
    cmap="jet",
    spacing=None,
):
    """Shows a heatmap over a scan on three orthogonal planes through its maximum.

    The scan is drawn in grey (windowed to its 1st-99th percentiles) and the heatmap on top,
    its opacity growing with its value up to `alpha` (low values leave the scan visible), with
    one colour bar shared by the panels. Each panel is the plane
    through `center` (default: the voxel where the heatmap is largest) with a crosshair at the
    centre. Plane names and axis labels assume RAS+ voxel order (reorient with
    `nibabel.as_closest_canonical` first); for other orders the planes are still orthogonal, only
    their names differ. Superior (k) and anterior (j) point up. A 2D image gives one panel.

    Args:
        volume: array or tensor (I, J, K), or (H, W) for an image; size-1 batch/channel axes
            are dropped.
        heatmap: array or tensor with the same spatial shape. A coarser map is upsampled to the
            volume's shape first with `upsample_map` (trilinear, half-pixel centres).
        path: optional path of a PNG file to write. Defaults to `None` (not saved).
        title: string. Figure title. Defaults to `"Attention heatmap"`.
        center: optional tuple of voxel indices of the planes. Defaults to the heatmap's argmax.
        alpha: float. Opacity of the heatmap at its maximum. Defaults to `0.6`.
        cmap: string. Matplotlib colour map of the heatmap. Defaults to `"jet"`.
        spacing: optional tuple of voxel sizes (e.g. millimetres) per axis, used for the
            aspect ratio of each panel. Defaults to isotropic.

    Returns:
        The `matplotlib.figure.Figure`: one axes per panel, then the colour bar's axes.

    Example:

    >>> import numpy as np
    >>> scan = np.random.rand(20, 24, 16); heat = np.zeros((20, 24, 16)); heat[5, 6, 7] = 1.0
    >>> fig = plot_volume_overlay(scan, heat, title="Lesion")
    >>> [ax.get_title() for ax in fig.axes[:3]]
    ['Sagittal (i = 5)', 'Coronal (j = 6)', 'Axial (k = 7)']
    """
    volume_np = _to_numpy(volume)
    rank = 3 if np.squeeze(volume_np).ndim >= 3 else 2
    vol = _squeeze_to(volume_np, rank, "volume")
    heat = _squeeze_to(heatmap, rank, "heatmap")
    if heat.shape != vol.shape:
        from toolkit.interpret.upsample import upsample_map

        heat = np.asarray(upsample_map(heat, vol.shape), dtype="float32")
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    vol = np.nan_to_num(vol, nan=0.0, posinf=0.0, neginf=0.0)
    if center is None:
        center = np.unravel_index(int(np.argmax(heat)), heat.shape)
    center = tuple(int(c) for c in center)
    if len(center) != rank or any(not 0 <= c < s for c, s in zip(center, vol.shape)):
        raise ValueError(f"center must be a voxel index inside {vol.shape}. Received: {center}")
    spacing = (1.0,) * rank if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != rank:
        raise ValueError(f"spacing must have {rank} entries. Received: spacing={spacing}")

    low, high = np.percentile(vol, [1.0, 99.0])
    grey = Normalize(vmin=float(low), vmax=float(high) if high > low else float(low) + 1.0)
    h_low, h_high = float(heat.min()), float(heat.max())
    colours = Normalize(vmin=h_low, vmax=h_high if h_high > h_low else h_low + 1.0)

    if rank == 3:
        panels = []
        for name, axis, labels in _PLANES:
            plane = np.take(vol, center[axis], axis=axis)
            plane_heat = np.take(heat, center[axis], axis=axis)
            rest = [a for a in range(3) if a != axis]
            cross = (center[rest[0]], center[rest[1]])
            aspect = spacing[rest[1]] / spacing[rest[0]]
            letter = "ijk"[axis]
            panels.append(
                (f"{name} ({letter} = {center[axis]})", plane, plane_heat, labels, cross, aspect)
            )
    else:
        labels = ("axis 1 (columns)", "axis 0 (rows)")
        # Rows of a 2D image are drawn top-down as usual: pass the transpose so `.T` below undoes it.
        panels = [("Image", vol.T, heat.T, labels, (center[1], center[0]), spacing[0] / spacing[1])]

    fig = Figure(figsize=(4.2 * len(panels) + 1.0, 4.6), layout="constrained")
    for index, (name, plane, plane_heat, (x_label, y_label), cross, aspect) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), index + 1)
        origin = "lower" if rank == 3 else "upper"
        # plane is (horizontal axis, vertical axis): transpose so the second axis runs upwards.
        ax.imshow(plane.T, cmap="gray", norm=grey, origin=origin, aspect=aspect)
        opacity = alpha * np.clip(colours(plane_heat.T), 0.0, 1.0)
        ax.imshow(
            plane_heat.T, cmap=cmap, norm=colours, alpha=opacity, origin=origin, aspect=aspect
        )
        ax.axvline(cross[0], color="white", linewidth=0.6, alpha=0.7)
        ax.axhline(cross[1], color="white", linewidth=0.6, alpha=0.7)
        ax.set_title(name)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
    mappable = ScalarMappable(norm=colours, cmap=colormaps[cmap])
    colorbar = fig.colorbar(mappable, ax=fig.axes, shrink=0.85)
    colorbar.set_label("heatmap value")
    fig.suptitle(title)
    _save(fig, path)
    return fig
