"""The CPU k-d tree paths (xla_ops/csrc/kdtree.h) of knn (C = 3), three_nn and ball_query return exactly
what their brute-force paths return: same indices, same distance bits, same padding, on clouds full of
exact duplicates and ties, grid points, NaN/Inf coordinates and overflowing distances, at sizes on both
sides of the automatic thresholds. XLA_OPS_CPU_SEARCH=tree|brute forces a path (read by the handlers at
every call); on tie-exact data (small-integer grids) both are also checked against the numpy references.
"""
import contextlib
import os

import jax
import numpy as np
import pytest

from xla_ops import ball_query, knn, nn_distance, three_nn
from xla_ops.reference import chamfer as ref_chamfer
from xla_ops.reference import grouping as ref_grouping
from xla_ops.reference import interpolation as ref_interp

knn_jit = jax.jit(knn, static_argnums=(2,), static_argnames=("impl",))
ball_jit = jax.jit(ball_query, static_argnums=(2, 3), static_argnames=("impl",))
three_nn_jit = jax.jit(three_nn, static_argnames=("impl",))
nn_distance_jit = jax.jit(nn_distance, static_argnames=("impl",))

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the k-d tree is the CPU handlers'")


@contextlib.contextmanager
def search_path(path):
  old = os.environ.get("XLA_OPS_CPU_SEARCH")
  os.environ["XLA_OPS_CPU_SEARCH"] = path
  try:
    yield
  finally:
    if old is None:
      del os.environ["XLA_OPS_CPU_SEARCH"]
    else:
      os.environ["XLA_OPS_CPU_SEARCH"] = old


def _both(fn, *args):
  """fn(*args) under the forced tree and the forced brute-force path, as numpy; the automatic choice must
  agree with them too."""
  out = {}
  for path in ("tree", "brute", "auto"):
    with search_path(path):
      out[path] = [np.asarray(x) for x in jax.block_until_ready(fn(*args))]
  _assert_identical(out["auto"], out["brute"])
  return out["tree"], out["brute"]


def _assert_identical(tree, brute):
  for t, b in zip(tree, brute):
    assert t.dtype == b.dtype and t.shape == b.shape
    np.testing.assert_array_equal(t.view(np.int32), b.view(np.int32))  # bit for bit (floats viewed as int32)


def _cloud(kind, seed, shape):
  """Point clouds that stress exactness: many exact duplicates and ties, or special values."""
  rng = np.random.default_rng(seed)
  if kind == "grid":  # small-integer grid: exact ties everywhere, exact in float32 and float64
    return rng.integers(0, 5, shape).astype(np.float32)
  if kind == "duplicates":  # a few hundred distinct points, each many times, at random positions
    base = rng.random((257,) + shape[-1:], np.float32)
    return base[rng.integers(0, 257, shape[:-1])]
  if kind == "nonfinite":  # duplicates, with NaN / +-Inf coordinates and overflowing distances
    x = _cloud("duplicates", seed, shape)
    flat = x.reshape(-1, shape[-1])
    rows = rng.permutation(len(flat))
    flat[rows[0::17], 0] = np.nan
    flat[rows[1::19], 1] = np.inf
    flat[rows[2::23], 2] = -np.inf
    flat[rows[3::29]] = np.float32(3e19)  # finite, but squared distances overflow to +inf
    return x
  return rng.random(shape, np.float32)


KINDS = ("uniform", "grid", "duplicates", "nonfinite")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n,k", [(40, 1200, 1), (40, 1200, 20), (30, 600, 600), (20, 100, 3), (25, 9, 9)])
def test_knn_tree_equals_brute_force(kind, m, n, k):
  query, refs = _cloud(kind, 1, (2, m, 3)), _cloud(kind, 2, (2, n, 3))
  query[:, :5] = refs[:, :5]  # queries on reference points (distance 0, tied with their duplicates)
  tree, brute = _both(lambda q, r: knn_jit(q, r, k), query, refs)
  _assert_identical(tree, brute)
  if kind == "grid":  # exact ties in float32 and float64: the reference ranks them identically
    np.testing.assert_array_equal(tree[1], ref_grouping.knn(query, refs, k)[1])
  if kind == "nonfinite":
    assert np.isposinf(tree[0]).any()  # the special values reached the ranking


