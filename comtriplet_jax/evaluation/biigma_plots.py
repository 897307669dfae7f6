"""BIIGMA-Net's pictures: head cross-correlation (Figure 3) and attention maps.

* :func:`plot_head_correlation`: K x K matrices of the dependence between the
  MICA heads, averaged over test images (Figure 3 shows the mean cosine
  similarity of head-level features, without and with L_indep); one panel per
  matrix, values written in the cells.
* :func:`plot_attention_samples`: for a few test images, the image; the spatial
  attention map M (Eq. 5) over it; and the hybrid's background: M_inv = 1 - M
  over the image, each position of R's grid labelled with the image of the
  batch its sampled background vector came from ('=' when it drew its own).

Written with Matplotlib's object API (``Figure`` + Agg canvas): no display, no
pyplot state.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def plot_head_correlation(matrices: Mapping[str, np.ndarray], path: pathlib.Path | str,
                          *, title: str = "") -> pathlib.Path:
  """One heat map per K x K matrix, side by side, with the values written in.

  Args:
    matrices: panel title -> [K, K] matrix (all with the same K).
    path: the PNG to write.
    title: the figure's title.

  Returns:
    The path written.
  """
  if not matrices:
    raise ValueError("plot_head_correlation needs at least one matrix")
  arrays = {name: np.asarray(m, np.float64) for name, m in matrices.items()}
  for name, m in arrays.items():
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 1:
      raise ValueError(f"matrix {name!r} must be square [K, K], got {m.shape}")
  k = next(iter(arrays.values())).shape[0]
  figure = Figure(figsize=(3.6 * len(arrays) + 0.6, 3.6))
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, len(arrays), squeeze=False)[0]
  for ax, (name, m) in zip(axes, arrays.items()):
    # Each panel on its own scale from 0: HSIC and cosine are not comparable.
    top = max(float(np.max(m)), 1e-12)
    image = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=top)
    for i in range(k):
      for j in range(k):
        ax.text(j, i, f"{m[i, j]:.3g}", ha="center", va="center", fontsize=8,
                color="white" if m[i, j] < 0.6 * top else "black")
    ax.set_xticks(range(k), [f"head {i + 1}" for i in range(k)])
    ax.set_yticks(range(k), [f"head {i + 1}" for i in range(k)])
    ax.set_title(name, fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  path = pathlib.Path(path)
  figure.savefig(path, dpi=120)
  return path


def background_source_images(source: np.ndarray, positions_per_image: int
                             ) -> np.ndarray:
  """Global background indices [n, H, W] -> index of the image they came from."""
  return np.asarray(source) // positions_per_image


def plot_attention_samples(images: np.ndarray, attention: np.ndarray,
                           source: np.ndarray, labels: Sequence[int],
                           predictions: Sequence[int], class_names: Sequence[str],
                           path: pathlib.Path | str) -> pathlib.Path:
  """Image, M over it, and the hybrid's background positions, one row per image.

  Args:
    images: uint8 [n, S, S, 3] test images.
    attention: [n, H, W] the spatial attention maps M, in [0, 1].
    source: int [n, H, W] global index of each position's background vector
      (``models.biigma.sample_background`` over these n images).
    labels: [n] true classes.
    predictions: [n] predicted classes (clean branch).
    class_names: names of the classes.
    path: the PNG to write.

  Returns:
    The path written.
  """
  images = np.asarray(images)
  attention = np.asarray(attention, np.float64)
  source = np.asarray(source)
  n = images.shape[0]
  if images.ndim != 4 or images.shape[-1] != 3 or n < 1:
    raise ValueError(f"images must be [n, S, S, 3] with n >= 1, got {images.shape}")
  if attention.ndim != 3 or attention.shape[0] != n:
    raise ValueError(f"attention must be [n, H, W] with n = {n}, got {attention.shape}")
  if source.shape != attention.shape:
    raise ValueError(f"source must be [n, H, W] = {attention.shape}, got {source.shape}")
  height, width = attention.shape[1:]
  origin = background_source_images(source, height * width)
  size_y, size_x = images.shape[1:3]
  extent = (0, size_x, size_y, 0)

  figure = Figure(figsize=(9.0, 3.0 * n))
  FigureCanvasAgg(figure)
  axes = figure.subplots(n, 3, squeeze=False)
  for i in range(n):
    true = class_names[int(labels[i])]
    predicted = class_names[int(predictions[i])]
    ax_image, ax_map, ax_background = axes[i]
    ax_image.imshow(images[i])
    ax_image.set_title(f"true {true}, predicted {predicted}", fontsize=8)
    ax_map.imshow(images[i])
    # A sigmoid of a channel mean often spans a narrow band around 0.5: the
    # colours use each map's own range, which the colour bar states.
    low, high = float(attention[i].min()), float(attention[i].max())
    high = max(high, low + 1e-6)
    shown = ax_map.imshow(attention[i], cmap="jet", alpha=0.45, extent=extent,
                          interpolation="bilinear", vmin=low, vmax=high)
    ax_map.set_title("M (salient: red)", fontsize=8)
    figure.colorbar(shown, ax=ax_map, fraction=0.046, pad=0.04)
    ax_background.imshow(images[i])
    ax_background.imshow(1.0 - attention[i], cmap="gray_r", alpha=0.55,
                         extent=extent, interpolation="nearest", vmin=1.0 - high,
                         vmax=1.0 - low)
    cell_y, cell_x = size_y / height, size_x / width
    for h in range(height):
      for w in range(width):
        text = "=" if origin[i, h, w] == i else str(int(origin[i, h, w]))
        ax_background.text((w + 0.5) * cell_x, (h + 0.5) * cell_y, text,
                           ha="center", va="center", fontsize=7, color="yellow")
    ax_background.set_title("M_inv (dark); background vector\nfrom image # ('=' its own)",
                            fontsize=8)
    for ax in axes[i]:
      ax.set_xticks([])
      ax.set_yticks([])
    ax_image.set_ylabel(f"image #{i}", fontsize=8)
  figure.tight_layout()
  path = pathlib.Path(path)
  figure.savefig(path, dpi=100)
  return path
