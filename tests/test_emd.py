"""approx_match / match_cost / earth_mover_distance against the numpy reference (xla_ops/reference/emd.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xla_ops
from xla_ops.reference import emd as ref

IMPLS = ("ffi", "jnp")

# Tolerances calibrated on the CPU handler (Morton order, polynomial exp); tests/test_cuda.py checks the CUDA
# kernels against it and the reference with the GPU's own tolerances.
pytestmark = pytest.mark.cpu


def _clouds(seed, batch, n, m):
  rng = np.random.default_rng(seed)
  return (rng.random(batch + (n, 3), np.float32) - 0.5, rng.random(batch + (m, 3), np.float32) - 0.5)


def _ref_match(a, b):
  flat_a, flat_b = a.reshape((-1,) + a.shape[-2:]), b.reshape((-1,) + b.shape[-2:])
  out = np.stack([ref.approx_match(x, y) for x, y in zip(flat_a, flat_b)])
  return out.reshape(a.shape[:-2] + out.shape[-2:])


@pytest.mark.parametrize("impl,n,m", [("ffi", 48, 48), ("ffi", 64, 20), ("ffi", 20, 64), ("ffi", 33, 100),
                                      ("ffi", 1, 5), ("ffi", 7, 1), ("jnp", 48, 48), ("jnp", 20, 64)])
def test_approx_match_matches_reference(impl, n, m):
  a, b = _clouds(n * 100 + m, (2,), n, m)
  got = np.asarray(xla_ops.approx_match(a, b, impl=impl))
  want = _ref_match(a, b)
  assert got.shape == (2, m, n)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("scale", [0.3, 3.0])
def test_approx_match_several_blocks_and_scales(scale):
  """Clouds larger than one CPU work block (sorting, culling, unsorting) at scales where culling is active
  in few / most rounds."""
  a, b = _clouds(13, (), 300, 260)
  a, b = a * scale, b * scale
  np.testing.assert_allclose(xla_ops.approx_match(a, b), ref.approx_match(a, b), rtol=1e-4, atol=2e-5)


def test_approx_match_wide_rows():
  """More than 64 CPU culling sub-blocks per row (reachable runs that cross 64-bit mask words) and a ragged
  last sub-block."""
  a, b = _clouds(14, (), 1100, 40)
  a, b = a * 3.0, b * 3.0
  np.testing.assert_allclose(xla_ops.approx_match(a, b), ref.approx_match(a, b), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("n,m", [(40, 40), (60, 20), (20, 60), (30, 70)])
def test_approx_match_masses(n, m):
  """Rows/columns never exceed the masses of docs/original.md §5 and the transported total is ~ max(n, m)."""
  a, b = _clouds(1, (), n, m)
  match = np.asarray(xla_ops.approx_match(a, b), np.float64)
  mass_l, mass_r = ref.masses(n, m)
  assert np.all(match >= 0)
  assert np.all(match.sum(0) <= mass_l * (1 + 1e-5))
  assert np.all(match.sum(1) <= mass_r * (1 + 1e-5))
  # The last round (level 0) spreads what is left, so the plan moves all the mass it can.
  assert match.sum() == pytest.approx(min(n * mass_l, m * mass_r), rel=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_match_cost_and_grad_match_reference(impl):
  a, b = _clouds(3, (3,), 30, 45)
  match = np.random.default_rng(4).random((3, 45, 30), np.float32)
  cost = np.asarray(xla_ops.match_cost(a, b, match, impl=impl))
  np.testing.assert_allclose(cost, [ref.match_cost(*x) for x in zip(a, b, match)], rtol=1e-5)
  weights = jnp.asarray([1.0, -2.0, 0.5])
  g1, g2 = jax.grad(lambda x, y: jnp.sum(weights * xla_ops.match_cost(x, y, match, impl=impl)),
                    argnums=(0, 1))(a, b)
  for i in range(3):
    r1, r2 = ref.match_cost_grad(a[i], b[i], match[i])
    np.testing.assert_allclose(g1[i], float(weights[i]) * r1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g2[i], float(weights[i]) * r2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_match_cost_grad_finite_differences(impl):
  a, b = _clouds(5, (), 6, 9)
  match = np.random.default_rng(6).random((9, 6), np.float32)
  a64, b64, m64 = (x.astype(np.float64) for x in (a, b, match))
  g1, g2 = jax.grad(lambda x, y: xla_ops.match_cost(x, y, match, impl=impl), argnums=(0, 1))(a, b)
  eps = 1e-6
  for pts, grad, which in ((a64, g1, 0), (b64, g2, 1)):
    for idx in [(0, 0), (3, 2), (5 if which == 0 else 8, 1)]:
      plus, minus = pts.copy(), pts.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args_p = (plus, b64) if which == 0 else (a64, plus)
      args_m = (minus, b64) if which == 0 else (a64, minus)
      fd = (ref.match_cost(*args_p, m64) - ref.match_cost(*args_m, m64)) / (2 * eps)
      assert float(grad[idx]) == pytest.approx(fd, rel=1e-3, abs=1e-4)


def test_match_cost_coincident_points_give_zero_gradient():
  a = np.zeros((1, 2, 3), np.float32)
  match = np.ones((1, 2, 2), np.float32)
  g1, g2 = jax.grad(lambda x, y: xla_ops.match_cost(x, y, match).sum(), argnums=(0, 1))(a, a)
  assert np.all(np.asarray(g1) == 0) and np.all(np.asarray(g2) == 0)


@pytest.mark.parametrize("impl", IMPLS)
def test_earth_mover_distance(impl):
  a, b = _clouds(7, (2,), 32, 32)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda x, y: xla_ops.earth_mover_distance(x, y, impl=impl).sum(), argnums=(0, 1), has_aux=False))
  emd = np.asarray(jax.jit(lambda x, y: xla_ops.earth_mover_distance(x, y, impl=impl))(a, b))
  want = [ref.match_cost(x, y, ref.approx_match(x, y)) for x, y in zip(a, b)]
  np.testing.assert_allclose(emd, want, rtol=1e-4)
  # Identical clouds: every point is matched to itself (the sharpest level already does it).
  same, _ = value_and_grad(a, a)
  assert float(same) < 1e-3 * emd.sum()
  # Gradient = MatchCostGrad with the match held constant.
  total, (g1, g2) = value_and_grad(a, b)
  assert float(total) == pytest.approx(sum(want), rel=1e-4)
  for i in range(2):
    r1, r2 = ref.match_cost_grad(a[i], b[i], ref.approx_match(a[i], b[i]))
    np.testing.assert_allclose(g1[i], r1, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(g2[i], r2, rtol=1e-3, atol=1e-4)


def test_approx_match_has_no_gradient():
  a, b = _clouds(8, (), 10, 10)
  g = jax.grad(lambda x: xla_ops.approx_match(x, b).sum())(a)
  assert np.all(np.asarray(g) == 0)


def test_jit_vmap_and_batch_shapes():
  a, b = _clouds(9, (2, 3), 16, 24)
  want = _ref_match(a, b)
  got = jax.jit(jax.vmap(xla_ops.approx_match))(a, b)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-5)
  got = jax.vmap(xla_ops.approx_match, in_axes=(0, None))(a[0], b[0, 0])
  np.testing.assert_allclose(got, _ref_match(a[0], np.broadcast_to(b[0, 0], (3, 24, 3))), rtol=1e-4, atol=2e-5)
  match = np.asarray(got)
  cost = jax.jit(jax.vmap(xla_ops.match_cost, in_axes=(0, None, 0)))(a[0], b[0, 0], match)
  np.testing.assert_allclose(cost, [ref.match_cost(x, b[0, 0], mt) for x, mt in zip(a[0], match)], rtol=1e-5)


def test_results_do_not_depend_on_batching():
  """A batched call (the per-item schedule) equals per-example calls (the split-pass schedule) bit for bit."""
  a, b = _clouds(10, (8,), 300, 260)
  batched = np.asarray(xla_ops.approx_match(a, b))
  single = np.stack([np.asarray(xla_ops.approx_match(a[i], b[i])) for i in range(8)])
  np.testing.assert_array_equal(batched, single)
  match = jnp.asarray(batched)
  np.testing.assert_array_equal(xla_ops.match_cost(a, b, match),
                                np.stack([xla_ops.match_cost(a[i], b[i], match[i]) for i in range(8)]))


def test_non_finite_input_gives_nan_match_for_that_example_only():
  a, b = _clouds(11, (2,), 12, 12)
  a[1, 3, 0] = np.nan
  b[1, 5, 2] = np.inf
  for impl in IMPLS:
    match = np.asarray(xla_ops.approx_match(a, b, impl=impl))
    assert np.all(np.isnan(match[1]))
    np.testing.assert_allclose(match[0], ref.approx_match(a[0], b[0]), rtol=1e-4, atol=2e-5)
    cost = np.asarray(xla_ops.earth_mover_distance(a, b, impl=impl))
    assert np.isnan(cost[1]) and np.isfinite(cost[0])


@pytest.mark.parametrize("fn,args,match", [
    (xla_ops.approx_match, (np.zeros((4, 2), np.float32), np.zeros((4, 3), np.float32)), "xyz1"),
    (xla_ops.approx_match, (np.zeros((4, 3), np.float32), np.zeros((4, 3), np.float64)), "xyz2"),
    (xla_ops.approx_match, (np.zeros((2, 4, 3), np.float32), np.zeros((3, 4, 3), np.float32)), "batch"),
    (xla_ops.match_cost, (np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32),
                          np.zeros((4, 5), np.float32)), "match"),
    (xla_ops.earth_mover_distance, (np.zeros((0, 3), np.float32), np.zeros((4, 3), np.float32)), "xyz1"),
])
def test_bad_inputs_raise(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)


def test_bad_impl_raises():
  a, b = _clouds(12, (), 4, 4)
  with pytest.raises(ValueError, match="impl"):
    xla_ops.approx_match(a, b, impl="cuda")


# ---- earth_mover_distance without the match (xla_ops_emd), lengths, normalize_scale ------------------

def _dense_emd_and_grad(a, b):
  """The N x M form: match_cost(approx_match) and its gradient (the reference for the fused form)."""
  fn = lambda x, y: jnp.sum(xla_ops.match_cost(x, y, xla_ops.approx_match(x, y)))
  return xla_ops.match_cost(a, b, xla_ops.approx_match(a, b)), jax.grad(fn, argnums=(0, 1))(a, b)


@pytest.mark.parametrize("n,m,scale", [(48, 48, 1.0), (64, 20, 1.0), (20, 64, 1.0), (1, 5, 1.0), (300, 260, 0.3),
                                       (300, 260, 3.0), (1100, 40, 3.0)])
def test_fused_emd_equals_dense_form(n, m, scale):
  """The fused custom call rebuilds approx_match's entries with the same float operations and sums them in
  another order: values and gradients agree with the dense form to float32 rounding of sums of ~n * m terms
  (rtol 1e-5), and with the float64 reference to the dense form's own tolerance."""
  a, b = _clouds(n + 7 * m, (2,), n, m)
  a, b = a * scale, b * scale
  value, (g1, g2) = jax.value_and_grad(lambda x, y: jnp.sum(xla_ops.earth_mover_distance(x, y)),
                                       argnums=(0, 1))(a, b)
  per_example = np.asarray(xla_ops.earth_mover_distance(a, b))
  dense, (d1, d2) = _dense_emd_and_grad(a, b)
  np.testing.assert_allclose(per_example, dense, rtol=1e-5)
  scale_g = np.abs(np.asarray(d1)).max()
  np.testing.assert_allclose(g1, d1, rtol=1e-5, atol=1e-5 * scale_g)
  np.testing.assert_allclose(g2, d2, rtol=1e-5, atol=1e-5 * scale_g)
  want = [ref.match_cost(x, y, ref.approx_match(x, y)) for x, y in zip(a, b)]
  np.testing.assert_allclose(per_example, want, rtol=1e-4)
  assert float(value) == pytest.approx(sum(want), rel=1e-4)
  # The value-only call (with_grad=0) and the forward pass under differentiation (with_grad=1) agree exactly.
  primal, _ = jax.vjp(xla_ops.earth_mover_distance, a, b)
  np.testing.assert_array_equal(primal, per_example)


