"""Ragged batches (issue 11, item 2): for every op that takes point sets, a padded batch with per-example
lengths gives the per-example results of the unpadded clouds (values, indices, gradients), whatever the
padding holds (NaN, inf, duplicates of real points), with the documented fills beyond each length; also
under vmap and shard_map."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import PartitionSpec as P

from xla_ops import (ball_query, chamfer_distance, farthest_point_sample, inverse_distance_weights, knn,
                     nn_distance, three_interpolate, three_nn)

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


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_with_lengths_equals_unpadded(impl):
  a, b = _padded(3)  # queries a (lengths LEN_A), refs b (lengths LEN_B); k = 10 > LEN_B[2] = 9
  k = 10

  def padded(q, r):
    return knn(q, r, k, lengths_query=LEN_A, lengths_ref=LEN_B, impl=impl)

  dist, idx = (np.asarray(x) for x in jax.jit(padded)(a, b))
  gq, gr = (np.asarray(g) for g in jax.grad(lambda q, r: jnp.sum(padded(q, r)[0]), (0, 1))(a, b))
  assert np.isfinite(gq).all() and np.isfinite(gr).all()
  for i, (n, m) in enumerate(zip(LEN_A.tolist(), LEN_B.tolist())):
    kk = min(k, m)
    np.testing.assert_array_equal(idx[i, n:], -1)
    np.testing.assert_array_equal(idx[i, :, kk:], -1)
    np.testing.assert_array_equal(dist[i, n:], 0.0)
    np.testing.assert_array_equal(dist[i, :, kk:], 0.0)
    np.testing.assert_array_equal(gq[i, n:], 0.0)
    np.testing.assert_array_equal(gr[i, m:], 0.0)
    if not (n and m):
      continue
    want_d, want_i = knn(a[i, :n], b[i, :m], kk, impl=impl)
    np.testing.assert_array_equal(idx[i, :n, :kk], np.asarray(want_i))
    np.testing.assert_allclose(dist[i, :n, :kk], np.asarray(want_d), rtol=2.5e-7)
    wq, wr = jax.grad(lambda q, r: jnp.sum(knn(q, r, kk, impl=impl)[0]), (0, 1))(a[i, :n], b[i, :m])
    np.testing.assert_allclose(gq[i, :n], np.asarray(wq), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gr[i, :m], np.asarray(wr), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("how", ["index0", "start"])
def test_fps_with_lengths_equals_unpadded(impl, how):
  a, _ = _padded(4)  # lengths LEN_A = 40 (full), 17, 1, 0
  a[1, 3] = np.nan  # a real NaN point: picked as soon as no larger distance remains, in both runs
  npoint = 20  # > LEN_A[1..3]: the slots beyond the length hold -1
  start = np.array([5, 16, 0, 0], np.int32) if how == "start" else None
  got = np.asarray(jax.jit(lambda x: farthest_point_sample(x, npoint, start=start, lengths=LEN_A, impl=impl))(a))
  for i, n in enumerate(LEN_A.tolist()):
    np.testing.assert_array_equal(got[i, n:], -1)
    if n:
      s = None if start is None else np.asarray(start[i])
      want = farthest_point_sample(a[i, :n], min(npoint, n), start=s, impl=impl)
      np.testing.assert_array_equal(got[i, :n], np.asarray(want))


def test_fps_lengths_with_a_nan_start_point_never_picks_padding():
  """The copies of a finite real point keep the padding last even when the start point itself is NaN."""
  a, _ = _padded(5)
  a[1, 0] = np.nan
  for impl in IMPLS:
    got = np.asarray(farthest_point_sample(a, 20, lengths=LEN_A, impl=impl))
    np.testing.assert_array_equal(got[1, :17], np.asarray(farthest_point_sample(a[1, :17], 17, impl=impl)))
    np.testing.assert_array_equal(got[1, 17:], -1)


def test_fps_lengths_with_key_starts_within_the_length():
  a, _ = _padded(6)
  key = jax.random.key(3)
  got = np.asarray(farthest_point_sample(a, 20, key=key, lengths=LEN_A))
  start = np.asarray(jax.random.randint(key, (4,), 0, np.maximum(LEN_A, 1), dtype=jnp.int32))
  np.testing.assert_array_equal(got, np.asarray(farthest_point_sample(a, 20, start=start, lengths=LEN_A)))
  for i, n in enumerate(LEN_A.tolist()):
    assert sorted(got[i, :n].tolist()) == sorted(set(got[i, :n].tolist())) and (got[i, :n] < n).all()
  with pytest.raises(ValueError, match=r"lengths must be int32 with the batch shape \(4,\)"):
    farthest_point_sample(a, 4, lengths=LEN_A[:3])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("padding", ["first", "-1"])
def test_ball_query_with_lengths_equals_unpadded(impl, padding):
  pts, queries = _padded(7)  # points [4, 40] (lengths LEN_A), queries [4, 30] (lengths LEN_B)
  queries[:, :9:4] += 3.0  # far from every point: empty balls
  kw = dict(radius=0.3, nsample=6, return_dists=True, padding=padding, impl=impl)

  def padded(p, q):
    return ball_query(p, q, lengths_xyz=LEN_A, lengths_new_xyz=LEN_B, **kw)

  idx, count, dist = (np.asarray(x) for x in jax.jit(padded)(pts, queries))
  gp, gq = (np.asarray(g) for g in jax.grad(lambda p, q: jnp.sum(jnp.sin(padded(p, q)[2])), (0, 1))(pts, queries))
  assert np.isfinite(gp).all() and np.isfinite(gq).all()
  empty_idx = 0 if padding == "first" else -1
  counts = []
  for i, (n, m) in enumerate(zip(LEN_A.tolist(), LEN_B.tolist())):
    np.testing.assert_array_equal(count[i, m:], 0)
    np.testing.assert_array_equal(idx[i, m:], empty_idx)
    np.testing.assert_array_equal(dist[i, m:], 0.0)
    np.testing.assert_array_equal(gp[i, n:], 0.0)
    np.testing.assert_array_equal(gq[i, m:], 0.0)
    if n == 0:  # no points: every real query is an empty ball
      np.testing.assert_array_equal(count[i], 0)
      np.testing.assert_array_equal(idx[i], empty_idx)
      continue
    one = lambda p, q: ball_query(p, q, **kw)  # noqa: E731
    want = [np.asarray(x) for x in one(pts[i, :n], queries[i, :m])]
    counts.extend(want[1].tolist())
    np.testing.assert_array_equal(idx[i, :m], want[0])
    np.testing.assert_array_equal(count[i, :m], want[1])
    np.testing.assert_allclose(dist[i, :m], want[2], rtol=2.5e-7)
    wp, wq = jax.grad(lambda p, q: jnp.sum(jnp.sin(one(p, q)[2])), (0, 1))(pts[i, :n], queries[i, :m])
    np.testing.assert_allclose(gp[i, :n], np.asarray(wp), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gq[i, :m], np.asarray(wq), rtol=1e-5, atol=1e-6)
  assert 0 in counts and 6 in counts  # the case has empty and full balls


LEN_KNOWN = np.array([30, 2, 9, 0], np.int32)  # 30: NaN/inf real points; 2 < 3: the third slot is the m < 3 fill


@pytest.mark.parametrize("impl", IMPLS)
def test_three_nn_and_interpolation_with_lengths_equal_unpadded(impl):
  unknown, known = _padded(8)  # unknown [4, 40] (lengths LEN_A), known [4, 30] (lengths LEN_KNOWN)
  known[1, 2:] = known[1, 0]
  known[1, 3] = np.nan
  rng = np.random.default_rng(9)
  feats = rng.standard_normal((4, 30, 5)).astype(np.float32)
  for i, m in enumerate(LEN_KNOWN.tolist()):
    feats[i, max(m, 1):] = np.nan  # garbage wherever no index may point (example 3 keeps row 0: see docs)

  def padded(u, k, f):
    dist, idx = three_nn(u, k, lengths_unknown=LEN_A, lengths_known=LEN_KNOWN, impl=impl)
    return dist, idx, three_interpolate(f, idx, inverse_distance_weights(dist), impl=impl)

  dist, idx, out = (np.asarray(x) for x in jax.jit(padded)(unknown, known, feats))
  loss = lambda u, k, f: jnp.sum(jnp.sin(padded(u, k, f)[2]))  # noqa: E731
  gu, gk, gf = (np.asarray(g) for g in jax.grad(loss, (0, 1, 2))(unknown, known, feats))
  assert np.isfinite(gu).all() and np.isfinite(gk).all() and np.isfinite(gf).all()
  for i, (n, m) in enumerate(zip(LEN_A.tolist(), LEN_KNOWN.tolist())):
    np.testing.assert_array_equal(idx[i, n:], 0)
    np.testing.assert_array_equal(dist[i, n:], np.inf)
    np.testing.assert_array_equal(out[i, n:], 0.0)
    np.testing.assert_array_equal(gu[i, n:], 0.0)
    np.testing.assert_array_equal(gk[i, m:], 0.0)
    np.testing.assert_array_equal(gf[i, m:], 0.0)
    if not (n and m):
      np.testing.assert_array_equal(out[i], 0.0)
      continue

    def one(u, k, f):
      d, j = three_nn(u, k, impl=impl)
      return d, j, three_interpolate(f, j, inverse_distance_weights(d), impl=impl)

    want = [np.asarray(x) for x in one(unknown[i, :n], known[i, :m], feats[i, :m])]
    np.testing.assert_array_equal(idx[i, :n], want[1])
    np.testing.assert_allclose(dist[i, :n], want[0], rtol=2.5e-7)
    np.testing.assert_allclose(out[i, :n], want[2], rtol=1e-5, atol=1e-6)
    wu, wk, wf = jax.grad(lambda u, k, f: jnp.sum(jnp.sin(one(u, k, f)[2])), (0, 1, 2))(
        unknown[i, :n], known[i, :m], feats[i, :m])
    np.testing.assert_allclose(gu[i, :n], np.asarray(wu), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gk[i, :m], np.asarray(wk), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gf[i, :m], np.asarray(wf), rtol=1e-5, atol=1e-6)


def test_inverse_distance_weights_of_a_row_without_neighbours_is_zero():
  d = jnp.array([[0.5, 1.0, jnp.inf], [jnp.inf, jnp.inf, jnp.inf]], jnp.float32)
  w = np.asarray(inverse_distance_weights(d))
  np.testing.assert_allclose(w[0], [2 / 3, 1 / 3, 0], rtol=1e-6)
  np.testing.assert_array_equal(w[1], 0.0)
  g = np.asarray(jax.grad(lambda d: jnp.sum(inverse_distance_weights(d) * jnp.arange(3.0)))(d))
  assert np.isfinite(g).all() and (g[1] == 0).all()


# One op of each kind through shard_map with its lengths sharded like the points (8 fake CPU devices, 2
# examples each): value (and gradient) equal to the unsharded call.
_SHARDED = 16
_SHARD_MAP_CASES = {
    "chamfer_distance": (lambda a, b, la, lb: chamfer_distance(a, b, lengths_a=la, lengths_b=lb, reduction="none"), True),
    "knn": (lambda a, b, la, lb: jnp.sum(knn(a, b, 4, lengths_query=la, lengths_ref=lb)[0], axis=(-1, -2)), True),
    "three_nn": (lambda a, b, la, lb: jnp.sum(jnp.where(jnp.isinf(d := three_nn(a, b, lengths_unknown=la,
                                                                                lengths_known=lb)[0]), 0, d),
                                              axis=(-1, -2)), True),
    "ball_query": (lambda a, b, la, lb: jnp.sum(ball_query(b, a, 0.3, 8, return_dists=True, lengths_xyz=lb,
                                                           lengths_new_xyz=la)[2], axis=(-1, -2)), True),
    "farthest_point_sample": (lambda a, b, la, lb: farthest_point_sample(a, 8, lengths=la), False),
}


@pytest.mark.parametrize("name", sorted(_SHARD_MAP_CASES))
def test_shard_map_with_lengths_matches_single_device(name):
  fn, differentiable = _SHARD_MAP_CASES[name]
  rng = np.random.default_rng(10)
  a = rng.random((_SHARDED, 24, 3), dtype=np.float32)
  b = rng.random((_SHARDED, 20, 3), dtype=np.float32)
  la = rng.integers(0, 25, _SHARDED).astype(np.int32)
  lb = rng.integers(1, 21, _SHARDED).astype(np.int32)
  a[np.arange(24) >= la[:, None]] = np.nan
  b[np.arange(20) >= lb[:, None]] = np.nan
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharded = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  np.testing.assert_allclose(np.asarray(jax.jit(sharded)(a, b, la, lb)), np.asarray(jax.jit(fn)(a, b, la, lb)),
                             rtol=1e-6)
  if differentiable:
    grad = lambda f: jax.jit(jax.grad(lambda x, y: jnp.mean(f(x, y, la, lb)), (0, 1)))  # noqa: E731
    for g, w in zip(grad(sharded)(a, b), grad(fn)(a, b)):
      assert np.isfinite(np.asarray(g)).all()
      np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(_SHARD_MAP_CASES))
def test_vmap_with_lengths_matches_the_batched_call(name):
  """vmap over the batch (lengths mapped too) gives the batched call's result: one more batch dim."""
  fn, _ = _SHARD_MAP_CASES[name]
  rng = np.random.default_rng(11)
  a = rng.random((3, 2, 24, 3), dtype=np.float32)
  b = rng.random((3, 2, 20, 3), dtype=np.float32)
  la = rng.integers(0, 25, (3, 2)).astype(np.int32)
  lb = rng.integers(1, 21, (3, 2)).astype(np.int32)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(fn))(a, b, la, lb)), np.asarray(fn(a, b, la, lb)),
                             rtol=1e-6)


def test_lengths_with_bfloat16_inputs_equal_the_float32_call():
  """Lengths compose with the dtype policy: bf16 points give the float32 call's indices, bf16 distances."""
  a, b = _padded(12)
  a16, b16 = jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)
  a32, b32 = np.asarray(a16, np.float32), np.asarray(b16, np.float32)  # the same values
  np.testing.assert_array_equal(np.asarray(farthest_point_sample(a16, 20, lengths=LEN_A)),
                                np.asarray(farthest_point_sample(a32, 20, lengths=LEN_A)))
  got = ball_query(a16, b16, 0.3, 6, return_dists=True, lengths_xyz=LEN_A, lengths_new_xyz=LEN_B)
  want = ball_query(a32, b32, 0.3, 6, return_dists=True, lengths_xyz=LEN_A, lengths_new_xyz=LEN_B)
  assert got[2].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  np.testing.assert_array_equal(np.asarray(got[2], np.float32), np.asarray(want[2].astype(jnp.bfloat16), np.float32))
  got = three_nn(b16, a16, lengths_unknown=LEN_B, lengths_known=LEN_A)
  want = three_nn(b32, a32, lengths_unknown=LEN_B, lengths_known=LEN_A)
  assert got[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
