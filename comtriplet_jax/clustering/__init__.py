"""Clustering in JAX: jit- and vmap-able, as careful as scikit-learn's.

* :mod:`~comtriplet_jax.clustering.gmm`: Gaussian mixture EM (COM-Triplet paper
  Eq. 8-11), the pseudo-labels of unsupervised deep clustering (UDC); exact against
  scikit-learn's ``GaussianMixture`` in float64 and finite in float32 with fewer
  points than dimensions. ``fit_gmm``, ``predict``, ``predict_proba``,
  ``score_samples``, ``GMMResult``.
* :mod:`~comtriplet_jax.clustering.kmeans`: K-Means with k-means++ seeding and
  restarts, the GMM's initialisation and the K-Means baseline. ``kmeans``,
  ``kmeans_plusplus_init``, ``KMeansResult``.

Import the modules (``from comtriplet_jax.clustering import gmm, kmeans``); their
functions are not re-exported here, because the function ``kmeans`` would shadow
the module of the same name.
"""
