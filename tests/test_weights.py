"""models.weights: every loader refuses a tree that does not fit, the same way."""

import numpy as np
import pytest

from comtriplet_jax.models import weights


def test_fit_variables_casts_to_the_targets_dtypes():
  target = {"a": {"k": np.zeros((2, 3), np.float32)}, "b": np.zeros((), np.int32)}
  source = {"a": {"k": np.ones((2, 3), np.float64)}, "b": np.array(7)}
  fitted = weights.fit_variables(target, source, "these weights")
  assert fitted["a"]["k"].dtype == np.float32 and fitted["b"].dtype == np.int32
  np.testing.assert_array_equal(fitted["a"]["k"], 1.0)
  assert weights.fit_variables({}, {}, "nothing") == {}


@pytest.mark.parametrize("source,message", [
    ({"a": {"k": np.ones((2, 3))}}, r"missing \['b'\]"),
    ({"a": {"k": np.ones((2, 3))}, "b": np.ones(()), "c": np.ones(1)},
     r"unexpected \['c'\]"),
    ({"a": {"k": np.ones((3, 2))}, "b": np.ones(())},
     r"shape mismatch .loaded, expected. \[\('a/k', \(3, 2\), \(2, 3\)\)\]"),
])
def test_fit_variables_names_what_does_not_fit(source, message):
  target = {"a": {"k": np.zeros((2, 3), np.float32)}, "b": np.zeros((), np.float32)}
  with pytest.raises(ValueError, match="ckpt X do not fit backbone 'v' .params.: .*"
                     + message):
    weights.fit_variables(target, source, "ckpt X", "backbone 'v' (params)")


def test_merge_backbone_replaces_only_the_backbone_subtree():
  variables = {"params": {"backbone": {"w": np.zeros(2, np.float32)},
                          "head": {"w": np.full(2, 5.0, np.float32)}},
               "batch_stats": {}}
  loaded = {"params": {"w": np.ones(2)}, "batch_stats": {}}
  merged = weights.merge_backbone(variables, loaded, "tiny")
  np.testing.assert_array_equal(merged["params"]["backbone"]["w"], 1.0)
  np.testing.assert_array_equal(merged["params"]["head"]["w"], 5.0)
  with pytest.raises(ValueError, match="init_from weights do not fit backbone 'tiny'"):
    weights.merge_backbone(variables, {"params": {"v": np.ones(2)}}, "tiny")
