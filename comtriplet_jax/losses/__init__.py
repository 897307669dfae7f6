"""Loss kernels of both papers: pure, jit- and vmap-able functions of arrays.

* :mod:`~comtriplet_jax.losses.distances`: the cosine distance d (zero-vector safe).
* :mod:`~comtriplet_jax.losses.triplet`: triplet (Eq. 2), COM-Triplet (Eq. 3-5) and
  their unsupervised forms to the cluster centres (Eq. 12-13) of the COM-Triplet paper.
* :mod:`~comtriplet_jax.losses.classification`: weighted cross-entropy (COM-Triplet
  Eq. 1, BIIGMA-Net L_WCE), data-parallel aware.
* :mod:`~comtriplet_jax.losses.hsic`: BIIGMA-Net's HSIC independence loss (Eq. 1-3).
"""

from comtriplet_jax.losses.classification import class_weights_from_counts
from comtriplet_jax.losses.classification import weighted_cross_entropy
from comtriplet_jax.losses.distances import cosine_distance
from comtriplet_jax.losses.distances import pairwise_cosine_distance
from comtriplet_jax.losses.distances import unit_vectors
from comtriplet_jax.losses.hsic import head_dependence_matrix
from comtriplet_jax.losses.hsic import head_weight_l2
from comtriplet_jax.losses.hsic import hsic_independence_loss
from comtriplet_jax.losses.hsic import median_sigma
from comtriplet_jax.losses.hsic import rbf_kernel_matrices
from comtriplet_jax.losses.hsic import squared_distances
from comtriplet_jax.losses.triplet import assign_to_centres
from comtriplet_jax.losses.triplet import centre_com_triplet_loss
from comtriplet_jax.losses.triplet import centre_triplet_loss
from comtriplet_jax.losses.triplet import com_triplet_loss
from comtriplet_jax.losses.triplet import triplet_loss

__all__ = [
    "assign_to_centres",
    "centre_com_triplet_loss",
    "centre_triplet_loss",
    "class_weights_from_counts",
    "com_triplet_loss",
    "cosine_distance",
    "head_dependence_matrix",
    "head_weight_l2",
    "hsic_independence_loss",
    "median_sigma",
    "pairwise_cosine_distance",
    "rbf_kernel_matrices",
    "squared_distances",
    "triplet_loss",
    "unit_vectors",
    "weighted_cross_entropy",
]
