"""CUDA handlers: every op on the GPU against the numpy references and against the CPU handlers.

The GPU tests need a CUDA device visible to JAX and the `_xla_ops_cuda` extension (built at install time when
nvcc and an NVIDIA driver are found, or with XLA_OPS_CUDA=ON); without them they are skipped with the reason.
The registration test runs wherever the CUDA extension was built, GPU or not (cudart is linked statically, so
the module imports anywhere).

The CPU handler is the second oracle: index outputs (FPS, ball query, knn, three_nn, nn_distance) must agree
exactly, since both platforms compute the same float32 squared distances and break ties to the lowest
index; float outputs agree to float32 rounding (the GPU scatter-adds use atomics, so their summation order
varies).
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xla_ops import chamfer, emd, grouping, interpolation, sampling
from xla_ops._ffi import batched_call
from xla_ops.reference import emd as emd_ref
from xla_ops.reference import interpolation as interp_ref

TARGETS = {
    "xla_ops_farthest_point_sample", "xla_ops_ball_query", "xla_ops_group_points", "xla_ops_group_points_grad",
    "xla_ops_knn", "xla_ops_three_nn", "xla_ops_three_interpolate", "xla_ops_three_interpolate_grad",
    "xla_ops_nn_distance", "xla_ops_approx_match", "xla_ops_match_cost", "xla_ops_match_cost_grad", "xla_ops_emd",
}


def _cuda_module():
  try:
    return importlib.import_module("xla_ops._xla_ops_cuda")
  except ImportError:
    return None


def _gpu():
  try:
    devices = jax.devices("gpu")
  except RuntimeError:
    return None
  return devices[0] if devices else None


GPU = _gpu()
CPU = jax.devices("cpu")[0]
_SKIP_REASON = ("no CUDA device visible to JAX (jax.devices('gpu') is unavailable)" if GPU is None else
                "the _xla_ops_cuda extension was not built (no nvcc when the package was installed)")
needs_gpu = pytest.mark.skipif(GPU is None or _cuda_module() is None, reason=_SKIP_REASON)


def test_cuda_module_registers_every_target():
  module = _cuda_module()
  if module is None:
    pytest.skip("the _xla_ops_cuda extension was not built (no nvcc when the package was installed)")
  assert set(module.registrations()) == TARGETS
  cpu = importlib.import_module("xla_ops._xla_ops_cpu")
  assert set(cpu.registrations()) == TARGETS  # identical target names on both platforms


# ---- helpers --------------------------------------------------------------------------------------


def _run(fn, device, *args):
  """jit(fn)(*args) with the arguments committed to `device`; returns numpy (pytrees of) arrays."""
  out = jax.jit(fn)(*[jax.device_put(a, device) for a in args])
  return jax.tree.map(np.asarray, out)


def _both(fn, *args):
  """(GPU result, CPU result) of fn(*args)."""
  return _run(fn, GPU, *args), _run(fn, CPU, *args)


def _raw(target, core_ndims, out_core, **attrs):
  """Calls an FFI target directly (no wrapper checks), so the handlers' own outputs can be compared."""
  return lambda *a: batched_call(target, a, core_ndims, out_core, **attrs)


def _points(rng, *shape, grid=None):
  """Random float32 points; with `grid`, integer coordinates in [0, grid) (many exact distance ties)."""
  if grid is not None:
    return rng.integers(0, grid, size=shape).astype(np.float32)
  return rng.random(shape, dtype=np.float32)


def _fps_numpy(xyz, npoint):
  """FPS of one example: start at 0, argmax of the running min squared distance, lowest index on ties."""
  dist = np.full(len(xyz), np.inf, np.float32)
  out = [0]
  for _ in range(1, npoint):
    d = xyz - xyz[out[-1]]
    dist = np.minimum(dist, (d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2])
    out.append(int(np.argmax(dist)))
  return np.array(out, np.int32)


def _sq_dists(q, r):
  """[n, 3], [m, 3] -> float32 squared distances [n, m]: (dx^2 + dy^2) + dz^2 (csrc/distance.h's SqDist3)."""
  d = np.zeros((len(q), len(r)), np.float32)
  for c in range(q.shape[-1]):
    diff = r[None, :, c] - q[:, None, c]
    d = d + diff * diff
  return d


