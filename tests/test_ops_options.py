"""The options users ask for (issue 11, item 4), against the numpy references, gradients included:
chamfer_distance (single_directional, point_reduction, Euclidean distances, per-example weights), knn
return_sorted, ball_query distances and -1 padding, farthest_point_sample with a random start."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import ball_query, chamfer_distance, farthest_point_sample, knn
from xla_ops.reference import chamfer as chamfer_ref
from xla_ops.reference import grouping as grouping_ref
from xla_ops.reference import sampling as sampling_ref


def _clouds(seed, *shapes):
  rng = np.random.default_rng(seed)
  return [rng.random(s, dtype=np.float32) for s in shapes]


# ---- chamfer_distance ---------------------------------------------------------------------------------
# Every (point_reduction, single_directional, squared) once; weights and reduction cycle through their values
# (all 80 combinations cost ~1.5 min of compiles for little extra coverage).
CHAMFER_OPTIONS = [
    dict(point_reduction=p, single_directional=s, squared=q, weights=i % 2 == 0,
         reduction="none" if p == "none" else ("mean", "sum", "none")[i % 3])
    for i, (p, s, q) in enumerate(itertools.product(("mean", "sum", "max", "none"), (False, True), (True, False)))]


def _chamfer_ids(o):
  return "-".join(f"{k}={v}" for k, v in o.items())


@pytest.mark.parametrize("options", CHAMFER_OPTIONS, ids=_chamfer_ids)
def test_chamfer_options_value_and_gradient(options):
  a, b = _clouds(1, (3, 40, 3), (3, 25, 3))
  weights = np.array([0.5, 2.0, 1.25], np.float32) if options["weights"] else None
  kw = dict(options, weights=weights, weight_ab=0.55, weight_ba=1.5)
  got = jax.jit(lambda a, b, w: chamfer_distance(a, b, **dict(kw, weights=w)))(a, b, weights)
  want = chamfer_ref.chamfer_distance(a, b, **kw)
  for g, w_ in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.dtype == jnp.float32 and g.shape == np.shape(w_)
    np.testing.assert_allclose(np.asarray(g), w_, rtol=2e-5, atol=1e-7)

  def loss(a, b):
    return sum(jnp.sum(x) for x in jax.tree.leaves(chamfer_distance(a, b, **kw)))

  ga, gb = jax.jit(jax.grad(loss, (0, 1)))(a, b)
  wa, wb = chamfer_ref.chamfer_distance_options_grad(a, b, **kw)
  np.testing.assert_allclose(np.asarray(ga), wa, rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gb), wb, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["ffi", "jnp"])
def test_chamfer_hausdorff_and_zero_distance_gradient(impl):
  a, b = _clouds(2, (2, 30, 3), (2, 20, 3))
  got = chamfer_distance(a, b, point_reduction="max", squared=False, reduction="none", impl=impl)
  d = np.sqrt(((a[:, :, None] - b[:, None]) ** 2).sum(-1).astype(np.float64))
  hausdorff = np.maximum(d.min(2).max(1), d.min(1).max(1))
  np.testing.assert_allclose(np.asarray(got), hausdorff, rtol=1e-5)
  # Identical clouds: every distance is 0; the Euclidean gradient is 0, not NaN/inf.
  g = jax.grad(lambda x: chamfer_distance(x, a, squared=False))(a)
  np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_chamfer_zero_weights_and_bad_options():
  a, b = _clouds(3, (2, 10, 3), (2, 12, 3))
  assert float(chamfer_distance(a, b, weights=np.zeros(2, np.float32))) == 0.0
  with pytest.raises(ValueError, match="point_reduction must be one of"):
    chamfer_distance(a, b, point_reduction="median")
  with pytest.raises(ValueError, match="reduction must be 'none'"):
    chamfer_distance(a, b, point_reduction="none")
  with pytest.raises(ValueError, match=r"weights must have the batch shape \(2,\)"):
    chamfer_distance(a, b, weights=np.ones(3, np.float32))


# ---- knn return_sorted --------------------------------------------------------------------------------
@pytest.mark.parametrize("return_sorted", [True, False])
def test_knn_return_sorted(return_sorted):
  q, r = _clouds(4, (2, 30, 5), (2, 50, 5))
  dist, idx = knn(q, r, 6, return_sorted=return_sorted)
  want_d, want_i = grouping_ref.knn(q, r, 6)
  # Sorted either way (the kernel keeps a sorted top-k; False is accepted for PyTorch3D compatibility).
  np.testing.assert_array_equal(np.asarray(idx), want_i)
  np.testing.assert_allclose(np.asarray(dist), want_d, rtol=1e-6)


# ---- ball_query: distances and padding ----------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ffi", "jnp"])
@pytest.mark.parametrize("padding", ["first", "-1"])
def test_ball_query_distances_and_padding(impl, padding):
  xyz, new_xyz = _clouds(5, (2, 200, 3), (2, 40, 3))
  new_xyz[0, 0] = 5.0  # an empty ball
  idx, count, dist = ball_query(xyz, new_xyz, 0.2, 12, return_dists=True, padding=padding, impl=impl)
  want_idx, want_count = grouping_ref.ball_query(xyz, new_xyz, 0.2, 12)
  np.testing.assert_array_equal(np.asarray(count), want_count)
  slot = np.arange(12)
  real = slot < want_count[..., None]
  if padding == "first":
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
  else:
    np.testing.assert_array_equal(np.asarray(idx), np.where(real, want_idx, -1))
  gathered = np.take_along_axis(xyz[:, None], np.maximum(want_idx, 0)[..., None], axis=2)
  want_dist = ((new_xyz[:, :, None].astype(np.float64) - gathered) ** 2).sum(-1)
  keep = real if padding == "-1" else (want_count[..., None] > 0)
  want_dist = np.where(keep, want_dist, 0.0)
  np.testing.assert_allclose(np.asarray(dist), want_dist, rtol=1e-5, atol=1e-7)
  assert (np.asarray(dist)[real] < 0.2 ** 2).all() and (np.asarray(dist)[0, 0] == 0).all()

  # Gradient of sum(dist): 2 (q - p) to the query, the negative to each gathered point (real slots).
  def loss(x, q):
    return jnp.sum(ball_query(x, q, 0.2, 12, return_dists=True, padding=padding, impl=impl)[2])
  gx, gq = jax.grad(loss, (0, 1))(xyz, new_xyz)
  diff = 2.0 * (new_xyz[:, :, None].astype(np.float64) - gathered) * keep[..., None]
  want_gq = diff.sum(2)
  want_gx = np.zeros(xyz.shape)
  for bi in range(2):
    np.add.at(want_gx[bi], np.maximum(want_idx[bi], 0).reshape(-1), -diff[bi].reshape(-1, 3))
  np.testing.assert_allclose(np.asarray(gq), want_gq, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-4, atol=1e-6)


def test_ball_query_default_returns_two_arrays_and_bad_padding():
  xyz, new_xyz = _clouds(6, (50, 3), (5, 3))
  assert len(ball_query(xyz, new_xyz, 0.3, 4)) == 2
  with pytest.raises(ValueError, match="padding must be one of"):
    ball_query(xyz, new_xyz, 0.3, 4, padding="zero")


# ---- farthest_point_sample: random start --------------------------------------------------------------
@pytest.mark.parametrize("impl", ["ffi", "jnp"])
def test_fps_start_matches_reference(impl):
  xyz, = _clouds(7, (3, 300, 3))
  key = jax.random.key(3)
  got = np.asarray(jax.jit(lambda x, k: farthest_point_sample(x, 40, key=k, impl=impl))(xyz, key))
  starts = got[:, 0]
  assert len(set(starts.tolist())) > 1  # one start per example
  np.testing.assert_array_equal(got, sampling_ref.farthest_point_sample(xyz, 40, start=starts))
  # Same key, same picks; no key: start 0.
  np.testing.assert_array_equal(np.asarray(farthest_point_sample(xyz, 40, key=key, impl=impl)), got)
  np.testing.assert_array_equal(np.asarray(farthest_point_sample(xyz, 40, impl=impl)),
                                sampling_ref.farthest_point_sample(xyz, 40))


@pytest.mark.parametrize("impl", ["ffi", "jnp"])
def test_fps_start_ties_and_duplicates(impl):
  """Ties go to the first index after the start in cyclic order; picks stay distinct."""
  square = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
  xyz = np.stack([np.concatenate([square, square])] * 8)
  start = np.arange(8, dtype=np.int32)
  want = sampling_ref.farthest_point_sample(xyz, 8, start=start)
  for row in want:
    assert sorted(row.tolist()) == list(range(8))
  np.testing.assert_array_equal(np.asarray(farthest_point_sample(xyz, 8, start=start, impl=impl)), want)


def test_fps_start_bad_arguments():
  xyz, = _clouds(8, (2, 20, 3))
  with pytest.raises(ValueError, match="at most one of key and start"):
    farthest_point_sample(xyz, 4, key=jax.random.key(0), start=np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"start must be int32 with the batch shape \(2,\)"):
    farthest_point_sample(xyz, 4, start=np.zeros(3, np.int32))
