"""Approximate Earth Mover's distance: ``approx_match``, ``match_cost`` and ``earth_mover_distance``.

``approx_match`` is the multi-scale soft-auction of the original GPU kernel (metric/tf_approxmatch_g.cu,
docs/original.md §5): 10 rounds with level = -4^j for j = 7..-1 and level 0 in the last one; every
xyz1 point has mass 1 and every xyz2 point mass floor(n/m) when n >= m (else floor(m/n) and 1). The result
``match [..., m, n]`` is a constant (no gradient), as in the original.

Precision: everything is float32 like the GPU kernel. The CPU handler evaluates exp(level * d^2) with a
vectorisable polynomial (Cephes expf, ~1 ulp, about libm's expf; the GPU used the faster, less accurate
``__expf``) that flushes values below 2^-125 (exponents < -87) to zero, and runs with flush-to-zero /
denormals-are-zero. It sorts xyz1 along a Morton curve internally (xyz2 keeps its order), runs each round as one
sweep over the xyz2 rows with per-row-block column sums, and skips column blocks whose exponentials are all
exactly zero, so the sums run in that (fixed) order rather than index order. Every
output element is computed by one thread in a fixed order: results do not depend on the thread count or the
batch size, and agree with a float64 evaluation to ~1e-5 relative. ``match_cost`` on CPU uses a Newton-refined
reciprocal square root (a few ulp) so that it vectorises.

``match_cost`` is ``sum_{l,k} match[l,k] * ||xyz1[k] - xyz2[l]||`` (Euclidean, not squared, not averaged).
Its gradient w.r.t. the points is the original ``MatchCostGrad`` (distances floored at 1e-10, so coincident
points give 0); w.r.t. ``match`` it is the distance matrix (the original gave none).

NaN/Inf: an example with any non-finite coordinate gets an all-NaN ``match`` (both impls; the sums would
spread it anyway), so its ``earth_mover_distance`` and gradient are NaN; other examples are unaffected.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from xla_ops import _checks
from xla_ops._ffi import batched_call

NUM_ROUNDS = 10  # j = 7, 6, ..., -2


def _masses(n: int, m: int) -> tuple[float, float]:
  return (1.0, float(n // m)) if n >= m else (float(m // n), 1.0)


def _sq_dist_matrix(xyz1, xyz2):
  """[..., n, 3], [..., m, 3] -> [..., m, n] squared distances."""
  return jnp.sum((xyz2[..., :, None, :] - xyz1[..., None, :, :]) ** 2, axis=-1)


def _approx_match_jnp(xyz1, xyz2):
  """The GPU algorithm over the dense [m, n] matrices (baseline)."""
  n, m = xyz1.shape[-2], xyz2.shape[-2]
  batch = xyz1.shape[:-2]
  d2 = _sq_dist_matrix(xyz1, xyz2)
  mass_l, mass_r = _masses(n, m)

  def round_(i, state):
    match, remain_l, remain_r = state
    j = 7 - i
    level = jnp.where(i == NUM_ROUNDS - 1, 0.0, -jnp.power(4.0, j.astype(jnp.float32)))
    e = jnp.exp(level * d2)
    ratio_l = remain_l / (1e-9 + jnp.sum(e * remain_r[..., :, None], axis=-2))
    s = remain_r * jnp.sum(e * ratio_l[..., None, :], axis=-1)
    ratio_r = jnp.minimum(remain_r / (s + 1e-9), 1.0) * remain_r
    remain_r = jnp.maximum(0.0, remain_r - s)
    w = e * ratio_l[..., None, :] * ratio_r[..., :, None]
    remain_l = jnp.maximum(0.0, remain_l - jnp.sum(w, axis=-2))
    return match + w, remain_l, remain_r

  init = (jnp.zeros(batch + (m, n), jnp.float32), jnp.full(batch + (n,), mass_l, jnp.float32),
          jnp.full(batch + (m,), mass_r, jnp.float32))
  match = jax.lax.fori_loop(0, NUM_ROUNDS, round_, init)[0]
  finite = jnp.all(jnp.isfinite(xyz1), axis=(-2, -1)) & jnp.all(jnp.isfinite(xyz2), axis=(-2, -1))
  return jnp.where(finite[..., None, None], match, jnp.nan)


def _approx_match_workspace(n: int, m: int) -> int:
  """float32 elements per example of approx_match's workspace output (used by the CUDA handler only, which
  needs device memory it may not allocate inside a CUDA graph): remain/ratio of both sets, 2 (n + m), plus
  the partial sums of its sums split into `slices` ranges of >= 128 points (at most 16), so that B = 32,
  N = M = 1024 runs 8 slices = 1024 blocks (csrc/cuda/emd.cu derives `slices` from this size)."""
  slices = max(1, min(16, min(n, m) // 128))
  return 2 * (n + m) + slices * max(n, m)


def _check_pair(xyz1, xyz2):
  _checks.check_points(xyz1, "xyz1")
  _checks.check_points(xyz2, "xyz2")
  _checks.check_same_batch("xyz1", xyz1.shape[:-2], "xyz2", xyz2.shape[:-2])


def _available_bytes() -> int | None:
  """Free memory of the default device: MemAvailable of /proc/meminfo on CPU, bytes_limit - bytes_in_use on
  accelerators; None when unknown (then nothing is refused)."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    try:
      with open("/proc/meminfo") as f:
        for line in f:
          if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
      return None
    return None
  stats = device.memory_stats() or {}
  if "bytes_limit" not in stats:
    return None
  return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def _check_match_fits(xyz1, xyz2) -> None:
  """Refuses (at trace time) an approx_match whose [..., m, n] float32 output alone exceeds the free memory of
  the default device, instead of letting the OS kill the process. (The jnp baseline needs several such
  matrices; only the output is counted.)"""
  batch, n, m = math.prod(xyz1.shape[:-2]), xyz1.shape[-2], xyz2.shape[-2]
  need = batch * m * n * 4
  available = _available_bytes()
  if available is not None and need > available:
    raise ValueError(f"approx_match: the match matrix for batch {batch}, m={m} (xyz2), n={n} (xyz1) is "
                     f"{batch} x {m} x {n} float32 = {need:,} bytes ({need / 2**30:.1f} GiB), more than the "
                     f"{available:,} bytes ({available / 2**30:.1f} GiB) free on {jax.devices()[0].platform}; "
                     "subsample the clouds (e.g. farthest_point_sample) or split the batch")