def _sq_dists_c(q, r):
  """[n, C], [m, C] -> knn's float32 squared distances [n, m] (csrc/distance.h's SqDistC): channel c is added
  into partial sum c % 8, then ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). numpy never fuses."""
  s = np.zeros((8, len(q), len(r)), np.float32)
  for c in range(q.shape[-1]):
    diff = q[:, None, c] - r[None, :, c]
    s[c % 8] = s[c % 8] + diff * diff
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 7, 8, 9, 16, 32, 33, 64])
def test_knn_cpu_distances_are_the_shared_definition(channels):
  """Runs everywhere: the CPU half of the CPU/GPU bit-identity. The CPU handler's knn distances are exactly
  SqDistC (test_knn checks the CUDA half). Fails if the CPU build contracts into FMAs (aarch64 without
  -ffp-contract=off) or if either backend sums the channels differently."""
  rng = np.random.default_rng(30 + channels)
  query = rng.standard_normal((2, 40, channels)).astype(np.float32)
  ref = rng.standard_normal((2, 300, channels)).astype(np.float32)
  k = 300  # every ref: all distances are compared, not only the nearest
  call = _raw("xla_ops_knn", (2, 2), (((40, k), jnp.float32), ((40, k), jnp.int32)), k=np.int32(k))
  dist, idx = _run(call, CPU, query, ref)
  for b in range(2):
    d = _sq_dists_c(query[b], ref[b])
    np.testing.assert_array_equal(dist[b], np.take_along_axis(d, idx[b], axis=1))
    np.testing.assert_array_equal(idx[b], np.argsort(d, axis=1, kind="stable"))
  if channels <= 3:  # the shared definition reduces to the in-order sum (== SqDist3 at C = 3)
    np.testing.assert_array_equal(_sq_dists_c(query[0], ref[0]), _sq_dists(query[0], ref[0]))


# ---- sampling -------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("grid", [None, 3])
def test_farthest_point_sample(grid):
  rng = np.random.default_rng(0)
  xyz = _points(rng, 2, 2, 1500, 3, grid=grid)  # 1500 > 1024 threads: several points per thread
  fn = lambda p: sampling.farthest_point_sample(p, 40)
  gpu, cpu = _both(fn, xyz)
  np.testing.assert_array_equal(gpu, cpu)
  for b in np.ndindex(2, 2):
    np.testing.assert_array_equal(gpu[b], _fps_numpy(xyz[b], 40))
  np.testing.assert_array_equal(_run(lambda p: sampling.farthest_point_sample(p, 10), GPU, xyz), gpu[..., :10])


@needs_gpu
def test_farthest_point_sample_rejects_bad_npoint_in_handler():
  xyz = np.zeros((1, 5, 3), np.float32)
  call = _raw("xla_ops_farthest_point_sample", (2,), (((6,), jnp.int32), ((5,), jnp.float32)), npoint=np.int32(6))
  with pytest.raises(Exception, match="npoint"):
    _run(call, GPU, xyz)


# ---- grouping -------------------------------------------------------------------------------------


@needs_gpu
def test_ball_query():
  rng = np.random.default_rng(1)
  xyz = _points(rng, 2, 600, 3)
  new_xyz = _points(rng, 2, 50, 3)
  new_xyz[:, 0] = 5.0  # an empty ball
  radius, nsample = 0.2, 16
  gpu, cpu = _both(lambda a, b: grouping.ball_query(a, b, radius, nsample), xyz, new_xyz)
  for g, c in zip(gpu, cpu):
    np.testing.assert_array_equal(g, c)
  idx, count = gpu
  r2 = np.float32(radius) * np.float32(radius)
  for b in range(2):
    hits = _sq_dists(new_xyz[b], xyz[b]) < r2
    for i in range(50):
      found = np.flatnonzero(hits[i])[:nsample]
      assert count[b, i] == len(found)
      pad = found[0] if len(found) else 0
      np.testing.assert_array_equal(idx[b, i], np.concatenate([found, np.full(nsample - len(found), pad)]))
  assert count[0, 0] == 0 and np.all(idx[:, 0] == 0)


