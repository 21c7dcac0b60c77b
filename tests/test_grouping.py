"""ball_query, group_points and knn (ffi and jnp) against the numpy references in xla_ops/reference/grouping.py."""
import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import ball_query, group_points, knn
from xla_ops._ffi import batched_call
from xla_ops.reference import grouping as ref

IMPLS = ("ffi", "jnp")
# Jitted entry points (eager jnp versions would compile op by op).
ball_query_jit = jax.jit(ball_query, static_argnums=(2, 3), static_argnames=("impl",))
knn_jit = jax.jit(knn, static_argnums=(2,), static_argnames=("impl",))


def _points(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).random(shape, dtype=np.float32) * scale).astype(np.float32)


@pytest.fixture
def x64():
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)


# ---- ball_query -------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,n,m,radius,nsample", [
    ((2,), 200, 30, 0.2, 8),    # some balls full, some partly filled
    ((), 50, 7, 0.05, 4),       # mostly sparse or empty balls
    ((2, 2), 40, 5, 2.0, 64),   # every point inside, nsample > N
    ((1,), 100, 20, 0.3, 1),
])
def test_ball_query_matches_reference(impl, batch, n, m, radius, nsample):
  xyz, new_xyz = _points(n, batch + (n, 3)), _points(m, batch + (m, 3))
  idx, count = jax.jit(lambda a, b: ball_query(a, b, radius, nsample, impl=impl))(xyz, new_xyz)
  want_idx, want_count = ref.ball_query(xyz, new_xyz, radius, nsample)
  assert idx.shape == batch + (m, nsample) and count.shape == batch + (m,)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(count), want_count)


@pytest.mark.parametrize("impl", IMPLS)
def test_ball_query_padding_and_empty_balls(impl):
  xyz = np.array([[5, 5, 5], [0, 0, 0], [9, 9, 9], [0.1, 0, 0], [0, 0.1, 0]], np.float32)
  new_xyz = np.array([[0, 0, 0], [-3, -3, -3], [9, 9, 9.05]], np.float32)
  idx, count = ball_query_jit(xyz, new_xyz, 0.5, 6, impl=impl)
  np.testing.assert_array_equal(np.asarray(idx), [[1, 3, 4, 1, 1, 1], [0] * 6, [2] * 6])
  np.testing.assert_array_equal(np.asarray(count), [3, 0, 1])
  # Strictly inside: a point exactly at distance radius is out.
  idx, count = ball_query_jit(np.array([[1, 0, 0]], np.float32), np.zeros((1, 3), np.float32), 1.0, 2, impl=impl)
  np.testing.assert_array_equal(np.asarray(count), [0])


@pytest.mark.parametrize("impl", IMPLS)
def test_ball_query_nan(impl):
  xyz = _points(1, (30, 3))
  xyz[4] = np.nan
  new_xyz = _points(2, (6, 3))
  new_xyz[0] = np.nan  # a NaN query has an empty ball
  idx, count = ball_query_jit(xyz, new_xyz, 0.5, 5, impl=impl)
  want_idx, want_count = ref.ball_query(xyz, new_xyz, 0.5, 5)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(count), want_count)
  assert want_count[0] == 0 and 4 not in want_idx


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_queries(impl):
  xyz = _points(0, (2, 10, 3))
  idx, count = ball_query_jit(xyz, xyz[:, :0], 0.3, 4, impl=impl)
  dist, nn = knn_jit(xyz[:, :0], xyz, 3, impl=impl)
  assert idx.shape == (2, 0, 4) and count.shape == (2, 0) and dist.shape == nn.shape == (2, 0, 3)


