"""three_nn / three_interpolate / inverse_distance_weights against the numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xla_ops
from xla_ops.reference import interpolation as ref

IMPLS = ("ffi", "jnp")


def _points(seed, shape):
  return np.random.default_rng(seed).random(shape, np.float32) - 0.5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n,m", [(50, 40), (7, 200), (30, 3)])
def test_three_nn_matches_reference(impl, n, m):
  unknown, known = _points(n, (2, n, 3)), _points(m + 1, (2, m, 3))
  dist, idx = xla_ops.three_nn(unknown, known, impl=impl)
  for i in range(2):
    want_d, want_i = ref.three_nn(unknown[i], known[i])
    np.testing.assert_array_equal(idx[i], want_i)  # random points: no ties
    np.testing.assert_allclose(dist[i], want_d, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("m", [1, 2])
def test_three_nn_fewer_than_three_known_points(impl, m):
  unknown, known = _points(0, (5, 3)), _points(1, (m, 3))
  dist, idx = xla_ops.three_nn(unknown, known, impl=impl)
  want_d, want_i = ref.three_nn(unknown, known)
  np.testing.assert_array_equal(idx, want_i)
  np.testing.assert_allclose(dist, want_d, rtol=1e-5)
  assert np.all(np.isinf(np.asarray(dist)[:, m:])) and np.all(np.asarray(idx)[:, m:] == 0)
  weights = np.asarray(xla_ops.inverse_distance_weights(dist))
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert np.all(weights[:, m:] == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_nn_ties_go_to_lowest_index(impl):
  known = np.array([[1, 0, 0], [0, 1, 0], [-1, 0, 0], [0, -1, 0], [0, 0, 1]], np.float32)
  dist, idx = xla_ops.three_nn(np.zeros((1, 3), np.float32), known, impl=impl)
  np.testing.assert_array_equal(idx, [[0, 1, 2]])
  np.testing.assert_allclose(dist, [[1, 1, 1]])


def test_three_nn_distance_gradient():
  unknown, known = _points(2, (6, 3)), _points(3, (9, 3))
  _, idx = xla_ops.three_nn(unknown, known)
  g_u, g_k = jax.grad(lambda u, k: jnp.sum(xla_ops.three_nn(u, k)[0]), argnums=(0, 1))(unknown, known)
  diff = unknown[:, None, :] - known[np.asarray(idx)]  # [n, 3, 3]
  np.testing.assert_allclose(g_u, 2 * diff.sum(1), rtol=1e-5, atol=1e-6)
  want_k = np.zeros_like(known)
  np.add.at(want_k, np.asarray(idx).reshape(-1), -2 * diff.reshape(-1, 3))
  np.testing.assert_allclose(g_k, want_k, rtol=1e-5, atol=1e-6)


def test_three_nn_nan_query_gets_index_zero():
  unknown, known = _points(4, (3, 3)), _points(5, (6, 3))
  unknown[1, 0] = np.nan
  dist, idx = xla_ops.three_nn(unknown, known)
  np.testing.assert_array_equal(np.asarray(idx)[1], [0, 0, 0])
  assert np.all(np.isnan(np.asarray(dist)[1]))
  np.testing.assert_array_equal(np.asarray(idx)[[0, 2]], ref.three_nn(unknown[[0, 2]], known)[1])


def _interp_inputs(seed, batch, n, m, c):
  rng = np.random.default_rng(seed)
  features = rng.standard_normal(batch + (m, c)).astype(np.float32)
  idx = rng.integers(0, m, batch + (n, 3)).astype(np.int32)
  weight = rng.random(batch + (n, 3)).astype(np.float32)
  return features, idx, weight


@pytest.mark.parametrize("impl", IMPLS)
def test_three_interpolate_and_gradients_match_reference(impl):
  features, idx, weight = _interp_inputs(0, (2,), 40, 25, 5)
  out = xla_ops.three_interpolate(features, idx, weight, impl=impl)
  grad_out = np.random.default_rng(1).standard_normal(out.shape).astype(np.float32)
  g_f, g_w = jax.grad(lambda f, w: jnp.sum(grad_out * xla_ops.three_interpolate(f, idx, w, impl=impl)),
                      argnums=(0, 1))(features, weight)
  for i in range(2):
    np.testing.assert_allclose(out[i], ref.three_interpolate(features[i], idx[i], weight[i]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_f[i], ref.three_interpolate_grad(grad_out[i], idx[i], weight[i], 25),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_w[i], ref.three_interpolate_weight_grad(grad_out[i], features[i], idx[i]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_three_interpolate_check_grads(impl):
  features, idx, weight = _interp_inputs(2, (), 6, 4, 3)
  check_grads(lambda f, w: xla_ops.three_interpolate(f, idx, w, impl=impl), (features, weight), order=1,
              modes=("rev",), atol=1e-2, rtol=1e-2)


@pytest.mark.cpu  # CPU handler's ordered sums; the CUDA scatter-add uses atomics (tests/test_cuda.py)
def test_three_interpolate_grad_is_deterministic_across_batching():
  """Many points scattering into few features: batched call == per-example calls, bit for bit."""
  features, idx, weight = _interp_inputs(3, (4,), 500, 7, 40)
  grad_out = jnp.ones((4, 500, 40), jnp.float32)
  fn = jax.grad(lambda f: jnp.sum(grad_out * xla_ops.three_interpolate(f, idx, weight)))
  batched = np.asarray(fn(features))
  for i in range(4):
    single = jax.grad(lambda f: jnp.sum(grad_out[i] * xla_ops.three_interpolate(f, idx[i], weight[i])))(features[i])
    np.testing.assert_array_equal(batched[i], single)


@pytest.mark.cpu  # INVALID_ARGUMENT is the CPU's; the GPU's out-of-range entries contribute zero (tests/test_cuda.py)
def test_three_interpolate_out_of_range_index():
  features, idx, weight = _interp_inputs(4, (), 5, 4, 2)
  idx[2, 1] = 4
  with pytest.raises(Exception, match="outside"):
    jax.block_until_ready(xla_ops.three_interpolate(features, idx, weight))
  out = np.asarray(xla_ops.three_interpolate(features, idx, weight, impl="jnp"))  # reads zeros
  idx_zero, w_zero = idx.copy(), weight.copy()
  w_zero[2, 1] = 0
  idx_zero[2, 1] = 0
  np.testing.assert_allclose(out, ref.three_interpolate(features, idx_zero, w_zero), rtol=1e-5, atol=1e-6)


def test_three_interpolate_propagates_nan():
  features, idx, weight = _interp_inputs(5, (), 4, 3, 2)
  idx[:] = [[0, 1, 1], [2, 2, 2], [0, 0, 1], [1, 2, 0]]
  features[2, 0] = np.nan
  out = np.asarray(xla_ops.three_interpolate(features, idx, weight))
  assert np.all(np.isnan(out[[1, 3], 0])) and np.all(np.isfinite(out[[0, 2]])) and np.all(np.isfinite(out[:, 1]))


def test_inverse_distance_weights():
  dist = np.array([[1.0, 2.0, 4.0], [0.0, 1.0, 1.0], [0.0, 0.0, np.inf]], np.float32)
  got = np.asarray(xla_ops.inverse_distance_weights(dist))
  np.testing.assert_allclose(got, ref.inverse_distance_weights(dist), rtol=1e-6)
  np.testing.assert_allclose(got[1], [1.0, 0.0, 0.0], atol=1e-9)  # a zero distance takes all the weight
  np.testing.assert_allclose(got[2], [0.5, 0.5, 0.0])


def test_interpolation_pipeline_jit_vmap():
  """three_nn -> weights -> three_interpolate under jit and vmap (also with an unbatched operand)."""
  unknown, known = _points(6, (3, 20, 3)), _points(7, (3, 12, 3))
  features = np.random.default_rng(8).standard_normal((3, 12, 4)).astype(np.float32)

  def interp(u, k, f):
    dist, idx = xla_ops.three_nn(u, k)
    return xla_ops.three_interpolate(f, idx, xla_ops.inverse_distance_weights(dist))

  def want(u, k, f):
    d, i = ref.three_nn(u, k)
    return ref.three_interpolate(f, i, ref.inverse_distance_weights(d))

  got = jax.jit(jax.vmap(interp))(unknown, known, features)
  for i in range(3):
    np.testing.assert_allclose(got[i], want(unknown[i], known[i], features[i]), rtol=1e-4, atol=1e-5)
  got = jax.jit(jax.vmap(interp, in_axes=(0, None, None)))(unknown, known[0], features[0])
  for i in range(3):
    np.testing.assert_allclose(got[i], want(unknown[i], known[0], features[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fn,args,match", [
    (xla_ops.three_nn, (np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32)), "unknown"),
    (xla_ops.three_nn, (np.zeros((4, 3), np.float32), np.zeros((0, 3), np.float32)), "known"),
    (xla_ops.three_nn, (np.zeros((2, 4, 3), np.float32), np.zeros((3, 4, 3), np.float32)), "batch"),
    (xla_ops.three_interpolate, (np.zeros((4, 2), np.float32), np.zeros((5, 3), np.float32),
                                 np.zeros((5, 3), np.float32)), "idx"),
    (xla_ops.three_interpolate, (np.zeros((4, 2), np.float32), np.zeros((5, 2), np.int32),
                                 np.zeros((5, 2), np.float32)), "idx"),
    (xla_ops.three_interpolate, (np.zeros((4, 2), np.float32), np.zeros((5, 3), np.int32),
                                 np.zeros((6, 3), np.float32)), "weight"),
    (xla_ops.three_interpolate, (np.zeros((4, 2), np.float64), np.zeros((5, 3), np.int32),
                                 np.zeros((5, 3), np.float32)), "features"),
    (xla_ops.inverse_distance_weights, (np.zeros((4, 2), np.float32),), "dist"),
])
def test_bad_inputs_raise(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)