@needs_gpu
def test_group_points_and_grad():
  rng = np.random.default_rng(2)
  points = rng.standard_normal((2, 100, 5)).astype(np.float32)
  idx = rng.integers(0, 100, size=(2, 30, 8)).astype(np.int32)
  cot = rng.standard_normal((2, 30, 8, 5)).astype(np.float32)
  out = _run(grouping.group_points, GPU, points, idx)
  np.testing.assert_array_equal(out, np.take_along_axis(points[:, None], idx[..., None], axis=2))
  grad = lambda p, i, g: jax.grad(lambda p: jnp.sum(grouping.group_points(p, i) * g))(p)
  gpu, cpu = _both(grad, points, idx, cot)
  want = np.zeros(points.shape, np.float64)
  for b in range(2):
    np.add.at(want[b], idx[b].reshape(-1), cot[b].reshape(-1, 5).astype(np.float64))
  np.testing.assert_allclose(gpu, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gpu, cpu, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_group_points_out_of_range_reads_zero_on_gpu():
  points = np.arange(12, dtype=np.float32).reshape(1, 4, 3) + 1.0
  idx = np.array([[[0, -1], [4, 3]]], np.int32)
  call = _raw("xla_ops_group_points", (2, 2), (((2, 2, 3), jnp.float32),))
  (out,) = _run(call, GPU, points, idx)
  np.testing.assert_array_equal(out[0, 0, 0], points[0, 0])
  np.testing.assert_array_equal(out[0, 0, 1], 0.0)
  np.testing.assert_array_equal(out[0, 1, 0], 0.0)
  np.testing.assert_array_equal(out[0, 1, 1], points[0, 3])


@needs_gpu
@pytest.mark.parametrize("channels,grid,k", [
    (3, None, 20), (3, 2, 9), (3, None, 700),  # register kernel, C = 3
    (7, None, 5), (7, 2, 9), (48, None, 20),   # generic kernel, queries in shared memory
    (32, None, 20), (64, None, 20), (64, 2, 20),  # register kernels (the dense stage's sizes)
    (100, None, 5),                            # generic kernel, queries read from global memory
])
def test_knn(channels, grid, k):
  """GPU == CPU bit for bit (both compute csrc/distance.h's SqDistC) == the numpy definition, for every
  kernel variant; before the shared definition the CUDA kernel summed channels in order and differed from
  the CPU handler by 1 ulp in many pairs from C = 4 up."""
  rng = np.random.default_rng(3)
  query = _points(rng, 2, 300, channels, grid=grid)
  ref = _points(rng, 2, 700, channels, grid=grid)  # 700 > one shared-memory tile of refs
  call = _raw("xla_ops_knn", (2, 2), (((300, k), jnp.float32), ((300, k), jnp.int32)), k=np.int32(k))
  gpu, cpu = _both(call, query, ref)
  np.testing.assert_array_equal(gpu[1], cpu[1])
  np.testing.assert_array_equal(gpu[0], cpu[0])
  for b in range(2):
    d = _sq_dists_c(query[b], ref[b])
    order = np.argsort(d, axis=1, kind="stable")[:, :k]  # ties: lowest index first
    np.testing.assert_array_equal(gpu[1][b], order)
    np.testing.assert_array_equal(gpu[0][b], np.take_along_axis(d, order, axis=1))
  # Through the wrapper, including the gradient of the distances.
  loss = lambda q, r: jnp.sum(jnp.sqrt(grouping.knn(q, r, k)[0] + 1.0))
  g_gpu, g_cpu = _both(jax.grad(loss, argnums=(0, 1)), query, ref)
  for a, b in zip(g_gpu, g_cpu):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---- interpolation --------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("m,grid", [(600, None), (600, 2), (2, None)])
def test_three_nn(m, grid):
  rng = np.random.default_rng(4)
  unknown = _points(rng, 2, 300, 3, grid=grid)
  known = _points(rng, 2, m, 3, grid=grid)
  call = _raw("xla_ops_three_nn", (2, 2), (((300, 3), jnp.float32), ((300, 3), jnp.int32)))
  gpu, cpu = _both(call, unknown, known)
  np.testing.assert_array_equal(gpu[1], cpu[1])
  np.testing.assert_array_equal(gpu[0], cpu[0])
  for b in range(2):
    dist, idx = interp_ref.three_nn(unknown[b], known[b])
    np.testing.assert_array_equal(gpu[1][b], idx)
    np.testing.assert_allclose(gpu[0][b], dist, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_three_interpolate_and_grads():
  rng = np.random.default_rng(5)
  features = rng.standard_normal((2, 50, 6)).astype(np.float32)
  idx = rng.integers(0, 50, size=(2, 80, 3)).astype(np.int32)
  weight = rng.random((2, 80, 3), dtype=np.float32)
  cot = rng.standard_normal((2, 80, 6)).astype(np.float32)
  out = _run(interpolation.three_interpolate, GPU, features, idx, weight)
  for b in range(2):
    np.testing.assert_allclose(out[b], interp_ref.three_interpolate(features[b], idx[b], weight[b]),
                               rtol=1e-5, atol=1e-6)
  loss = lambda f, w, i, g: jnp.sum(interpolation.three_interpolate(f, i, w) * g)
  grad = jax.grad(loss, argnums=(0, 1))
  (gf, gw), (cf, cw) = _both(grad, features, weight, idx, cot)
  for b in range(2):
    np.testing.assert_allclose(gf[b], interp_ref.three_interpolate_grad(cot[b], idx[b], weight[b], 50),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gw[b], interp_ref.three_interpolate_weight_grad(cot[b], features[b], idx[b]),
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gf, cf, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, cw, rtol=1e-5, atol=1e-6)


@needs_gpu
def test_three_interpolate_out_of_range_contributes_zero_on_gpu():
  features = np.arange(8, dtype=np.float32).reshape(1, 4, 2) + 1.0
  idx = np.array([[[0, 4, -1], [1, 2, 3]]], np.int32)
  weight = np.ones((1, 2, 3), np.float32)
  call = _raw("xla_ops_three_interpolate", (2, 2, 2), (((2, 2), jnp.float32),))
  (out,) = _run(call, GPU, features, idx, weight)
  np.testing.assert_array_equal(out[0, 0], features[0, 0])
  np.testing.assert_array_equal(out[0, 1], features[0, 1:].sum(0))


# ---- chamfer --------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("grid", [None, 3])
def test_nn_distance(grid):
  rng = np.random.default_rng(6)
  a = _points(rng, 2, 1100, 3, grid=grid)  # > one 512-point tile and > one 256-query block
  b = _points(rng, 2, 700, 3, grid=grid)
  out_core = (((1100,), jnp.float32), ((1100,), jnp.int32), ((700,), jnp.float32), ((700,), jnp.int32))
  gpu, cpu = _both(_raw("xla_ops_nn_distance", (2, 2), out_core), a, b)
  for g, c in zip(gpu, cpu):
    np.testing.assert_array_equal(g, c)
  for i in range(2):
    d = _sq_dists(a[i], b[i])
    np.testing.assert_array_equal(gpu[1][i], np.argmin(d, axis=1))  # argmin: first minimum
    np.testing.assert_array_equal(gpu[0][i], d.min(1))
    np.testing.assert_array_equal(gpu[3][i], np.argmin(d, axis=0))
  grad = jax.grad(lambda x, y: chamfer.chamfer_distance(x, y), argnums=(0, 1))
  for g, c in zip(*_both(grad, a, b)):
    np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-7)


@needs_gpu
def test_vmap_on_gpu():
  rng = np.random.default_rng(7)
  a, b = _points(rng, 3, 2, 200, 3), _points(rng, 3, 2, 150, 3)
  fn = jax.vmap(lambda x, y: chamfer.nn_distance(x, y)[1])
  gpu, cpu = _both(fn, a, b)
  np.testing.assert_array_equal(gpu, cpu)


# ---- emd ------------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("n,m", [(300, 200), (150, 400)])
def test_approx_match_and_match_cost(n, m):
  rng = np.random.default_rng(8)
  xyz1 = _points(rng, 2, n, 3)
  xyz2 = _points(rng, 2, m, 3)
  match_gpu, match_cpu = _both(emd.approx_match, xyz1, xyz2)
  # The 10-round scheme amplifies float32 rounding (exp, summation order) in a few entries: float32 vs the
  # float64 reference differs by up to ~1.3e-3 absolute in entries and ~8e-4 in the transported mass per
  # point here, hence the tolerances; the total transported mass is checked tightly.
  for want in [match_cpu] + [np.stack([emd_ref.approx_match(xyz1[b], xyz2[b]) for b in range(2)])]:
    np.testing.assert_allclose(match_gpu, want, atol=5e-3)
    np.testing.assert_allclose(match_gpu.sum(-1), want.sum(-1), atol=3e-3)
    np.testing.assert_allclose(match_gpu.sum(-2), want.sum(-2), atol=3e-3)
    np.testing.assert_allclose(match_gpu.sum((-2, -1)), want.sum((-2, -1)), rtol=1e-4)
  # match_cost and its gradient on a fixed match (the reference's, so only the cost kernels are compared).
  match = np.stack([emd_ref.approx_match(xyz1[b], xyz2[b]) for b in range(2)]).astype(np.float32)
  cost = _run(emd.match_cost, GPU, xyz1, xyz2, match)
  grads = _run(jax.grad(lambda p, q, w: jnp.sum(emd.match_cost(p, q, w)), argnums=(0, 1)), GPU, xyz1, xyz2, match)
  for b in range(2):
    np.testing.assert_allclose(cost[b], emd_ref.match_cost(xyz1[b], xyz2[b], match[b]), rtol=1e-5)
    g1, g2 = emd_ref.match_cost_grad(xyz1[b], xyz2[b], match[b])
    np.testing.assert_allclose(grads[0][b], g1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1][b], g2, rtol=1e-4, atol=1e-5)
  emd_gpu, emd_cpu = _both(emd.earth_mover_distance, xyz1, xyz2)
  np.testing.assert_allclose(emd_gpu, emd_cpu, rtol=1e-4)