# ---- group_points -----------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,n,c,m,k", [((2,), 30, 3, 10, 4), ((), 20, 67, 5, 3), ((2, 3), 9, 16, 4, 9)])
def test_group_points_value_and_gradient(impl, batch, n, c, m, k):
  rng = np.random.default_rng(n * c)
  points = rng.standard_normal(batch + (n, c)).astype(np.float32)
  idx = rng.integers(0, n, batch + (m, k)).astype(np.int32)
  idx[..., 0, :] = 0  # repeated indices: several contributions to one gradient row
  out = jax.jit(lambda p, i: group_points(p, i, impl=impl))(points, idx)
  np.testing.assert_array_equal(np.asarray(out), ref.group_points(points, idx))
  cot = rng.standard_normal(out.shape).astype(np.float32)
  grad = jax.grad(lambda p: jnp.sum(group_points(p, idx, impl=impl) * cot))(points)
  np.testing.assert_allclose(np.asarray(grad), ref.group_points_grad(cot, idx, n), rtol=1e-5, atol=1e-5)


def test_group_points_grad_checks_and_vmap():
  rng = np.random.default_rng(0)
  points = rng.standard_normal((3, 12, 5)).astype(np.float32)
  idx = rng.integers(0, 12, (3, 6, 4)).astype(np.int32)
  f = lambda p, i: jnp.sum(jnp.sin(group_points(p, i)))
  jax.test_util.check_grads(lambda p: f(p, idx), (points,), order=1, modes=["rev"], eps=1e-2)
  # vmap with an unbatched idx (in_axes None) and of the gradient.
  got = jax.vmap(group_points, in_axes=(0, None))(points, idx[0])
  np.testing.assert_array_equal(np.asarray(got), ref.group_points(points, np.broadcast_to(idx[0], idx.shape)))
  g_vmap = jax.vmap(jax.grad(f), in_axes=(0, 0))(points, idx)
  np.testing.assert_allclose(np.asarray(g_vmap), np.asarray(jax.grad(f)(points, idx)), rtol=1e-6)


@pytest.mark.cpu  # CPU handler's ordered sums; the CUDA scatter-add uses atomics (tests/test_cuda.py)
def test_group_points_grad_is_deterministic_and_batch_independent():
  rng = np.random.default_rng(1)
  points = rng.standard_normal((16, 50, 40)).astype(np.float32)
  idx = rng.integers(0, 5, (16, 64, 16)).astype(np.int32)  # heavy index collisions
  cot = rng.standard_normal((16, 64, 16, 40)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(group_points(p, idx) * cot)))
  whole = np.asarray(grad(points))
  np.testing.assert_array_equal(np.asarray(grad(points)), whole)  # bitwise repeatable
  for b in (0, 7, 15):  # one example alone (one task) == inside the big batch (many tasks)
    one = jax.grad(lambda p: jnp.sum(group_points(p, idx[b]) * cot[b]))(points[b])
    np.testing.assert_array_equal(np.asarray(one), whole[b])


@pytest.mark.cpu  # INVALID_ARGUMENT for out-of-range indices is the CPU's; the GPU reads zeros (tests/test_cuda.py)
def test_group_points_out_of_range_index_errors_on_cpu():
  points = _points(0, (2, 10, 3))
  idx = np.zeros((2, 4, 2), np.int32)
  idx[1, 3, 1] = 10
  with pytest.raises(Exception, match="outside"):
    jax.block_until_ready(group_points(points, idx))
  idx[1, 3, 1] = -1
  with pytest.raises(Exception, match="outside"):
    jax.block_until_ready(jax.grad(lambda p: jnp.sum(group_points(p, idx)))(points))
  # impl="jnp" reads zeros for them.
  np.testing.assert_array_equal(np.asarray(group_points(points, idx, impl="jnp"))[1, 3, 1], 0.0)


# ---- knn ----------------------------------------------------------------------------------------------


