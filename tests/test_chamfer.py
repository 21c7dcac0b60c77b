"""nn_distance / chamfer_distance (ffi and jnp) against the numpy reference in xla_ops/reference/chamfer.py.

Sizes are chosen to hit both CPU paths: brute force for N * M <= 128 * 128, the k-d tree above.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import chamfer_distance, nn_distance
from xla_ops._ffi import batched_call
from xla_ops.reference import chamfer as ref

IMPLS = ("ffi", "jnp")


def _uniform(rng, shape):
  return rng.random(shape, dtype=np.float32)


def _sphere(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clusters(rng, shape):
  """Dense Gaussian blobs with very different scales (unbalanced k-d tree boxes)."""
  centers = rng.random(shape[:-2] + (4, 3)) * 10
  which = rng.integers(0, 4, shape[:-1])
  scale = np.array([1e-3, 1e-2, 1e-1, 1.0])[which][..., None]
  pts = np.take_along_axis(centers, which[..., None].repeat(3, -1), axis=-2) + scale * rng.standard_normal(shape)
  return pts.astype(np.float32)


def _raw_call(a, b):
  """The custom call's own four outputs (nn_distance recomputes the distances in jnp)."""
  n, m = a.shape[-2], b.shape[-2]
  return batched_call("xla_ops_nn_distance", (jnp.asarray(a), jnp.asarray(b)), core_ndims=(2, 2),
                      out_core=(((n,), jnp.float32), ((n,), jnp.int32), ((m,), jnp.float32), ((m,), jnp.int32)))