@needs_gpu
@pytest.mark.parametrize("batch,n,m", [(2, 1024, 1024), (3, 1100, 700), (2, 130, 2000)])
def test_approx_match_sliced_sums(batch, n, m):
  """Sizes where the CUDA handler splits its sums into several slices (xla_ops/emd.py's workspace: 8, 5 and
  1 slices here, uneven last slices): the same match as the CPU handler up to float32 rounding."""
  rng = np.random.default_rng(9)
  xyz1, xyz2 = _points(rng, batch, n, 3), _points(rng, batch, m, 3)
  match_gpu, match_cpu = _both(emd.approx_match, xyz1, xyz2)
  np.testing.assert_allclose(match_gpu, match_cpu, atol=5e-3)
  np.testing.assert_allclose(match_gpu.sum((-2, -1)), match_cpu.sum((-2, -1)), rtol=1e-4)
  cost_gpu, cost_cpu = _both(emd.match_cost, xyz1, xyz2, match_cpu)
  np.testing.assert_allclose(cost_gpu, cost_cpu, rtol=1e-5)


@needs_gpu
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_approx_match_non_finite_in_xyz1_only(bad):
  """A NaN/Inf coordinate in xyz1 alone: that example's match is all NaN on the GPU too (fminf/fmaxf in the
  rounds drop NaN, so without the explicit rule the kernel returned finite garbage); the other is unaffected."""
  rng = np.random.default_rng(10)
  xyz1, xyz2 = _points(rng, 2, 200, 3), _points(rng, 2, 150, 3)
  xyz1[1, 17, 2] = bad
  match_gpu, match_cpu = _both(emd.approx_match, xyz1, xyz2)
  assert np.isnan(match_gpu[1]).all() and np.isnan(match_cpu[1]).all()
  np.testing.assert_allclose(match_gpu[0], match_cpu[0], atol=5e-3)
  assert np.isnan(_run(emd.earth_mover_distance, GPU, xyz1, xyz2)[1])


