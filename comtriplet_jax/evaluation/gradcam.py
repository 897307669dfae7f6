"""Grad-CAM heat maps (Selvaraju et al. 2017) for every method with a CNN.

Grad-CAM explains a scalar target y (a class logit, a prototype score) by the
last convolutional feature map A [h, w, C] it is computed from:

  alpha_c = (1 / hw) sum_ij dy / dA_ijc          (channel weights)
  L       = ReLU(sum_c alpha_c A_c)              [h, w]

then L is upsampled to the image (bilinear, ``jax.image.resize``) and divided by
its maximum, per image, so that it lies in [0, 1] (a map without positive
evidence stays 0 everywhere rather than becoming 0 / 0).

Getting dy / dA. A gradient with respect to an intermediate value needs that
value as an input of the differentiated function. The target functions here
therefore take, besides the images, a ``feature_delta`` of A's shape that the
model adds to A before using it (``None``: nothing added; the idea of Flax's
``Module.perturb``): at delta = 0 the output is unchanged and dy / d(delta) is
dy / dA, through every path by which y depends on A, without splitting the
model into two functions. Each method's ``heatmap_target(variables,
method_state, images, *, class_index=None, feature_delta=None)`` is such a
function (see ``methods/``), computed through the same ``model.apply`` as its
``predict``; :func:`tap_submodule` is the interception it uses to reach A
inside that call.

Images are independent in evaluation mode (BatchNorm uses its running
averages), so the gradient of the sum of the targets gives every image its own
gradient in one backward pass.

Known property, not a bug: the channel weights are spatial *means* of the
gradient, so Grad-CAM shows where the channels that matter are active, not
where the gradient is. A model that reads one quadrant of a feature map whose
channels respond equally everywhere (a stationary input) gets a map spread
over the whole image; Grad-CAM localises where the features themselves do
(``tests/test_gradcam.py`` checks both).

Pictures (:func:`overlay`, :func:`plot_gradcam_grid`) use Matplotlib's colormaps
and its object API (``Figure`` + Agg canvas): no display, no pyplot state.
Matplotlib is imported by those two functions only, so that the methods, which
import this module for :func:`tap_submodule`, do not load it.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# images [B, S, S, 3], feature_delta (A's shape) or None -> (A [B, h, w, C], y [B]).
HeatmapTargetFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]


class GradCAM(NamedTuple):
  """Grad-CAM of a batch.

  Attributes:
    heatmap: float32 [B, H, W] in [0, 1], at the images' size.
    target: float32 [B], the explained value (logit or score) of each image.
  """
  heatmap: jax.Array
  target: jax.Array


# ------------------------------------------------------------------ the maths
def feature_gradients(target_fn: HeatmapTargetFn, images: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The feature map, the target and d target / d feature map, per image.

  Args:
    target_fn: ``(images, feature_delta) -> (feature_map [B, h, w, C],
      target [B])``, the target computed from ``feature_map + feature_delta``
      (``feature_delta=None``: from the feature map as it is); images must not
      interact (evaluation mode).
    images: the batch, in whatever form ``target_fn`` takes.

  Returns:
    (feature_map [B, h, w, C], target float32 [B], gradients [B, h, w, C] in the
    feature map's dtype).

  Raises:
    ValueError: when ``target_fn`` returns shapes other than [B, h, w, C] and [B].
  """
  shapes = jax.eval_shape(lambda x: target_fn(x, None), images)
  feature_shape, target_shape = shapes
  if len(feature_shape.shape) != 4:
    raise ValueError(f"the feature map must be [B, h, w, C], got {feature_shape.shape}")
  if target_shape.shape != feature_shape.shape[:1]:
    raise ValueError(f"the target must be one value per image, "
                     f"[{feature_shape.shape[0]}], got {target_shape.shape}")
  if not jnp.issubdtype(target_shape.dtype, jnp.floating):
    raise ValueError(f"the target must be a float, got {target_shape.dtype}")

  def target_and_map(delta):
    feature_map, target = target_fn(images, delta)
    return target.astype(jnp.float32), feature_map

  zero = jnp.zeros(feature_shape.shape, feature_shape.dtype)
  target, pullback, feature_map = jax.vjp(target_and_map, zero, has_aux=True)
  (gradients,) = pullback(jnp.ones_like(target))
  return feature_map, target, gradients