def _assert_matches_reference(a, b, impl, *, distances=True):
  want = ref.nn_distance(a, b)
  got = jax.jit(lambda a, b: nn_distance(a, b, impl=impl))(a, b)
  np.testing.assert_array_equal(np.asarray(got[1]), want[1])
  np.testing.assert_array_equal(np.asarray(got[3]), want[3])
  if distances:
    np.testing.assert_allclose(np.asarray(got[0]), want[0], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(np.asarray(got[2]), want[2], rtol=1e-6, atol=1e-12)
  if impl == "ffi":  # the handler's distances use the reference's exact float32 expression
    got = jax.jit(_raw_call)(a, b)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(np.asarray(g), w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m", [(60, 90), (700, 500)])  # brute force, tree
@pytest.mark.parametrize("cloud", [_uniform, _sphere, _clusters])
def test_nn_distance_matches_reference(impl, n, m, cloud):
  rng = np.random.default_rng(n + m)
  _assert_matches_reference(cloud(rng, (2, n, 3)), cloud(rng, (2, m, 3)), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", [50, 700])
def test_ties_go_to_the_lowest_index(impl, n):
  # Integer coordinates on a 4^3 grid: exact float distances, many duplicate points and equidistant ones.
  rng = np.random.default_rng(1)
  a = rng.integers(0, 4, (2, n, 3)).astype(np.float32)
  b = rng.integers(0, 4, (2, n + 13, 3)).astype(np.float32)
  _assert_matches_reference(a, b, impl)
  # The reference's rule, checked directly: the index is the first one at the minimum distance.
  _, idx_ab, _, _ = ref.nn_distance(a, b)
  d = ((a[:, :, None] - b[:, None]) ** 2).sum(-1)
  first_min = (d == d.min(-1, keepdims=True)).argmax(-1)
  np.testing.assert_array_equal(idx_ab, first_min)


@pytest.mark.parametrize("n", [100, 3000])
def test_all_points_identical(n):
  a = np.full((n, 3), 0.25, np.float32)
  _, idx_ab, dist_ba, idx_ba = jax.jit(nn_distance)(a, a + 0)
  np.testing.assert_array_equal(np.asarray(idx_ab), np.zeros(n))
  np.testing.assert_array_equal(np.asarray(idx_ba), np.zeros(n))
  np.testing.assert_array_equal(np.asarray(dist_ba), np.zeros(n))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m", [(1, 1), (1, 3000), (3000, 1), (2, 3)])
def test_tiny_sets(impl, n, m):
  rng = np.random.default_rng(n * 7 + m)
  _assert_matches_reference(_uniform(rng, (3, n, 3)), _uniform(rng, (3, m, 3)), impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch", [(), (2, 3), (0,)])
def test_batch_shapes(impl, batch):
  rng = np.random.default_rng(2)
  a, b = _uniform(rng, batch + (200, 3)), _uniform(rng, batch + (150, 3))
  got = jax.jit(lambda a, b: nn_distance(a, b, impl=impl))(a, b)
  assert [g.shape for g in got] == [batch + (200,)] * 2 + [batch + (150,)] * 2
  assert [g.dtype for g in got] == [jnp.float32, jnp.int32] * 2
  if np.prod(batch) > 0:
    _assert_matches_reference(a, b, impl)


@pytest.mark.parametrize("n", [40, 600])
def test_non_finite_inputs(n):
  """NaN/Inf never crash; semantics as documented in xla_ops/chamfer.py (and implemented by the reference)."""
  rng = np.random.default_rng(3)
  a, b = _uniform(rng, (3, n, 3)), _uniform(rng, (3, n + 1, 3))
  a[0, 5, 1] = np.nan  # a NaN query
  a[0, 7] = np.inf  # an Inf query
  b[0, ::3, 2] = np.nan  # a third of the reference set is NaN: never the nearest
  b[0, 1::3, 0] = -np.inf
  b[1, :, 0] = np.nan  # an all-NaN reference set: every query of a[1] gets index 0
  a[2, 3] = np.float32(3e38)  # finite, but every distance overflows to +inf
  _assert_matches_reference(a, b, "ffi", distances=False)  # (the handler's own distances are compared)
  dist_ab, idx_ab, dist_ba, idx_ba = jax.device_get(jax.jit(_raw_call)(a, b))
  finite_queries = np.ones(n, bool)
  finite_queries[[5, 7]] = False
  assert (idx_ab[0, ~finite_queries] == 0).all() and np.isinf(dist_ab[0, ~finite_queries]).all()
  assert (idx_ab[0, finite_queries] % 3 == 2).all()  # only b[0, 2::3] is finite
  assert (idx_ab[1] == 0).all() and np.isinf(dist_ab[1]).all()
  assert idx_ab[2, 3] == 0 and np.isinf(dist_ab[2, 3]) and np.isfinite(np.delete(dist_ab[2], 3)).all()
  assert (idx_ba[0, 0::3] == 0).all() and (idx_ba[0, 1::3] == 0).all() and (idx_ba[1] == 0).all()
  assert np.isinf(dist_ba[1]).all()
  d_ab, _, _, _ = jax.jit(nn_distance)(a, b)
  assert np.isnan(d_ab[0, 5]) and np.isnan(d_ab[1]).all() and np.isfinite(d_ab[0, finite_queries]).all()


def test_jnp_and_ffi_agree_on_larger_clouds():
  rng = np.random.default_rng(4)
  a, b = _sphere(rng, (2, 1200, 3)), _uniform(rng, (2, 1000, 3))
  f = jax.jit(nn_distance, static_argnames="impl")
  for x, y in zip(f(a, b, impl="ffi"), f(a, b, impl="jnp")):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m", [(30, 20), (400, 300)])
def test_chamfer_gradients(impl, n, m):
  rng = np.random.default_rng(5)
  a, b = _uniform(rng, (2, n, 3)), _uniform(rng, (2, m, 3))
  w_ab, w_ba = 0.55, 1.5
  loss = lambda a, b: chamfer_distance(a, b, weight_ab=w_ab, weight_ba=w_ba, impl=impl)
  value, (ga, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(a, b)
  np.testing.assert_allclose(value, ref.chamfer_distance(a, b, w_ab, w_ba), rtol=1e-5)
  want_a, want_b = ref.chamfer_distance_grad(a, b, w_ab, w_ba)
  np.testing.assert_allclose(ga, want_a, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(gb, want_b, rtol=1e-4, atol=1e-9)


def test_reference_gradient_matches_finite_differences():
  """Checks the reference gradient itself: central differences of the float64 Chamfer (pairs fixed)."""
  rng = np.random.default_rng(6)
  a, b = _uniform(rng, (2, 12, 3)), _uniform(rng, (2, 9, 3))
  ga, gb = ref.chamfer_distance_grad(a, b, 0.7, 1.3)
  _, idx_ab, _, idx_ba = ref.nn_distance(a, b)

  def cd64(a, b):  # the same nearest pairs, float64 (a small step does not change them on this data)
    d_ab = ((a - np.take_along_axis(b, idx_ab[..., None], -2)) ** 2).sum(-1)
    d_ba = ((b - np.take_along_axis(a, idx_ba[..., None], -2)) ** 2).sum(-1)
    return (0.7 * d_ab.mean(-1) + 1.3 * d_ba.mean(-1)).mean()

  a64, b64, eps = a.astype(np.float64), b.astype(np.float64), 1e-6
  for x, g, other_first in ((a64, ga, False), (b64, gb, True)):
    fd = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
      hi, lo = x.copy(), x.copy()
      hi[i] += eps
      lo[i] -= eps
      fd[i] = ((cd64(a64, hi) - cd64(a64, lo)) if other_first else (cd64(hi, b64) - cd64(lo, b64))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("impl", IMPLS)
def test_chamfer_weights_and_reduction(impl):
  rng = np.random.default_rng(7)
  a, b = _uniform(rng, (2, 3, 64, 3)), _uniform(rng, (2, 3, 80, 3))
  cd = jax.jit(chamfer_distance, static_argnames=("weight_ab", "weight_ba", "reduction", "impl"))
  per_example = cd(a, b, weight_ab=2.0, weight_ba=0.25, reduction="none", impl=impl)
  assert per_example.shape == (2, 3)
  np.testing.assert_allclose(per_example, ref.chamfer_distance(a, b, 2.0, 0.25, "none"), rtol=1e-5)
  mean = cd(a, b, weight_ab=2.0, weight_ba=0.25, impl=impl)
  assert mean.shape == ()
  np.testing.assert_allclose(mean, np.mean(per_example), rtol=1e-6)
  d_ab, _, d_ba, _ = ref.nn_distance(a, b)
  np.testing.assert_allclose(cd(a, b, weight_ab=1.0, weight_ba=0.0, impl=impl), d_ab.mean(), rtol=1e-5)
  np.testing.assert_allclose(cd(a, b, weight_ab=0.0, weight_ba=1.0, impl=impl), d_ba.mean(), rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("a_shape,b_shape,dtype,match", [
    ((10, 2), (10, 3), np.float32, "a must have shape"),
    ((10, 3), (10, 4), np.float32, "b must have shape"),
    ((10,), (10, 3), np.float32, "a must have shape"),
    ((10, 3), (10, 3), np.float64, "a must be float32"),
    ((2, 10, 3), (3, 10, 3), np.float32, "same batch shape"),
    ((0, 3), (10, 3), np.float32, "a must have at least 1 point"),
    ((10, 3), (2, 0, 3), np.float32, "b must have at least 1 point"),
])
def test_bad_inputs(impl, a_shape, b_shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    nn_distance(np.zeros(a_shape, dtype), np.zeros(b_shape, np.float32), impl=impl)


def test_bad_arguments():
  a = jnp.zeros((10, 3))
  with pytest.raises(ValueError, match="impl must be one of"):
    nn_distance(a, a, impl="cuda")
  with pytest.raises(ValueError, match="reduction must be"):
    chamfer_distance(a, a, reduction="max")
  with pytest.raises(TypeError, match="a must be an array"):
    nn_distance([[0.0, 0.0, 0.0]], a)


def test_handler_rejects_bad_shapes():
  """The C++ handler checks shapes again (the wrapper is bypassed here) and returns an FFI error."""
  a = jnp.zeros((4, 2))
  call = jax.ffi.ffi_call("xla_ops_nn_distance", (jax.ShapeDtypeStruct((4,), jnp.float32),
                                                  jax.ShapeDtypeStruct((4,), jnp.int32)) * 2)
  with pytest.raises(jax.errors.JaxRuntimeError, match=r"xla_ops_nn_distance: a must have shape \[\.\.\., N, 3\], got \[4, 2\]"):
    jax.block_until_ready(jax.jit(call)(a, a))
  call = jax.ffi.ffi_call("xla_ops_nn_distance", (jax.ShapeDtypeStruct((2, 4), jnp.float32),
                                                  jax.ShapeDtypeStruct((2, 4), jnp.int32)) * 2)
  with pytest.raises(jax.errors.JaxRuntimeError, match="batch mismatch"):
    jax.block_until_ready(jax.jit(call)(jnp.zeros((2, 4, 3)), jnp.zeros((3, 4, 3))))
