"""Half-precision inputs for every op (issue 11, item 3): float16 / bfloat16 are computed in float32 inside.

For every op of xla_ops.__all__ (the SPECS table of test_jax_transforms): its floating outputs come back in the
input dtype and equal the float32 op on the same (up-cast) values, rounded once; its gradients come back in
the input dtype and equal the float32 gradients rounded once. float64 is rejected with a clear error.
The float32 paths themselves are checked against the numpy references in the per-op test files.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_ops
from test_jax_transforms import OPS, SPECS, call, make_args

HALF = [jnp.bfloat16, jnp.float16]


def _cast(args, dtype):
  return tuple(jnp.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a)
               for a in args)


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", OPS)
def test_half_inputs_give_half_outputs_equal_to_float32(name, dtype):
  half = _cast(make_args(name, (2,), n=32), dtype)
  up = _cast(half, jnp.float32)  # the same values in float32
  got, want = call(name, *half), call(name, *up)
  for g, w in zip(got, want, strict=True):
    if jnp.issubdtype(w.dtype, jnp.floating):
      assert g.dtype == dtype, (name, g.dtype)
      np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                    np.asarray(w.astype(dtype).astype(jnp.float32)))
    else:
      assert g.dtype == w.dtype
      np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("dtype", HALF, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("name", [n for n in OPS if SPECS[n].diff_argnums])
def test_half_gradients_have_the_input_dtype(name, dtype):
  argnums = SPECS[name].diff_argnums
  half = _cast(make_args(name, (2,), n=32), dtype)
  up = _cast(half, jnp.float32)
  shapes = [o.shape for o in call(name, *up)]
  # Small-integer weights are exact in every dtype, so the cotangents are the same in both runs.
  weights = [np.random.default_rng(i).integers(-2, 3, s).astype(np.float32) for i, s in enumerate(shapes)]

  def loss(*args):
    return sum(jnp.sum(o.astype(jnp.float32) * w) for o, w in zip(call(name, *args), weights)
               if jnp.issubdtype(o.dtype, jnp.floating))

  g_half = jax.grad(loss, argnums)(*half)
  g_up = jax.grad(loss, argnums)(*up)
  for gh, gu, i in zip(g_half, g_up, argnums):
    assert gh.dtype == half[i].dtype
    np.testing.assert_array_equal(np.asarray(gh.astype(jnp.float32)),
                                  np.asarray(gu.astype(dtype).astype(jnp.float32)))


def test_mixed_dtypes_promote():
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.random((20, 3), dtype=np.float32)).astype(jnp.bfloat16)
  b = jnp.asarray(rng.random((30, 3), dtype=np.float32))
  d_ab, _, d_ba, _ = xla_ops.nn_distance(a, b)
  assert d_ab.dtype == d_ba.dtype == jnp.float32
  assert xla_ops.chamfer_distance(a, b.astype(jnp.float16)).dtype == jnp.float32  # bf16 + f16 -> f32
  assert xla_ops.knn(a, a, 2)[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("bad,match", [
    (lambda x: xla_ops.farthest_point_sample(x, 2), "xyz must be float32, float16 or bfloat16, got float64"),
    (lambda x: xla_ops.chamfer_distance(x, x), "a must be float32, float16 or bfloat16, got float64"),
    (lambda x: xla_ops.knn(x, x, 2), r"query must be .* got float64 \(the ops compute in float32: cast"),
    (lambda x: xla_ops.group_points(x, jnp.zeros((4, 2), jnp.int32)), "points must be .* got float64"),
    (lambda x: xla_ops.inverse_distance_weights(x), "dist must be .* got float64"),
    (lambda x: xla_ops.match_cost(x[:5].astype(jnp.float32), x[:4].astype(jnp.float32), jnp.zeros((4, 5))),
     "match must be .* got float64"),
])
def test_float64_is_rejected_with_a_cast_hint(bad, match):
  jax.config.update("jax_enable_x64", True)
  try:
    with pytest.raises(ValueError, match=match):
      bad(jnp.asarray(np.random.default_rng(1).random((10, 3))))
  finally:
    jax.config.update("jax_enable_x64", False)