def _assert_knn_matches(query, refs, k, impl):
  dist, idx = jax.jit(lambda q, r: knn(q, r, k, impl=impl))(query, refs)
  want_dist, want_idx = ref.knn(query, refs, k)
  assert idx.dtype == jnp.int32 and dist.shape == idx.shape == query.shape[:-1] + (k,)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_allclose(np.asarray(dist), want_dist, rtol=2e-5, atol=1e-6)
  assert (np.diff(np.asarray(dist), axis=-1) >= 0).all()  # the distances the ranking used


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,m,n,c,k", [
    ((2,), 37, 300, 3, 20),    # direct path (C < 4)
    ((), 20, 600, 64, 20),     # filter-and-refine path, several ref chunks
    ((2, 2), 9, 50, 5, 7),
    ((1,), 17, 33, 128, 33),   # k == N
    ((3,), 5, 20, 1, 1),
])
def test_knn_matches_reference(impl, batch, m, n, c, k):
  _assert_knn_matches(_points(m, batch + (m, c)), _points(n, batch + (n, c)), k, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_far_from_origin_and_self(impl):
  # Large norms relative to the distances: the approximate filter must fall back to exact distances.
  pts = _points(3, (2, 150, 32)) + np.float32(300.0)
  _assert_knn_matches(pts, pts, 10, impl)
  _, idx = knn_jit(pts, pts, 1, impl=impl)
  np.testing.assert_array_equal(np.asarray(idx)[..., 0], np.broadcast_to(np.arange(150), (2, 150)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [3, 16])
def test_knn_ties_go_to_the_lowest_index(impl, c):
  base = _points(4, (10, c))
  refs = np.concatenate([base, base, base])  # every point three times
  dist, idx = knn_jit(base, refs, 5, impl=impl)
  idx = np.asarray(idx)
  np.testing.assert_array_equal(idx[:, :3], np.arange(10)[:, None] + [0, 10, 20])
  np.testing.assert_array_equal(np.asarray(dist)[:, :3], 0.0)
  np.testing.assert_array_equal(idx, ref.knn(base, refs, 5)[1])
  # All refs identical: 0..k-1.
  same = np.zeros((40, c), np.float32)
  np.testing.assert_array_equal(np.asarray(knn_jit(base, same, 6, impl=impl)[1]),
                                np.broadcast_to(np.arange(6), (10, 6)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("c", [3, 24])
def test_knn_nan(impl, c):
  query, refs = _points(5, (6, c)), _points(6, (30, c))
  refs[2, 0] = np.nan
  refs[7, 1] = np.nan
  query[1, 0] = np.nan  # every distance NaN: ranked +inf, lowest indices first
  dist, idx = knn_jit(query, refs, 30, impl=impl)
  want_dist, want_idx = ref.knn(query, refs, 30)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_array_equal(np.asarray(idx)[1], np.arange(30))
  assert (np.asarray(idx)[[0, 2, 3, 4, 5], -2:] == [2, 7]).all()  # NaN candidates rank last
  # NaN distances are reported as +inf, the others as in the reference.
  np.testing.assert_allclose(np.asarray(dist), np.where(np.isnan(want_dist), np.inf, want_dist), rtol=2e-5)
  assert np.isposinf(np.asarray(dist)[1]).all() and np.isposinf(np.asarray(dist)[0, -2:]).all()
  # Their gradient is NaN; neighbourhoods without NaN points keep finite gradients.
  grad = lambda sl: jax.grad(lambda q: jnp.sum(knn(q, refs, 30, impl=impl)[0][sl]))(query)
  assert np.isnan(np.asarray(grad((0, -1)))[0]).any() and np.isnan(np.asarray(grad((1, 0)))[1]).any()
  finite = jax.grad(lambda q, r: jnp.sum(knn(q, r, 5, impl=impl)[0]), argnums=(0, 1))(query[[0, 2, 3]], refs)
  assert all(np.isfinite(np.asarray(g)).all() for g in finite)


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_distance_gradients(impl):
  rng = np.random.default_rng(7)
  query = rng.standard_normal((2, 6, 5)).astype(np.float32)
  refs = rng.standard_normal((2, 15, 5)).astype(np.float32)
  f = lambda q, r: jnp.sum(knn(q, r, 4, impl=impl)[0] * jnp.arange(4.0))
  # Against numpy: d/dq sum_j w_j |q - r_j|^2 = 2 sum_j w_j (q - r_j); r_j gets the negative (scatter-add).
  _, idx = ref.knn(query, refs, 4)
  gq, gr = jax.jit(jax.grad(f, argnums=(0, 1)))(query, refs)
  gathered = ref.group_points(refs, idx)
  diff = 2 * np.arange(4.0)[:, None] * (query[:, :, None, :] - gathered)
  np.testing.assert_allclose(np.asarray(gq), diff.sum(-2), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gr), -ref.group_points_grad(diff, idx, 15), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_knn_distance_jvp_and_finite_differences(impl):
  rng = np.random.default_rng(12)
  query = rng.standard_normal((2, 5, 6)).astype(np.float32)
  refs = rng.standard_normal((2, 12, 6)).astype(np.float32)
  _, idx = ref.knn(query, refs, 3)
  dq = rng.standard_normal(query.shape).astype(np.float32)
  dr = rng.standard_normal(refs.shape).astype(np.float32)
  # Forward mode against numpy: d|q - r_j|^2 = 2 (q - r_j) . (dq - dr_j).
  _, dist_dot = jax.jvp(lambda q, r: knn(q, r, 3, impl=impl)[0], (query, refs), (dq, dr))
  want = 2 * np.sum((query[:, :, None] - ref.group_points(refs, idx)) *
                    (dq[:, :, None] - ref.group_points(dr, idx)), axis=-1)
  np.testing.assert_allclose(np.asarray(dist_dot), want, rtol=1e-5, atol=1e-5)
  # Both modes against finite differences (steps small enough not to change the neighbours).
  f = lambda q, r: jnp.sin(knn(q, r, 3, impl=impl)[0])
  jax.test_util.check_grads(f, (query, refs), order=1, modes=["fwd", "rev"], eps=1e-3)


def test_knn_without_differentiation_has_no_gather():
  """Plain jit returns the custom call's own distances: the gather exists only in the derivative."""
  query, refs = _points(13, (2, 16, 8)), _points(14, (2, 40, 8))
  plain = jax.jit(lambda q, r: knn(q, r, 5)).lower(query, refs).as_text()
  assert "xla_ops_knn" in plain and "gather" not in plain
  grad = jax.jit(jax.grad(lambda q, r: jnp.sum(knn(q, r, 5)[0]), argnums=(0, 1))).lower(query, refs).as_text()
  assert "gather" in grad


def test_knn_vmap_and_batch_equivalence():
  query, refs = _points(8, (5, 3, 40, 8)), _points(9, (5, 3, 60, 8))
  f = lambda q, r: knn(q, r, 6)[1]
  whole = np.asarray(jax.jit(f)(query, refs))
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f))(query, refs)), whole)
  np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(f, in_axes=(0, None)))(query, refs[0])),
                                np.asarray(f(query, np.broadcast_to(refs[0], refs.shape))))
  # One example alone (one task) == inside the big batch (many tasks).
  np.testing.assert_array_equal(np.asarray(f(query[4, 2], refs[4, 2])), whole[4, 2])


