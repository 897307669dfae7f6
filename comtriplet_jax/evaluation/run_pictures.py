"""Pictures of a finished run's selected model, and their copy in TensorBoard.

* ``gradcam_test.png``: test images, the classes in turn, with the Grad-CAM
  of their predicted class (:mod:`~comtriplet_jax.evaluation.gradcam`; the
  class logit, or the prototype score towards the predicted prototype), titled
  with the label, the prediction and the score;
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


def balanced_selection(labels: np.ndarray, count: int) -> np.ndarray:
  """Positions of up to ``count`` examples, taking the classes in turn.

  A grid of the first test images of a 1-in-7 task shows only the majority
  class; this takes the first example of each class, then the second, ...
  """
  queues = [list(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  picked: list[int] = []
  while len(picked) < count and any(queues):
    for queue in queues:
      if queue and len(picked) < count:
        picked.append(queue.pop(0))
  return np.sort(np.asarray(picked, np.int64))


def gradcam_grid(path: pathlib.Path, method, variables, method_state,
                 images: np.ndarray, labels: np.ndarray,
                 class_names: Sequence[str]) -> pathlib.Path:
  """Grad-CAM of the evidence for each image's predicted class, drawn as a grid.

  The class explained is the method's own prediction (its logit, or for the
  prototype methods the score towards the predicted prototype), so the map
  shows what the decision rests on.
  """
  predicted = jax.jit(method.predict)(variables, method_state, images)
  predictions = np.asarray(predicted["predictions"])
  scores = np.asarray(predicted["scores"])
  cam = jax.jit(functools.partial(gradcam.method_grad_cam, method))(
      variables, method_state, images, class_index=predictions)
  titles = []
  for label, prediction, score in zip(labels, predictions, scores):
    what = f", score {float(score):.3f}" if np.ndim(score) == 0 else ""
    titles.append(f"{class_names[int(label)]} -> {class_names[int(prediction)]}{what}")
  return gradcam.plot_gradcam_grid(
      path, images, np.asarray(cam.heatmap), titles=titles,
      title=f"Grad-CAM of the predicted class ({type(method).__name__}), test images: "
            "true -> predicted")


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