def test_knn_tree_query_in_refs_with_every_point_the_same():
  # Self-knn of a cloud of identical points: 0..k-1 with distance 0 for every query, from the tree.
  pts = np.full((1, 3000, 3), 0.25, np.float32)
  tree, brute = _both(lambda x: knn_jit(x, x, 20), pts)
  _assert_identical(tree, brute)
  np.testing.assert_array_equal(tree[1], np.broadcast_to(np.arange(20), (1, 3000, 20)))
  assert (tree[0] == 0).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(500, 1000), (40, 700), (30, 2), (20, 3), (10, 1)])
def test_three_nn_tree_equals_brute_force(kind, n, m):
  unknown, known = _cloud(kind, 3, (2, n, 3)), _cloud(kind, 4, (2, m, 3))
  unknown[:, : min(4, m)] = known[:, : min(4, m)]
  tree, brute = _both(three_nn_jit, unknown, known)
  _assert_identical(tree, brute)
  if kind == "grid":
    for b in range(2):
      want_d, want_i = ref_interp.three_nn(unknown[b], known[b])
      np.testing.assert_array_equal(tree[1][b], want_i)
      np.testing.assert_array_equal(tree[0][b], want_d.astype(np.float32))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m,radius,nsample", [
    (1500, 60, 0.15, 16),  # partly filled and full balls
    (1500, 60, 1.0, 32),   # grid: r^2 = 1 is hit exactly by many points (strict <: not inside)
    (800, 40, 0.5, 1),
    (1500, 60, 0.5, 64),   # grid: sparse balls (the tree answers them), r^2 = 0.25 hit exactly
    (3000, 60, 0.08, 16),
    (800, 40, 30.0, 64),   # every finite point inside: first nsample by index
    (100, 8, 0.3, 200),    # nsample > N
])
def test_ball_query_tree_equals_brute_force(kind, n, m, radius, nsample):
  xyz, new_xyz = _cloud(kind, 5, (2, n, 3)), _cloud(kind, 6, (2, m, 3))
  if kind == "grid":
    xyz, new_xyz = xyz * np.float32(0.5), new_xyz * np.float32(0.5)
  tree, brute = _both(lambda x, q: ball_jit(x, q, radius, nsample), xyz, new_xyz)
  _assert_identical(tree, brute)
  want_idx, want_cnt = ref_grouping.ball_query(xyz, new_xyz, radius, nsample)
  np.testing.assert_array_equal(tree[0], want_idx)
  np.testing.assert_array_equal(tree[1], want_cnt)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,m", [(300, 500), (90, 100)])  # above and below nn_distance's threshold
def test_nn_distance_tree_equals_brute_force(kind, n, m):
  a, b = _cloud(kind, 8, (2, n, 3)), _cloud(kind, 9, (2, m, 3))
  a[:, :6] = b[:, 10:16]
  tree, brute = _both(nn_distance_jit, a, b)
  _assert_identical(tree, brute)
  if kind == "grid":
    want = ref_chamfer.nn_distance(a, b)
    np.testing.assert_array_equal(tree[1], want[1])
    np.testing.assert_array_equal(tree[3], want[3])


def test_many_identical_points_are_fast_enough_to_run():
  # 200k identical points: brute force would need 4e10 distances per op (minutes); the tree's (distance,
  # index) pruning answers every query in O(k + log N) nodes. Only results are asserted here; the time is
  # measured by experiments/bench_ops.py (case "knn 1M identical").
  pts = np.full((1, 200_000, 3), -1.5, np.float32)
  dist, idx = knn_jit(pts, pts, 20)
  np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(20, dtype=np.int32), (1, 200_000, 20)))
  assert (np.asarray(dist) == 0).all()
  dist, idx = three_nn_jit(pts, pts)
  np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(3, dtype=np.int32), (1, 200_000, 3)))
  assert (np.asarray(dist) == 0).all()
  # Identical references away from the queries: every distance tied and > 0.
  queries = np.random.default_rng(7).random((1, 2000, 3), np.float32)
  dist, idx = knn_jit(queries, pts, 5)
  np.testing.assert_array_equal(np.asarray(idx), np.broadcast_to(np.arange(5, dtype=np.int32), (1, 2000, 5)))
  idx, count = ball_jit(pts, queries[:, :50] - 2.0, 1.5, 8)
  want_idx, want_cnt = ref_grouping.ball_query(pts[:, :100], queries[:, :50] - 2.0, 1.5, 8)  # first hits only
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(count), want_cnt)