def approx_match(xyz1: jax.Array, xyz2: jax.Array, *, impl: str = "ffi") -> jax.Array:
  """Approximate optimal transport plan between two point sets (the original ``ApproxMatch``).

  Args:
    xyz1: float32 [..., n, 3].
    xyz2: float32 [..., m, 3], same batch shape.
    impl: "ffi" (custom call; O(n + m) memory besides the output) or "jnp" (dense baseline).
  Returns:
    match float32 [..., m, n] (a constant: gradients through it are zero).
  Raises:
    ValueError when that matrix alone would not fit in the default device's free memory.
  """
  _checks.check_impl(impl)
  _check_pair(xyz1, xyz2)
  dtype = _checks.out_dtype(xyz1, xyz2)
  return _approx_match_f32(*_checks.to_f32(xyz1, xyz2), impl).astype(dtype)


def _approx_match_f32(xyz1, xyz2, impl):
  _check_match_fits(xyz1, xyz2)
  xyz1, xyz2 = jax.lax.stop_gradient(xyz1), jax.lax.stop_gradient(xyz2)
  if impl == "jnp":
    return _approx_match_jnp(xyz1, xyz2)
  n, m = xyz1.shape[-2], xyz2.shape[-2]
  match, _ = batched_call("xla_ops_approx_match", (xyz1, xyz2), core_ndims=(2, 2),
                           out_core=(((m, n), jnp.float32), ((_approx_match_workspace(n, m),), jnp.float32)))
  return match


