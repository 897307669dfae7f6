"""The embedding picture of deep clustering: test embeddings in 2-D, prototypes marked.

The clustering methods compare embeddings by cosine distance (Eq. 14), which sees
directions only, so the picture shows the directions too: embeddings and
prototypes are scaled to unit length, then projected on the first two principal
components of the unit embeddings (PCA fitted on the embeddings, not on the
prototypes). Points are coloured by their true class, the majority drawn first
so the minority stays visible; the two prototypes are large stars.

Written with Matplotlib's object API (``Figure`` + Agg canvas), so it neither
needs a display nor touches pyplot's global state.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

_CLASS_COLOURS = ("tab:blue", "tab:red")


def _unit(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=-1, keepdims=True)
  return np.where(norms > 0, x / np.where(norms > 0, norms, 1.0), 0.0)


def project_2d(embeddings: np.ndarray, centre_min: np.ndarray, centre_maj: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """PCA projection of unit embeddings and prototypes.

  Args:
    embeddings: [n, S] embeddings, n >= 2.
    centre_min: [S] minority prototype.
    centre_maj: [S] majority prototype.

  Returns:
    (points [n, 2], prototypes [2, 2] rows (min, maj), explained variance
    ratio [2]). With S = 1 the second coordinate is 0.
  """
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or embeddings.shape[0] < 2 or embeddings.shape[1] < 1:
    raise ValueError(f"embeddings must be [n, S] with n >= 2, got {embeddings.shape}")
  protos = np.stack([np.asarray(centre_min, np.float64),
                     np.asarray(centre_maj, np.float64)])
  if protos.shape != (2, embeddings.shape[1]):
    raise ValueError(f"prototypes must be [S] = [{embeddings.shape[1]}], got "
                     f"{np.shape(centre_min)} and {np.shape(centre_maj)}")
  unit = _unit(embeddings)
  components = min(2, unit.shape[1], unit.shape[0])
  pca = PCA(n_components=components, svd_solver="full").fit(unit)
  points = pca.transform(unit)
  proto_points = pca.transform(_unit(protos))
  ratio = pca.explained_variance_ratio_
  if components < 2:
    pad = lambda a: np.pad(a, ((0, 0), (0, 2 - components)))  # noqa: E731
    points, proto_points = pad(points), pad(proto_points)
    ratio = np.pad(ratio, (0, 2 - components))
  return points, proto_points, ratio


def plot_embeddings(path: str | pathlib.Path, embeddings: np.ndarray,
                    labels: np.ndarray, centre_min: np.ndarray, centre_maj: np.ndarray,
                    *, class_names: Sequence[str] = ("majority", "minority"),
                    title: str = "") -> pathlib.Path:
  """Writes the PNG and returns its path.

  Args:
    path: output file (.png).
    embeddings: [n, S] test embeddings.
    labels: [n] true classes, 0 = majority, 1 = minority.
    centre_min: [S] minority prototype Cl*_min.
    centre_maj: [S] majority prototype Cl*_maj.
    class_names: names of classes 0 and 1.
    title: figure title.
  """
  labels = np.asarray(labels).reshape(-1)
  if labels.shape[0] != np.shape(embeddings)[0]:
    raise ValueError(f"labels [{labels.shape[0]}] and embeddings "
                     f"{np.shape(embeddings)} differ in length")
  if len(class_names) != 2:
    raise ValueError(f"class_names must name 2 classes, got {list(class_names)}")
  points, proto_points, ratio = project_2d(embeddings, centre_min, centre_maj)
  fig = Figure(figsize=(6.0, 5.0), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  for c in (0, 1):
    sel = labels == c
    ax.scatter(points[sel, 0], points[sel, 1], s=9, alpha=0.55,
               color=_CLASS_COLOURS[c], label=f"{class_names[c]} (n={int(sel.sum())})",
               edgecolors="none")
  for row, (name, c) in enumerate(((class_names[1], 1), (class_names[0], 0))):
    ax.scatter(proto_points[row, 0], proto_points[row, 1], marker="*", s=380,
               color=_CLASS_COLOURS[c], edgecolors="black", linewidths=1.2,
               label=f"prototype {name}", zorder=5)
  ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% var.)")
  ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% var.)")
  ax.set_title(title or "test embeddings (unit length, PCA)", fontsize=10)
  ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path