def test_reference_factors_rebuild_the_match():
  """The O(n + m) factorisation the fused form relies on, in float64: the rounds' ratios rebuild the match."""
  a, b = _clouds(21, (), 40, 30)
  ratio_l, ratio_r = ref.approx_match_factors(a, b)
  np.testing.assert_allclose(ref.match_from_factors(a, b, ratio_l, ratio_r), ref.approx_match(a, b),
                             rtol=1e-10, atol=1e-13)


def _ragged(seed):
  """A padded batch of 4 examples with lengths (n_i, m_i), NaN / huge garbage in the padding."""
  a, b = _clouds(seed, (4,), 64, 48)
  lengths_a = np.array([64, 31, 7, 0], np.int32)
  lengths_b = np.array([48, 48, 20, 5], np.int32)
  for i in range(4):
    a[i, lengths_a[i]:] = np.nan
    b[i, lengths_b[i]:] = 1e30
  return a, b, lengths_a, lengths_b


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_give_the_unpadded_results(impl):
  """Padded examples give the results of their unpadded clouds (bit for bit on the CPU custom calls, to float
  rounding in jnp), padded points get match 0 and gradient 0, and a length-0 example has EMD 0."""
  a, b, la, lb = _ragged(22)
  kw = dict(lengths_a=jnp.asarray(la), lengths_b=jnp.asarray(lb), impl=impl)
  emd_fn = jax.jit(lambda x, y: xla_ops.earth_mover_distance(x, y, **kw))
  value = np.asarray(emd_fn(a, b))
  g1, g2 = jax.grad(lambda x, y: jnp.sum(emd_fn(x, y)), argnums=(0, 1))(a, b)
  match = np.asarray(xla_ops.approx_match(a, b, **kw))
  cost = np.asarray(xla_ops.match_cost(a, b, np.nan_to_num(match), **kw))
  check = np.testing.assert_array_equal if impl == "ffi" else (
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6))
  for i in range(4):
    n, m = la[i], lb[i]
    assert np.all(np.asarray(g1[i, n:]) == 0) and np.all(np.asarray(g2[i, m:]) == 0)
    assert np.all(match[i, m:] == 0) and np.all(match[i, :, n:] == 0)
    if n == 0:
      assert value[i] == 0 and cost[i] == 0 and np.all(np.asarray(g2[i]) == 0)
      continue
    x, y = a[i, :n], b[i, :m]
    unpadded, (u1, u2) = jax.jit(jax.value_and_grad(
        lambda p, q: xla_ops.earth_mover_distance(p, q, impl=impl), argnums=(0, 1)))(x, y)
    check(value[i], np.asarray(unpadded))
    check(np.asarray(g1[i, :n]), np.asarray(u1))
    check(np.asarray(g2[i, :m]), np.asarray(u2))
    check(match[i, :m, :n], np.asarray(jax.jit(lambda p, q: xla_ops.approx_match(p, q, impl=impl))(x, y)))
    np.testing.assert_allclose(match[i, :m, :n], ref.approx_match(x, y), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(cost[i], ref.match_cost(x, y, match[i, :m, :n]), rtol=1e-5)
    np.testing.assert_allclose(value[i], ref.match_cost(x, y, ref.approx_match(x, y)), rtol=1e-4)


def test_lengths_under_vmap_and_jit():
  a, b, la, lb = _ragged(23)
  fn = lambda x, y, p, q: xla_ops.earth_mover_distance(x, y, lengths_a=p, lengths_b=q)
  batched = np.asarray(fn(a, b, jnp.asarray(la), jnp.asarray(lb)))
  mapped = np.asarray(jax.jit(jax.vmap(fn))(a, b, jnp.asarray(la), jnp.asarray(lb)))
  np.testing.assert_array_equal(mapped, batched)


def test_bad_lengths_raise():
  a, b = _clouds(24, (2,), 8, 8)
  with pytest.raises(ValueError, match="lengths_a"):
    xla_ops.earth_mover_distance(a, b, lengths_a=np.array([8, 8], np.int64))
  with pytest.raises(ValueError, match="lengths_b"):
    xla_ops.approx_match(a, b, lengths_b=jnp.array([8], jnp.int32))


@pytest.mark.parametrize("impl", IMPLS)
def test_normalize_scale(impl):
  """normalize_scale computes s * EMD(xyz1 / s, xyz2 / s), s = largest side of the joint bounding box, so the
  result scales with the clouds (the plain form does not: its kernel widths are absolute)."""
  a, b = _clouds(25, (2,), 64, 64)
  unit = np.asarray(xla_ops.earth_mover_distance(a, b, normalize_scale=True, impl=impl))
  np.testing.assert_allclose(unit, [ref.earth_mover_distance(x, y, normalize_scale=True) for x, y in zip(a, b)],
                             rtol=1e-4)
  for c in (0.01, 1000.0):
    scaled = np.asarray(xla_ops.earth_mover_distance(a * c, b * c, normalize_scale=True, impl=impl))
    np.testing.assert_allclose(scaled, c * unit, rtol=1e-4)
  plain_small = np.asarray(xla_ops.earth_mover_distance(a * 0.01, b * 0.01, impl=impl))
  assert np.all(plain_small > 1.5 * 0.01 * unit)  # the plain form's scale dependence (docs/ops.md)
  g = jax.grad(lambda x: jnp.sum(xla_ops.earth_mover_distance(x, b * 1000, normalize_scale=True, impl=impl)))(a * 1000)
  assert np.all(np.isfinite(np.asarray(g)))


def test_lengths_under_shard_map_and_grad():
  """EMD with lengths through shard_map (8 fake CPU devices, 1 example each): value and gradients equal the
  unsharded ones."""
  from jax.sharding import AxisType, PartitionSpec as P
  a, b, la, lb = _ragged(26)
  a, b = np.concatenate([a, a[::-1]]), np.concatenate([b, b[::-1]])
  la, lb = jnp.asarray(np.concatenate([la, la[::-1]])), jnp.asarray(np.concatenate([lb, lb[::-1]]))
  loss = lambda x, y, p, q: xla_ops.earth_mover_distance(x, y, lengths_a=p, lengths_b=q)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  sharded = jax.shard_map(loss, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda *z: jnp.mean(f(*z)), argnums=(0, 1)))
  (v1, g1), (v2, g2) = value_and_grad(sharded)(a, b, la, lb), value_and_grad(loss)(a, b, la, lb)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  for x, y in zip(g1, g2):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