def normalise_maps(maps: jax.Array) -> jax.Array:
  """Divides each non-negative map [B, H, W] by its maximum; all-zero maps stay 0."""
  peak = jnp.max(maps, axis=(1, 2), keepdims=True)
  positive = peak > 0
  return jnp.where(positive, maps / jnp.where(positive, peak, 1.0), 0.0)


def upsample_maps(maps: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of [B, h, w] maps to [B, H, W] (half-pixel centres), float32."""
  if maps.ndim != 3:
    raise ValueError(f"maps must be [B, h, w], got {maps.shape}")
  height, width = (int(s) for s in size)
  return jax.image.resize(maps.astype(jnp.float32), (maps.shape[0], height, width),
                          method="bilinear")


def grad_cam_maps(feature_map: jax.Array, gradients: jax.Array,
                  size: Sequence[int]) -> jax.Array:
  """Grad-CAM from a feature map and the target's gradient with respect to it.

  Args:
    feature_map: A [B, h, w, C].
    gradients: dy / dA [B, h, w, C].
    size: (H, W) of the images.

  Returns:
    float32 [B, H, W]: ReLU(sum_c alpha_c A_c) with alpha_c the spatial mean of
    the gradient of channel c, upsampled bilinearly and divided by its maximum.
  """
  if feature_map.ndim != 4 or gradients.shape != feature_map.shape:
    raise ValueError(f"feature map [B, h, w, C] and gradients of the same shape "
                     f"expected, got {feature_map.shape} and {gradients.shape}")
  weights = jnp.mean(gradients.astype(jnp.float32), axis=(1, 2))             # [B, C]
  cam = jnp.einsum("bhwc,bc->bhw", feature_map.astype(jnp.float32), weights,
                   precision="highest")
  return normalise_maps(upsample_maps(jax.nn.relu(cam), size))


def grad_cam(target_fn: HeatmapTargetFn, images: jax.Array,
             size: Sequence[int] | None = None) -> GradCAM:
  """Grad-CAM heat maps of a batch; pure, so it can be jitted with ``target_fn`` fixed.

  Args:
    target_fn: see :func:`feature_gradients`.
    images: [B, H, W, ...] batch.
    size: (H, W) of the heat maps; the images' by default.

  Returns:
    :class:`GradCAM` with heat maps [B, H, W] in [0, 1] and the targets [B].
  """
  feature_map, target, gradients = feature_gradients(target_fn, images)
  size = tuple(images.shape[1:3]) if size is None else tuple(size)
  return GradCAM(grad_cam_maps(feature_map, gradients, size), target)


def method_grad_cam(method: Any, variables: Any, method_state: Any, images: jax.Array,
                    *, class_index: int | jax.Array | None = None) -> GradCAM:
  """Grad-CAM of a method's target (see its ``heatmap_target``) on uint8 images.

  Jit it with the method fixed, e.g. ``jax.jit(functools.partial(method_grad_cam,
  method))``; a Python ``class_index`` is then best bound the same way.
  """
  def target_fn(x, delta):
    return method.heatmap_target(variables, method_state, x, class_index=class_index,
                                 feature_delta=delta)
  return grad_cam(target_fn, images)


# -------------------------------------------------------- targets of methods
def class_logit(logits: jax.Array, class_index: int | jax.Array) -> jax.Array:
  """The logit of ``class_index`` (an int, or one per image [B]) from [B, K] logits.

  Raises:
    ValueError: for a Python int outside [0, K) or a class array not [B] / [].
  """
  if logits.ndim != 2:
    raise ValueError(f"logits must be [B, K], got {logits.shape}")
  if isinstance(class_index, (int, np.integer)) and not (
      0 <= class_index < logits.shape[1]):
    raise ValueError(f"class_index={class_index} is not a class of these "
                     f"{logits.shape[1]}-class logits")
  index = jnp.asarray(class_index, jnp.int32)
  batch = logits.shape[0]
  if index.ndim not in (0, 1) or (index.ndim == 1 and index.shape[0] != batch):
    raise ValueError(f"class_index must be an int or [B] = [{logits.shape[0]}], got "
                     f"shape {index.shape}")
  index = jnp.broadcast_to(index, logits.shape[:1])
  return jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]


def signed_score(scores: jax.Array, class_index: int | jax.Array | None) -> jax.Array:
  """A prototype score's target: d_maj - d_min for class 1 (default), minus it for 0.

  The score is the evidence for the minority prototype (label 1); class 0 asks
  for the evidence for the majority prototype.

  Raises:
    ValueError: for a Python class index other than 0 or 1.
  """
  if class_index is None:
    return scores
  if isinstance(class_index, (int, np.integer)):
    if class_index not in (0, 1):
      raise ValueError(f"class_index={class_index}: a prototype score has classes 0 "
                       "(majority) and 1 (minority)")
    return scores if class_index == 1 else -scores
  return jnp.where(jnp.asarray(class_index) == 0, -scores, scores)


@contextlib.contextmanager
def tap_submodule(path: Sequence[str],
                  edit: Callable[[Callable[..., Any], tuple, dict], Any]
                  ) -> Iterator[list[int]]:
  """Routes the calls of one submodule's ``__call__`` through ``edit``.

  Inside the context, every Flax ``apply`` that calls ``__call__`` of the bound
  submodule at ``path`` (e.g. ``('backbone',)``, ``('encoder', 'code')``) gets
  ``edit(call, args, kwargs)`` instead of ``call(*args, **kwargs)``: ``edit``
  may change the inputs, the outputs, or record either. All other calls run
  unchanged (``flax.linen.intercept_methods``), so the model's own code path is
  the one used, with no change to the model.

  Yields:
    A one-element list counting the calls edited so far, so that a caller can
    check that the submodule was reached (exactly once).
  """
  path = tuple(path)
  count = [0]

  def interceptor(call, args, kwargs, context):
    if context.method_name == "__call__" and context.module.path == path:
      count[0] += 1
      return edit(call, args, kwargs)
    return call(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield count


# ------------------------------------------------------------------ pictures
def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45,
            colormap: str = "jet") -> np.ndarray:
  """Blends a colour-mapped heat map over an image.

  Args:
    image: uint8 [..., H, W, 3] RGB.
    heatmap: [..., H, W] values in [0, 1] (clipped to it).
    alpha: weight of the colour map (0: the image, 1: the colour map).
    colormap: a Matplotlib colormap name.

  Returns:
    uint8 [..., H, W, 3]: round((1 - alpha) image + alpha 255 colormap(heatmap)).
  """
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  heatmap = np.asarray(heatmap, np.float64)
  if image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(f"image must be uint8 [..., H, W, 3], got {image.dtype} "
                     f"{image.shape}")
  if heatmap.shape != image.shape[:-1]:
    raise ValueError(f"heatmap must be {image.shape[:-1]} (the image's), got "
                     f"{heatmap.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
  colours = colormaps[colormap](np.clip(np.nan_to_num(heatmap), 0.0, 1.0))[..., :3]
  blend = (1.0 - alpha) * image.astype(np.float64) + alpha * 255.0 * colours
  return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def plot_gradcam_grid(path: str | pathlib.Path, images: np.ndarray,
                      heatmaps: np.ndarray, *, titles: Sequence[str] | None = None,
                      columns: int = 4, alpha: float = 0.45, colormap: str = "jet",
                      title: str = "") -> pathlib.Path:
  """Writes a PNG grid: each image, with its Grad-CAM overlay underneath.

  Args:
    path: output file (.png).
    images: uint8 [n, H, W, 3].
    heatmaps: [n, H, W] in [0, 1].
    titles: optional n panel titles (e.g. label, prediction and target).
    columns: images per row.
    alpha: see :func:`overlay`.
    colormap: see :func:`overlay`.
    title: figure title.

  Returns:
    The path written.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] < 1:
    raise ValueError(f"images must be uint8 [n, H, W, 3] with n >= 1, got "
                     f"{images.shape}")
  blended = overlay(images, heatmaps, alpha=alpha, colormap=colormap)
  n = images.shape[0]
  if titles is not None and len(titles) != n:
    raise ValueError(f"{len(titles)} titles for {n} images")
  if columns < 1:
    raise ValueError(f"columns must be >= 1, got {columns}")
  columns = min(columns, n)
  rows = -(-n // columns)
  figure = Figure(figsize=(2.0 * columns, 4.1 * rows + (0.4 if title else 0.0)))
  FigureCanvasAgg(figure)
  axes = figure.subplots(2 * rows, columns, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  for i in range(n):
    row, col = divmod(i, columns)
    axes[2 * row, col].imshow(images[i])
    axes[2 * row + 1, col].imshow(blended[i])
    if titles is not None:
      axes[2 * row, col].set_title(titles[i], fontsize=8)
  if title:
    figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, format="png", dpi=100)
  return path