@needs_gpu
def test_earth_mover_distance_without_the_match_and_lengths():
  """xla_ops_emd (value and gradient rebuilt from the rounds' factors) on the GPU: equals the CPU handler and
  the dense form on the GPU up to float32 rounding, with a ragged batch (a length-0 example, NaN padding)."""
  rng = np.random.default_rng(11)
  xyz1, xyz2 = _points(rng, 3, 700, 3), _points(rng, 3, 500, 3)
  la, lb = np.array([700, 300, 0], np.int32), np.array([500, 500, 40], np.int32)
  xyz1[1, 300:] = np.nan
  fn = lambda p, q, x, y: jax.value_and_grad(
      lambda p, q: jnp.sum(emd.earth_mover_distance(p, q, lengths_a=x, lengths_b=y)), argnums=(0, 1))(p, q)
  (v_gpu, g_gpu), (v_cpu, g_cpu) = _both(fn, xyz1, xyz2, la, lb)
  np.testing.assert_allclose(v_gpu, v_cpu, rtol=1e-4)
  for a, b in zip(g_gpu, g_cpu):
    np.testing.assert_allclose(a, b, atol=5e-3)
  assert np.all(g_gpu[0][1, 300:] == 0) and np.all(g_gpu[0][2] == 0)
  dense = lambda p, q: jnp.sum(emd.match_cost(p, q, emd.approx_match(p, q)))
  v_dense = _run(dense, GPU, xyz1[:1], xyz2[:1])
  v_fused = _run(lambda p, q: jnp.sum(emd.earth_mover_distance(p, q)), GPU, xyz1[:1], xyz2[:1])
  np.testing.assert_allclose(v_fused, v_dense, rtol=1e-5)


