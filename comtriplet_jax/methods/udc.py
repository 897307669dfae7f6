"""Unsupervised deep clustering (UDC) with GMM pseudo-labels (Eq. 8-13).

The model, prototypes, evaluation and report are those of SDC (``sdc.py``);
what changes is where the two clusters come from. Each step:

1. 3M unlabelled images (``data/triplets.unlabelled_stream``; M =
   ``config.batch_size``), b' = 3M / D per device, one forward pass.
2. The stop-gradient embeddings of all devices are all-gathered, [3M, S], and
   every device fits the same 2-component Gaussian mixture to them
   (``clustering.gmm.fit_gmm``: k-means initialisation, tol 1e-3, reg_covar
   1e-6, Eq. 8-10) from a key that depends on the seed and the step only, so
   the fit is identical on every device.
3. Pseudo-labels from the responsibilities, Eq. 11: each embedding goes to the
   component of highest r_jk; the component with the smaller mixture weight h_k
   is the minority (melanoma) cluster, its mean mu_min, the other's mu_maj.
4. Loss on this device's b' embeddings: the unsupervised COM-Triplet loss to
   the GMM means, Eq. 12-13 (``losses.centre_com_triplet_loss``; adaptive
   margin by default), or, for UDC_Triplet, the classic triplet loss to the
   centres with margin 0.2 (``losses.centre_triplet_loss``). The anchors' own
   clusters are the GMM pseudo-labels (``assignment='gmm'``, default), or the
   nearer mean in cosine distance (``'nearest'``, the paper's "each sample
   image considered as A is first assigned to the closest cluster"). The means
   are constants of the loss, as they come out of EM, not from
   back-propagation.
5. The GMM means are this iteration's centres, tracked with Eq. 7 exactly as
   in SDC (a fit that leaves a component without any pseudo-label gives no
   centre).

Covariance type: 'diag' by default. The paper does not say; with 3M = 45
points in S = 128 dimensions a full covariance has S(S+1)/2 = 8,256
parameters per component estimated from ~45 points: the scatter matrix has
rank < 45, the fit is determined by reg_covar = 1e-6 in the remaining > 83
directions, and the likelihood rewards components that collapse onto a few
points. A diagonal model has S variances per component, each estimated from
every point of its component. 'full' stays available
(``config.udc.covariance_type``).

AUC convention: labels are never used for training, so which component is
melanoma is unknown; the smaller-weight component is taken as the minority
(melanoma, label 1) and the malignancy score is d_maj - d_min to the final
prototypes. An AUC below 0.5 means the smaller component gathered nevi.

The batch's true labels are read only for a monitoring metric
(``pseudo_label_agreement``), never by the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from comtriplet_jax import losses
from comtriplet_jax import parallel
from comtriplet_jax.clustering import gmm
from comtriplet_jax.clustering import prototypes
from comtriplet_jax.data import triplets
from comtriplet_jax.methods import sdc

COVARIANCE_TYPES = ("diag", "full")
ASSIGNMENTS = ("gmm", "nearest")
GMM_FEATURES = ("raw", "unit")
# Folded into the seed for the GMM's k-means initialisation keys.
_GMM_KEY_TAG = 0x6A11


class UDC(sdc.SDC):
  """Unsupervised deep clustering; the config section is ``config.udc``.

  Extra fields of ``config.udc`` beyond SDC's: covariance_type ('diag' |
  'full'), gmm_tol, gmm_reg_covar, gmm_max_iter, assignment ('gmm' |
  'nearest'), gmm_features ('raw' embeddings as in the paper, or 'unit':
  L2-normalised, the geometry the cosine losses see).
  """

  section = "udc"

  def _validate(self) -> None:
    super()._validate()
    s, cfg = self.section, self.cfg
    sdc._one_of(s, cfg, "covariance_type", COVARIANCE_TYPES)
    sdc._one_of(s, cfg, "assignment", ASSIGNMENTS)
    sdc._one_of(s, cfg, "gmm_features", GMM_FEATURES)
    if not cfg.gmm_tol > 0:
      raise ValueError(f"config.{s}.gmm_tol={cfg.gmm_tol!r} must be > 0")
    if not cfg.gmm_reg_covar > 0:
      raise ValueError(f"config.{s}.gmm_reg_covar={cfg.gmm_reg_covar!r} must be > 0")
    if not isinstance(cfg.gmm_max_iter, int) or cfg.gmm_max_iter < 1:
      raise ValueError(f"config.{s}.gmm_max_iter={cfg.gmm_max_iter!r} must be a "
                       "positive integer")

  def departures(self):
    """The training fields that differ from the papers, and the GMM's features.

    The paper fits the mixture to the embeddings as they are; ``'unit'``
    features (L2-normalised) are this project's option.
    """
    out = super().departures()
    if self.cfg.gmm_features != "raw":
      out["gmm_features"] = self.cfg.gmm_features
    return out

  # --------------------------------------------------------------------- loss
  def fit_clusters(self, embeddings: jax.Array, step: jax.Array):
    """GMM on the gathered [3M, S] embeddings -> pseudo-labels and the two means.

    Returns:
      (pseudo_labels [3M] int32 with 1 = minority component, mu_min [S],
      mu_maj [S], the GMMResult).
    """
    features = embeddings
    if self.cfg.gmm_features == "unit":
      features = losses.unit_vectors(embeddings)
    key = jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(self.config.seed), _GMM_KEY_TAG), step)
    fit = gmm.fit_gmm(features, 2, key=key, covariance_type=self.cfg.covariance_type,
                      reg_covar=self.cfg.gmm_reg_covar, tol=self.cfg.gmm_tol,
                      max_iter=self.cfg.gmm_max_iter, init="kmeans")
    minority = jnp.argmin(fit.weights)
    # Eq. 11: the component of highest responsibility.
    component = jnp.argmax(fit.responsibilities, axis=1)
    pseudo = (component == minority).astype(jnp.int32)
    return pseudo, fit.means[minority], fit.means[1 - minority], fit

  def loss(self, params, batch_stats, method_state, batch, rng, *, step):
    images = batch["image"]
    local = images.shape[0]
    embeddings, batch_stats = self._train_embeddings(params, batch_stats, images, rng)
    gathered = parallel.all_gather(jax.lax.stop_gradient(embeddings))    # [3M, S]
    pseudo, mu_min, mu_maj, fit = self.fit_clusters(gathered, step)
    start = jax.lax.axis_index(parallel.AXIS) * local
    local_pseudo = jax.lax.dynamic_slice(pseudo, (start,), (local,))
    assignment = local_pseudo if self.cfg.assignment == "gmm" else None
    if self.cfg.loss == "triplet":
      per_anchor, used = losses.centre_triplet_loss(
          embeddings, mu_min, mu_maj, margin=self.margin, assignment=assignment,
          reduction="none")
    else:
      per_anchor, used = losses.centre_com_triplet_loss(
          embeddings, mu_min, mu_maj, margin=self.margin, assignment=assignment,
          reduction="none")
    loss = jnp.mean(per_anchor)

    finite = jnp.all(jnp.isfinite(mu_min)) & jnp.all(jnp.isfinite(mu_maj))
    valid = finite & jnp.any(pseudo == 1) & jnp.any(pseudo == 0)
    stored = method_state["centres"]
    metrics = {
        "active_fraction": jnp.mean((per_anchor > 0).astype(jnp.float32)),
        "batch_separation": losses.cosine_distance(mu_min, mu_maj),
        "prototype_separation": stored["separation"],
        "gmm_iterations": fit.n_iter.astype(jnp.float32),
        "gmm_converged": fit.converged.astype(jnp.float32),
        "minority_weight": jnp.min(fit.weights),
        "pseudo_minority_fraction": jnp.mean(pseudo.astype(jnp.float32)),
        "anchor_minority_fraction": jnp.mean(used.astype(jnp.float32)),
    }
    if "label" in batch:
      # Monitoring only: how often the pseudo-label is the true class.
      metrics["pseudo_label_agreement"] = jnp.mean(
          (local_pseudo == batch["label"]).astype(jnp.float32))
    aux = {"centre_min": mu_min, "centre_maj": mu_maj, "valid": valid}
    return loss, (batch_stats, metrics, aux)

  # ------------------------------------------------------------------- data
  def train_stream(self, data, start_step):
    return triplets.unlabelled_stream(
        self.train_images(data), images_per_step=3 * self.config.batch_size,
        num_local_devices=jax.local_device_count(), seed=self.config.seed,
        start_step=start_step, process_index=jax.process_index(),
        process_count=jax.process_count())

  def auc_convention(self) -> str:
    return ("unsupervised: the GMM component with the smaller mixture weight is "
            "taken as the minority (melanoma, label 1); score = d_maj - d_min to "
            "the final prototypes (Eq. 14). No label decides the mapping, so an "
            "AUC below 0.5 means the smaller component gathered nevi")