def test_knn_custom_call_distances_are_exact_float32():
  """The handler's own dist output: float32 sums of squared differences, ascending."""
  query, refs = _points(10, (2, 30, 20)), _points(11, (2, 90, 20))
  dist, idx = batched_call("xla_ops_knn", (jnp.asarray(query), jnp.asarray(refs)), core_ndims=(2, 2),
                           out_core=(((30, 8), jnp.float32), ((30, 8), jnp.int32)), k=np.int32(8))
  want_dist, want_idx = ref.knn(query, refs, 8)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  np.testing.assert_allclose(np.asarray(dist), want_dist, rtol=1e-6)
  assert (np.diff(np.asarray(dist), axis=-1) >= 0).all()


# ---- argument checks ----------------------------------------------------------------------------------


P3 = np.zeros((2, 10, 3), np.float32)
Q3 = np.zeros((2, 4, 3), np.float32)
IDX = np.full((2, 4, 5), 4, np.int32)


@pytest.mark.cpu  # INVALID_ARGUMENT for out-of-range indices is the CPU's; the GPU reads zeros (tests/test_cuda.py)
@pytest.mark.parametrize("target,args,out_core,attrs,match", [
    ("xla_ops_knn", (Q3, P3), (((4, 11), jnp.float32), ((4, 11), jnp.int32)), {"k": np.int32(11)}, "k must be in"),
    ("xla_ops_ball_query", (P3, Q3), (((4, 2), jnp.int32), ((4,), jnp.int32)),
     {"radius": np.float32(-1), "nsample": np.int32(2)}, "radius must be a finite number > 0"),
    ("xla_ops_group_points_grad", (np.zeros((2, 4, 5, 3), np.float32), IDX), (((3, 3), jnp.float32),),
     {"npoints": np.int32(3)}, "outside"),
])
def test_handlers_check_their_arguments(target, args, out_core, attrs, match):
  """The C++ backstop behind the Python checks: an INVALID_ARGUMENT error, not a crash."""
  with pytest.raises(Exception, match=match):
    jax.block_until_ready(batched_call(target, [jnp.asarray(a) for a in args], core_ndims=[a.ndim - 1 for a in args],
                                       out_core=out_core, **attrs))


