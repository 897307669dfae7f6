"""Pictures of a finished run's selected model, and their copy in TensorBoard.

* ``gradcam_test.png``: the first test images with their Grad-CAM overlays
  (:mod:`~comtriplet_jax.evaluation.gradcam`; the target is each method's own:
  the class logit, or the prototype score d_maj - d_min), titled with the label,
  the prediction and the score;
* ``roc_test.png`` (binary tasks): the test ROC curve with the operating points
  chosen on validation marked on it;
* every PNG of the run's folder (these and the method's own: embeddings,
  attention maps, reconstructions) is also written to TensorBoard as an image
  through clu's metric writer, under ``pictures/<file name>``.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from comtriplet_jax.evaluation import gradcam


def gradcam_grid(path: pathlib.Path, method, variables, method_state,
                 images: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str]) -> pathlib.Path:
  """Grad-CAM of the method's target on ``images``, drawn as a grid."""
  cam = jax.jit(functools.partial(gradcam.method_grad_cam, method))(
      variables, method_state, images)
  scores = np.asarray(jax.jit(method.predict)(variables, method_state, images)["scores"])
  titles = []
  for label, score in zip(labels, scores):
    predicted = (int(np.argmax(score)) if np.ndim(score) else None)
    what = (f"pred {class_names[predicted]}" if predicted is not None
            else f"score {float(score):.3f}")
    titles.append(f"{class_names[int(label)]}, {what}")
  return gradcam.plot_gradcam_grid(
      path, images, np.asarray(cam.heatmap), titles=titles,
      title=f"Grad-CAM of the selected model ({type(method).__name__}), test images")


def plot_roc(path: pathlib.Path, labels: np.ndarray, scores: np.ndarray,
             points: Mapping[str, Mapping[str, Any]]) -> pathlib.Path:
  """The test ROC curve, with each operating point's test (1 - spec., sens.)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
  fpr, tpr, _ = skm.roc_curve(labels, scores)
  fig = Figure(figsize=(4.2, 4.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ax.plot(fpr, tpr, color="black", lw=1.2,
          label=f"test ROC (AUC {skm.roc_auc_score(labels, scores):.3f})")
  ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
  for (rule, point), marker in zip(points.items(), "osD^v"):
    test = point["test"]
    ax.scatter([1 - test["specificity"]], [test["sensitivity"]], marker=marker, s=36,
               zorder=3, label=f"{rule} (threshold {point['threshold']:.3g})")
  ax.set_xlabel("1 - specificity")
  ax.set_ylabel("sensitivity")
  ax.set_title("operating points chosen on validation", fontsize=9)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  return path


def to_tensorboard(writer, step: int, folder: pathlib.Path) -> list[str]:
  """Writes every PNG of ``folder`` to ``writer`` as an image; returns the keys."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = {}
  for path in sorted(folder.glob("*.png")):
    with Image.open(path) as picture:
      images[f"pictures/{path.stem}"] = np.asarray(picture.convert("RGB"))[None]
  if images:
    writer.write_images(step, images)
  return sorted(images)
