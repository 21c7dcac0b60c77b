"""farthest_point_sample (ffi and jnp) against the numpy reference in xla_ops/reference/sampling.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import farthest_point_sample
from xla_ops.reference import sampling as ref

IMPLS = ("ffi", "jnp")


def _points(seed, shape):
  return np.random.default_rng(seed).random(shape, dtype=np.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,n,npoint", [((2,), 300, 40), ((), 57, 57), ((2, 3), 50, 1), ((3,), 13, 10)])
def test_matches_reference(impl, batch, n, npoint):
  xyz = _points(n, batch + (n, 3))
  got = jax.jit(lambda x: farthest_point_sample(x, npoint, impl=impl))(xyz)
  assert got.shape == batch + (npoint,) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), ref.farthest_point_sample(xyz, npoint))


@pytest.mark.parametrize("impl", IMPLS)
def test_clusters_and_grid_ties_match_reference(impl):
  """Many blocks of the pruned CPU pass: far-apart clusters, and a shuffled integer grid full of exact ties."""
  rng = np.random.default_rng(9)
  centers = rng.random((6, 3)) * 100
  clusters = (centers[rng.integers(0, 6, 1500)] + rng.standard_normal((1500, 3))).astype(np.float32)
  grid = np.stack(np.meshgrid(*[np.arange(12)] * 3, indexing="ij"), -1).reshape(-1, 3).astype(np.float32)
  grid = grid[rng.permutation(len(grid))][:1500]
  xyz = np.stack([clusters, grid])
  got = jax.jit(lambda x: farthest_point_sample(x, 300, impl=impl))(xyz)
  np.testing.assert_array_equal(np.asarray(got), ref.farthest_point_sample(xyz, 300))


@pytest.mark.parametrize("impl", IMPLS)
def test_first_pick_is_zero_and_picks_are_distinct(impl):
  xyz = _points(1, (4, 200, 3))
  idx = np.asarray(farthest_point_sample(xyz, 200, impl=impl))
  assert (idx[:, 0] == 0).all()
  for row in idx:  # npoint == N of distinct points: a permutation
    np.testing.assert_array_equal(np.sort(row), np.arange(200))


@pytest.mark.parametrize("impl", IMPLS)
def test_prefix_property(impl):
  xyz = _points(2, (2, 500, 3))
  long = np.asarray(farthest_point_sample(xyz, 120, impl=impl))
  short = np.asarray(farthest_point_sample(xyz, 30, impl=impl))
  np.testing.assert_array_equal(long[:, :30], short)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_lowest_index(impl):
  # Corners of a unit square, each twice: from 0 the farthest are 2 and 6 (tie -> 2); then 1/3/5/7 tie at
  # the same distance (-> 1), then 3; after every distinct point is picked, the lowest unpicked: 4, 5.
  square = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], np.float32)
  xyz = np.concatenate([square, square])
  idx = np.asarray(farthest_point_sample(xyz, 6, impl=impl))
  np.testing.assert_array_equal(idx, [0, 2, 1, 3, 4, 5])
  np.testing.assert_array_equal(idx, ref.farthest_point_sample(xyz, 6))


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_points_give_defined_output(impl):
  xyz = _points(3, (3, 150, 3))
  xyz[0, 5] = np.nan
  xyz[1, 0] = np.nan  # the first pick itself: it lowers nothing, so the next pick is 1 (all still at +inf)
  xyz[2, 70] = np.inf
  xyz[2, 90, 1] = -np.inf
  idx = np.asarray(farthest_point_sample(xyz, 12, impl=impl))
  assert ((idx >= 0) & (idx < 150)).all()
  np.testing.assert_array_equal(idx, ref.farthest_point_sample(xyz, 12))
  assert idx[0, 1] == 5  # a NaN point keeps distance +inf: picked right after index 0
  assert idx[1, 0] == 0 and idx[1, 1] == 1
  for row in idx:  # never the same point twice, whatever its coordinates
    assert len(set(row.tolist())) == len(row)


def test_vmap_and_batch_equivalence():
  xyz = _points(4, (6, 2, 100, 3))
  fps = lambda x: farthest_point_sample(x, 16)
  whole = np.asarray(jax.jit(fps)(xyz))
  np.testing.assert_array_equal(np.asarray(jax.vmap(fps)(xyz)), whole)
  # One big batch (all threads) == one example at a time (one thread each).
  for i in range(6):
    for j in range(2):
      np.testing.assert_array_equal(np.asarray(fps(xyz[i, j])), whole[i, j])


def test_no_gradient_flows():
  xyz = _points(5, (30, 3))
  g = jax.grad(lambda x: jnp.sum(x[farthest_point_sample(x, 5)]))(xyz)
  assert g.shape == xyz.shape  # gradient only through the gather, idx is constant
  np.testing.assert_array_equal(np.asarray(g).sum(), 15.0)


@pytest.mark.parametrize("bad,match", [
    (lambda x: farthest_point_sample(x[0, 0], 2), "xyz must have shape"),
    (lambda x: farthest_point_sample(x[..., :2], 2), "xyz must have shape"),
    (lambda x: farthest_point_sample(x.astype(jnp.float64), 2), "xyz must be float32"),
    (lambda x: farthest_point_sample(x.astype(jnp.int32), 2), "xyz must be float32"),
    (lambda x: farthest_point_sample(x, 21), "npoint must be <="),
    (lambda x: farthest_point_sample(x, 0), "npoint must be >= 1"),
    (lambda x: farthest_point_sample(x, 2, impl="cuda"), "impl must be"),
])
def test_bad_inputs_raise(bad, match):
  jax.config.update("jax_enable_x64", True)
  try:
    with pytest.raises(ValueError, match=match):
      bad(jnp.asarray(_points(6, (2, 20, 3))))
  finally:
    jax.config.update("jax_enable_x64", False)


def test_npoint_must_be_int():
  with pytest.raises(TypeError, match="npoint"):
    farthest_point_sample(_points(7, (20, 3)), 2.0)