_COMMAND_BUFFER_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, xla_ops
gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]

def ops(a, b):
  idx = xla_ops.farthest_point_sample(a, 64)
  match = xla_ops.approx_match(a, b)
  return (idx, xla_ops.knn(a, b, 5)[1], xla_ops.ball_query(a, b, 0.3, 8)[0], xla_ops.nn_distance(a, b)[1],
          xla_ops.three_nn(a, b)[1], match, xla_ops.match_cost(a, b, match),
          jax.grad(lambda p: jnp.sum(xla_ops.chamfer_distance(p, b)))(a))

f_gpu = jax.jit(ops)
rng = np.random.default_rng(0)
for trial in range(3):  # replays of the captured graph must read the new inputs
  a = rng.random((2, 300, 3), dtype=np.float32)
  b = rng.random((2, 200, 3), dtype=np.float32)
  got = jax.tree.map(np.asarray, f_gpu(jax.device_put(a, gpu), jax.device_put(b, gpu)))
  want = jax.tree.map(np.asarray, jax.jit(ops)(jax.device_put(a, cpu), jax.device_put(b, cpu)))
  for i, (g, w) in enumerate(zip(got, want)):
    if g.dtype == np.int32:
      np.testing.assert_array_equal(g, w, err_msg=f"output {i}, trial {trial}")
    else:
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=5e-3, err_msg=f"output {i}, trial {trial}")
print("OK")
"""


@needs_gpu
def test_handlers_run_inside_cuda_graphs():
  """Every handler declares XLA's command-buffer trait: with custom calls allowed in command buffers and no
  minimum graph size, XLA captures them into CUDA graphs; the results of repeated calls with new inputs
  (graph replays) must still equal the CPU handlers'. Runs in a subprocess (XLA flags are read at start-up)."""
  import os
  import subprocess
  import sys
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL"
                      " --xla_gpu_graph_min_graph_size=1").strip()
  proc = subprocess.run([sys.executable, "-c", _COMMAND_BUFFER_SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ---- properties of the CUDA sources and launch sizes checked everywhere (no GPU needed) -----------------------

_CUDA_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "xla_ops" / "csrc" / "cuda"


def test_every_cuda_handler_is_command_buffer_compatible():
  """Every CUDA handler declares XLA's command-buffer trait and none asks for XLA's scratch allocator (memory
  allocated during a CUDA-graph capture would not survive the replays): temporaries are workspace outputs."""
  import re
  handlers = 0
  for path in sorted(_CUDA_DIR.glob("*.cu")):
    text = path.read_text()
    assert "ScratchAllocator" not in text, path.name
    for block in re.findall(r"XLA_FFI_DEFINE_HANDLER_SYMBOL\(.*?\);", text, flags=re.S):
      handlers += 1
      assert "ffi::Traits::kCmdBufferCompatible" in block, (path.name, block.split(",")[0])
  assert handlers == len(TARGETS)


def test_approx_match_launch_fills_an_h100_at_the_training_sizes():
  """At B = 32, N = M = 1024 the CUDA passes run B * ceil(N / 256) * slices blocks (cuda/emd.cu, slices from
  xla_ops/emd.py's workspace size): at least two per SM of a 132-SM H100/H200. One block per (item, 256-point
  tile) gave 128, fewer than the SMs."""
  n = m = 1024
  stride = emd._approx_match_workspace(n, m)
  slices = (stride - 2 * (n + m)) // max(n, m)
  assert stride == 2 * (n + m) + slices * max(n, m)
  assert 32 * -(-n // 256) * slices >= 2 * 132