def _match_cost_grad_jnp(xyz1, xyz2, match):
  diff = xyz1[..., None, :, :] - xyz2[..., :, None, :]  # p_k - q_l, [..., m, n, 3]
  norm = jnp.sqrt(jnp.sum(diff ** 2, axis=-1))
  g = (match / jnp.maximum(norm, 1e-10))[..., None] * diff
  return jnp.sum(g, axis=-3), -jnp.sum(g, axis=-2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _match_cost(xyz1, xyz2, match, impl):
  if impl == "ffi":
    m = xyz2.shape[-2]  # workspace: per-row costs [m] (CUDA handler only)
    cost, _ = batched_call("xla_ops_match_cost", (xyz1, xyz2, match), core_ndims=(2, 2, 2),
                           out_core=(((), jnp.float32), ((m,), jnp.float32)))
    return cost
  return jnp.sum(match * jnp.sqrt(_sq_dist_matrix(xyz1, xyz2)), axis=(-2, -1))


def _match_cost_fwd(xyz1, xyz2, match, impl):
  return _match_cost(xyz1, xyz2, match, impl), (xyz1, xyz2, match)


def _match_cost_bwd(impl, residuals, grad_cost):
  xyz1, xyz2, match = residuals
  if impl == "ffi":
    n, m = xyz1.shape[-2], xyz2.shape[-2]
    grad1, grad2 = batched_call("xla_ops_match_cost_grad", (xyz1, xyz2, match), core_ndims=(2, 2, 2),
                                out_core=(((n, 3), jnp.float32), ((m, 3), jnp.float32)))
  else:
    grad1, grad2 = _match_cost_grad_jnp(xyz1, xyz2, match)
  g = grad_cost[..., None, None]
  # d cost / d match is the distance matrix; under jit it is dropped when match is a constant.
  grad_match = g * jnp.sqrt(_sq_dist_matrix(xyz1, xyz2))
  return g * grad1, g * grad2, grad_match


_match_cost.defvjp(_match_cost_fwd, _match_cost_bwd)


def match_cost(xyz1: jax.Array, xyz2: jax.Array, match: jax.Array, *, impl: str = "ffi") -> jax.Array:
  """Transport cost of ``match``: ``sum_{l,k} match[..., l, k] * ||xyz1[k] - xyz2[l]||``.

  Args:
    xyz1: float32 [..., n, 3].
    xyz2: float32 [..., m, 3].
    match: float32 [..., m, n] (e.g. from ``approx_match``).
    impl: "ffi" or "jnp".
  Returns:
    cost float32 [...]; differentiable w.r.t. xyz1, xyz2 (and match).
  """
  _checks.check_impl(impl)
  _check_pair(xyz1, xyz2)
  want = tuple(xyz1.shape[:-2]) + (xyz2.shape[-2], xyz1.shape[-2])
  if tuple(getattr(match, "shape", ())) != want:
    raise ValueError(f"match must have shape [..., m, n] = {want}, got {tuple(getattr(match, 'shape', ()))}")
  _checks.check_float_dtype(match, "match")
  dtype = _checks.out_dtype(xyz1, xyz2, match)
  return _match_cost(*_checks.to_f32(xyz1, xyz2, match), impl).astype(dtype)


def earth_mover_distance(xyz1: jax.Array, xyz2: jax.Array, *, impl: str = "ffi") -> jax.Array:
  """Approximate EMD of the original: ``match_cost(xyz1, xyz2, approx_match(xyz1, xyz2))`` per example.

  The match is a constant, so the gradient w.r.t. both point sets is ``MatchCostGrad``. Note the value is a
  sum over ~max(n, m) matched pairs, not a mean (the original divides it by 1000 in the loss/metric).

  Args:
    xyz1, xyz2: float32 [..., n, 3] and [..., m, 3].
    impl: "ffi" or "jnp".
  Returns:
    float32 [...].
  """
  _checks.check_impl(impl)
  _check_pair(xyz1, xyz2)
  dtype = _checks.out_dtype(xyz1, xyz2)
  xyz1, xyz2 = _checks.to_f32(xyz1, xyz2)  # the match stays float32 whatever the input dtype
  match = jax.lax.stop_gradient(_approx_match_f32(xyz1, xyz2, impl))
  return _match_cost(xyz1, xyz2, match, impl).astype(dtype)
