"""Ragged batches (issue 11, item 2) for nn_distance and chamfer_distance: a padded batch with per-example
lengths gives the per-example results of the unpadded clouds, whatever the padding holds."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import chamfer_distance, nn_distance

IMPLS = ("ffi", "jnp")
LEN_A = np.array([40, 17, 1, 0], np.int32)
LEN_B = np.array([25, 30, 9, 12], np.int32)


def _padded(seed):
  """Batches [4, 40, 3] / [4, 30, 3] whose padding holds NaN, inf and points closer than the real ones."""
  rng = np.random.default_rng(seed)
  a = rng.random((4, 40, 3), dtype=np.float32)
  b = rng.random((4, 30, 3), dtype=np.float32)
  for x, lengths in ((a, LEN_A), (b, LEN_B)):
    for i, n in enumerate(lengths):
      x[i, n:] = x[i, 0] if n else 0.5  # duplicates of a real point: would win every tie if not masked
      x[i, n + 1:n + 2] = np.nan
      x[i, n + 2:n + 3] = np.inf
  return a, b


@pytest.mark.parametrize("impl", IMPLS)
def test_nn_distance_with_lengths_equals_unpadded(impl):
  a, b = _padded(0)
  got = [np.asarray(x) for x in jax.jit(lambda a, b, la, lb: nn_distance(a, b, lengths_a=la, lengths_b=lb,
                                                                         impl=impl))(a, b, LEN_A, LEN_B)]
  for i, (n, m) in enumerate(zip(LEN_A, LEN_B)):
    if n and m:
      want = [np.asarray(x) for x in nn_distance(a[i, :n], b[i, :m], impl=impl)]
      # Same neighbours; distances to 1 ulp (jit vs eager may fuse the 3-term sum differently).
      np.testing.assert_array_equal(got[1][i, :n], want[1])
      np.testing.assert_array_equal(got[3][i, :m], want[3])
      np.testing.assert_allclose(got[0][i, :n], want[0], rtol=2.5e-7)
      np.testing.assert_allclose(got[2][i, :m], want[2], rtol=2.5e-7)
    else:  # an empty set: the other direction has no neighbours
      assert (got[1][i] == -1).all() and (got[3][i] == -1).all() and (got[0][i] == 0).all()
    np.testing.assert_array_equal(got[0][i, n:], 0.0)
    np.testing.assert_array_equal(got[1][i, n:], -1)
    np.testing.assert_array_equal(got[2][i, m:], 0.0)
    np.testing.assert_array_equal(got[3][i, m:], -1)


@pytest.mark.parametrize("impl,point_reduction", [("ffi", "mean"), ("ffi", "sum"), ("ffi", "max"), ("jnp", "mean")])
def test_chamfer_with_lengths_equals_unpadded_value_and_gradient(impl, point_reduction):
  a, b = _padded(1)
  kw = dict(point_reduction=point_reduction, squared=point_reduction != "max", weight_ab=0.55, impl=impl)

  def padded_loss(a, b):
    return chamfer_distance(a, b, lengths_a=LEN_A, lengths_b=LEN_B, reduction="none", **kw)

  got = np.asarray(jax.jit(padded_loss)(a, b))
  ga, gb = jax.jit(jax.grad(lambda a, b: jnp.sum(padded_loss(a, b)), (0, 1)))(a, b)
  ga, gb = np.asarray(ga), np.asarray(gb)
  assert np.isfinite(ga).all() and np.isfinite(gb).all()
  for i, (n, m) in enumerate(zip(LEN_A, LEN_B)):
    np.testing.assert_array_equal(ga[i, n:], 0.0)
    np.testing.assert_array_equal(gb[i, m:], 0.0)
    if not (n and m):
      assert got[i] == 0.0
      continue
    one = lambda x, y: chamfer_distance(x, y, reduction="none", **kw)  # noqa: E731
    np.testing.assert_allclose(got[i], np.asarray(one(a[i, :n], b[i, :m])), rtol=1e-6)
    wa, wb = jax.grad(one, (0, 1))(a[i, :n], b[i, :m])
    np.testing.assert_allclose(ga[i, :n], np.asarray(wa), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gb[i, :m], np.asarray(wb), rtol=1e-5, atol=1e-7)


def test_chamfer_lengths_under_vmap_and_bad_lengths():
  a, b = _padded(2)
  whole = chamfer_distance(a, b, lengths_a=LEN_A, lengths_b=LEN_B, reduction="none")
  mapped = jax.vmap(lambda x, y, la, lb: chamfer_distance(x, y, lengths_a=la, lengths_b=lb))(a, b, LEN_A, LEN_B)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(whole), rtol=1e-6)
  # Full lengths change nothing.
  full = chamfer_distance(a[:1], b[:1], lengths_a=np.array([40], np.int32), lengths_b=np.array([30], np.int32))
  clean_a, clean_b = a[:1, :40], b[:1, :25]
  np.testing.assert_allclose(float(chamfer_distance(clean_a, clean_b, lengths_b=np.array([25], np.int32))),
                             float(chamfer_distance(clean_a, clean_b)), rtol=1e-6)
  assert full.shape == ()
  with pytest.raises(ValueError, match=r"lengths_a must be int32 with the batch shape \(4,\)"):
    chamfer_distance(a, b, lengths_a=LEN_A.astype(np.int64))
  with pytest.raises(ValueError, match=r"lengths_b must be int32 with the batch shape \(4,\)"):
    nn_distance(a, b, lengths_b=LEN_B[:2])