@pytest.mark.parametrize("bad,match", [
    (lambda: ball_query(P3[0, 0], Q3, 0.1, 4), "xyz must have shape"),
    (lambda: ball_query(P3[..., :2], Q3, 0.1, 4), "xyz must have shape"),
    (lambda: ball_query(P3, Q3[..., :2], 0.1, 4), "new_xyz must have shape"),
    (lambda: ball_query(P3, Q3[:1], 0.1, 4), "same batch shape"),
    (lambda: ball_query(P3.astype(np.float64), Q3, 0.1, 4), "xyz must be float32"),
    (lambda: ball_query(P3, Q3, 0.0, 4), "radius must be a finite number > 0"),
    (lambda: ball_query(P3, Q3, -1.0, 4), "radius must be a finite number > 0"),
    (lambda: ball_query(P3, Q3, float("nan"), 4), "radius must be a finite number > 0"),
    (lambda: ball_query(P3, Q3, 0.1, 0), "nsample must be >= 1"),
    (lambda: group_points(P3[0, 0], IDX), "points must have shape"),
    (lambda: group_points(P3, IDX[0, 0]), "idx must be an int32 array of rank >= 2"),
    (lambda: group_points(P3, IDX.astype(np.int64)), "idx must be int32"),
    (lambda: group_points(P3, IDX.astype(np.float32)), "idx must be int32"),
    (lambda: group_points(P3.astype(np.int32), IDX), "points must be float32"),
    (lambda: group_points(P3, IDX[:1]), "same batch shape"),
    (lambda: knn(Q3, P3, 11), "k must be <="),
    (lambda: knn(Q3, P3, 0), "k must be >= 1"),
    (lambda: knn(Q3, P3[..., :2], 2), "same channel count"),
    (lambda: knn(Q3[0], P3, 2), "same batch shape"),
    (lambda: knn(Q3.astype(np.float64), P3, 2), "query must be float32"),
    (lambda: knn(Q3, P3[0, 0], 2), "ref must have shape"),
    (lambda: knn(Q3, P3, 2, impl="numpy"), "impl must be"),
])
def test_bad_inputs_raise(x64, bad, match):
  with pytest.raises(ValueError, match=match):
    bad()


def test_non_int_arguments_raise_type_error():
  with pytest.raises(TypeError, match="nsample"):
    ball_query(P3, Q3, 0.1, 4.0)
  with pytest.raises(TypeError, match="radius"):
    ball_query(P3, Q3, jnp.float32(0.1), 4)
  with pytest.raises(TypeError, match="k must be a Python int"):
    knn(Q3, P3, np.float32(3))
