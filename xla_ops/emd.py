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

NaN/Inf: an example with any non-finite coordinate (of its real points) gets an all-NaN ``match`` (both impls;
the sums would spread it anyway), so its ``earth_mover_distance`` and gradient are NaN; other examples are
unaffected.

Memory: ``approx_match`` returns the dense ``[..., m, n]`` match (1 GiB per example at 16384 points).
``earth_mover_distance`` (impl "ffi") never forms it: the ``xla_ops_emd`` custom call runs the same rounds
keeping only their per-point factors (match[l, k] = sum_r exp(level_r d^2) ratio_l_r[k] ratio_r_r[l]: 10 x
(n + m) floats per example) and rebuilds each match row on the fly to add its cost and gradient terms, so
value and gradient take O(B (n + m)) memory. Its match entries are approx_match's (same culling, same float
operations), its sums run in another order: values and gradients agree with ``match_cost(approx_match(...))``
to float32 rounding (tests: rtol 1e-5).

Ragged batches: ``lengths_a`` / ``lengths_b`` (int32 [...]) give the numbers of real points of ``xyz1`` /
``xyz2`` per example (PyTorch3D's ``lengths1/lengths2``). Points at positions >= the length are padding:
they have no mass (the masses use the per-example n_i and m_i), whatever they hold never reaches a result,
their match rows/columns and gradients are 0, and an example with a length 0 has EMD 0. With the CPU custom
calls a padded example gives exactly (bit for bit) the results of its unpadded clouds (jnp: to rounding).

Scale: the levels -4^j are absolute (the sharpest kernel exp(-16384 d^2) has a width of ~0.01), so the
approximation depends on the clouds' scale (docs/ops.md, "EMD"). ``earth_mover_distance(...,
normalize_scale=True)`` matches the clouds divided by a per-example scale s (the largest side of the joint
bounding box of both clouds' real points; 1 where that is 0) and returns s * EMD(xyz1 / s, xyz2 / s).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from xla_ops import _checks
from xla_ops._ffi import batched_call

NUM_ROUNDS = 10  # j = 7, 6, ..., -2


def _sq_dist_matrix(xyz1, xyz2):
  """[..., n, 3], [..., m, 3] -> [..., m, n] squared distances."""
  return jnp.sum((xyz2[..., :, None, :] - xyz1[..., None, :, :]) ** 2, axis=-1)


def _per_example_masses(n_i, m_i):
  """Masses of one xyz1 / xyz2 point per example from the real counts n_i, m_i (int32 [...])."""
  n_safe, m_safe = jnp.maximum(n_i, 1), jnp.maximum(m_i, 1)
  mass_l = jnp.where(n_i >= m_i, 1, m_safe // n_safe).astype(jnp.float32)
  mass_r = jnp.where(n_i >= m_i, n_safe // m_safe, 1).astype(jnp.float32)
  return mass_l, mass_r


def _valid(xyz, lengths):
  """bool [..., n]: which of xyz's [..., n, 3] points are real (position < the example's length)."""
  return jnp.arange(xyz.shape[-2]) < lengths[..., None]


def _approx_match_jnp(xyz1, xyz2, lengths1, lengths2):
  """The GPU algorithm over the dense [m, n] matrices (baseline). lengths1/2: int32 [...] real points."""
  n, m = xyz1.shape[-2], xyz2.shape[-2]
  batch = xyz1.shape[:-2]
  valid1, valid2 = _valid(xyz1, lengths1), _valid(xyz2, lengths2)
  xyz1, xyz2 = _zero_padding(xyz1, xyz2, lengths1, lengths2)
  d2 = _sq_dist_matrix(xyz1, xyz2)
  mass_l, mass_r = _per_example_masses(lengths1, lengths2)

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

  init = (jnp.zeros(batch + (m, n), jnp.float32), jnp.where(valid1, mass_l[..., None], 0.0),
          jnp.where(valid2, mass_r[..., None], 0.0))
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


def _emd_workspace(n: int, m: int) -> int:
  """float32 elements per example of the xla_ops_emd workspace (CUDA handler only): approx_match's, plus every
  round's ratio_l [n] and ratio_r [m] and the per-row costs [m] (csrc/cuda/emd.cu)."""
  return _approx_match_workspace(n, m) + NUM_ROUNDS * (n + m) + m


def _check_pair(xyz1, xyz2):
  _checks.check_points(xyz1, "xyz1")
  _checks.check_points(xyz2, "xyz2")
  _checks.check_same_batch("xyz1", xyz1.shape[:-2], "xyz2", xyz2.shape[:-2])


def _lengths(xyz1, xyz2, lengths_a, lengths_b):
  """Checked per-example lengths as int32 [...] (the full counts where None), clipped to [0, n] / [0, m]."""
  batch, n, m = tuple(xyz1.shape[:-2]), xyz1.shape[-2], xyz2.shape[-2]
  _checks.check_lengths(lengths_a, "lengths_a", batch, n)
  _checks.check_lengths(lengths_b, "lengths_b", batch, m)
  full = lambda lengths, count: (jnp.full(batch, count, jnp.int32) if lengths is None
                                 else jnp.clip(jnp.asarray(lengths), 0, count))
  return full(lengths_a, n), full(lengths_b, m)


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


def approx_match(xyz1: jax.Array, xyz2: jax.Array, *, lengths_a: jax.Array | None = None,
                 lengths_b: jax.Array | None = None, impl: str = "ffi") -> jax.Array:
  """Approximate optimal transport plan between two point sets (the original ``ApproxMatch``).

  Args:
    xyz1: float32 [..., n, 3].
    xyz2: float32 [..., m, 3], same batch shape.
    lengths_a, lengths_b: optional int32 [...] real points of xyz1 / xyz2 per example (ragged batches); the
      masses use these counts, padded points get match 0.
    impl: "ffi" (custom call; O(n + m) memory besides the output) or "jnp" (dense baseline).
  Returns:
    match float32 [..., m, n] (a constant: gradients through it are zero); 0 in padded rows and columns.
  Raises:
    ValueError when that matrix alone would not fit in the default device's free memory (use
    ``earth_mover_distance``, which never forms it).
  """
  _checks.check_impl(impl)
  _check_pair(xyz1, xyz2)
  lengths1, lengths2 = _lengths(xyz1, xyz2, lengths_a, lengths_b)
  dtype = _checks.out_dtype(xyz1, xyz2)
  xyz1, xyz2 = _checks.to_f32(xyz1, xyz2)
  if lengths_a is not None or lengths_b is not None:
    xyz1, xyz2 = _zero_padding(xyz1, xyz2, lengths1, lengths2)
  return _approx_match_f32(xyz1, xyz2, lengths1, lengths2, impl).astype(dtype)


def _approx_match_f32(xyz1, xyz2, lengths1, lengths2, impl):
  _check_match_fits(xyz1, xyz2)
  xyz1, xyz2 = jax.lax.stop_gradient(xyz1), jax.lax.stop_gradient(xyz2)
  if impl == "jnp":
    return _approx_match_jnp(xyz1, xyz2, lengths1, lengths2)
  n, m = xyz1.shape[-2], xyz2.shape[-2]
  match, _ = batched_call("xla_ops_approx_match", (xyz1, xyz2, lengths1, lengths2), core_ndims=(2, 2, 0, 0),
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


def _zero_padding(xyz1, xyz2, lengths1, lengths2):
  """Zeroes the coordinates of padded points (the CUDA kernels give them no mass but still read them; NaN
  padding would poison 0 * exp(...)). Their gradients are 0."""
  return (jnp.where(_valid(xyz1, lengths1)[..., None], xyz1, 0.0),
          jnp.where(_valid(xyz2, lengths2)[..., None], xyz2, 0.0))


def _mask_match(xyz1, xyz2, match, lengths1, lengths2):
  """Zeroes padded points and the match rows / columns of padded points."""
  valid1, valid2 = _valid(xyz1, lengths1), _valid(xyz2, lengths2)
  return (*_zero_padding(xyz1, xyz2, lengths1, lengths2),
          jnp.where(valid2[..., :, None] & valid1[..., None, :], match, 0.0))


def match_cost(xyz1: jax.Array, xyz2: jax.Array, match: jax.Array, *, lengths_a: jax.Array | None = None,
               lengths_b: jax.Array | None = None, impl: str = "ffi") -> jax.Array:
  """Transport cost of ``match``: ``sum_{l,k} match[..., l, k] * ||xyz1[k] - xyz2[l]||``.

  Args:
    xyz1: float32 [..., n, 3].
    xyz2: float32 [..., m, 3].
    match: float32 [..., m, n] (e.g. from ``approx_match``).
    lengths_a, lengths_b: optional int32 [...] real points per example: padded points and their match rows /
      columns are left out of the sum (their gradients are 0).
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
  xyz1, xyz2, match = _checks.to_f32(xyz1, xyz2, match)
  if lengths_a is not None or lengths_b is not None:
    xyz1, xyz2, match = _mask_match(xyz1, xyz2, match, *_lengths(xyz1, xyz2, lengths_a, lengths_b))
  return _match_cost(xyz1, xyz2, match, impl).astype(dtype)


def _emd_call(xyz1, xyz2, lengths1, lengths2, with_grad: bool):
  n, m = xyz1.shape[-2], xyz2.shape[-2]
  cost, grad1, grad2, _ = batched_call(
      "xla_ops_emd", (xyz1, xyz2, lengths1, lengths2), core_ndims=(2, 2, 0, 0),
      out_core=(((), jnp.float32), ((n, 3), jnp.float32), ((m, 3), jnp.float32),
                ((_emd_workspace(n, m),), jnp.float32)), with_grad=np.int32(with_grad))
  return cost, grad1, grad2


@jax.custom_vjp
def _emd_ffi(xyz1, xyz2, lengths1, lengths2):
  """approx_match + match_cost in one custom call that never forms the match: the value alone when not
  differentiated, value and both gradients (kept as residuals) under jax.grad."""
  return _emd_call(xyz1, xyz2, lengths1, lengths2, with_grad=False)[0]


def _emd_ffi_fwd(xyz1, xyz2, lengths1, lengths2):
  cost, grad1, grad2 = _emd_call(xyz1, xyz2, lengths1, lengths2, with_grad=True)
  return cost, (grad1, grad2, lengths1, lengths2)


def _emd_ffi_bwd(residuals, grad_cost):
  grad1, grad2, lengths1, lengths2 = residuals
  g = grad_cost[..., None, None]
  return (g * grad1, g * grad2, np.zeros(lengths1.shape, jax.dtypes.float0),
          np.zeros(lengths2.shape, jax.dtypes.float0))


_emd_ffi.defvjp(_emd_ffi_fwd, _emd_ffi_bwd)


def _joint_scale(xyz1, xyz2, lengths1, lengths2):
  """Largest side of the joint bounding box of both clouds' real points, [...] (1 where it is 0 or empty)."""
  valid1, valid2 = _valid(xyz1, lengths1)[..., None], _valid(xyz2, lengths2)[..., None]
  lo = jnp.minimum(jnp.min(jnp.where(valid1, xyz1, jnp.inf), axis=-2), jnp.min(jnp.where(valid2, xyz2, jnp.inf), axis=-2))
  hi = jnp.maximum(jnp.max(jnp.where(valid1, xyz1, -jnp.inf), axis=-2), jnp.max(jnp.where(valid2, xyz2, -jnp.inf), axis=-2))
  side = jnp.max(hi - lo, axis=-1)
  return jnp.where((side > 0) & jnp.isfinite(side), side, jnp.where(jnp.isnan(side), jnp.nan, 1.0))


def earth_mover_distance(xyz1: jax.Array, xyz2: jax.Array, *, lengths_a: jax.Array | None = None,
                         lengths_b: jax.Array | None = None, normalize_scale: bool = False,
                         impl: str = "ffi") -> jax.Array:
  """Approximate EMD of the original: ``match_cost(xyz1, xyz2, approx_match(xyz1, xyz2))`` per example.

  The match is a constant, so the gradient w.r.t. both point sets is ``MatchCostGrad``. Note the value is a
  sum over ~max(n, m) matched pairs, not a mean (the original divides it by 1000 in the loss/metric).

  Args:
    xyz1, xyz2: float32 [..., n, 3] and [..., m, 3].
    lengths_a, lengths_b: optional int32 [...] real points of xyz1 / xyz2 per example (ragged batches); an
      example with a length 0 has EMD 0.
    normalize_scale: match at unit scale: with s = the largest side of the joint bounding box of both clouds'
      real points (per example; 1 where 0), returns s * EMD(xyz1 / s, xyz2 / s). The plain form's result
      depends on the clouds' scale (the kernel widths are absolute); this one does not (up to rounding).
    impl: "ffi": one custom call, O(B (n + m)) memory for value and gradient (the match is never formed;
      16384 points are fine); "jnp": the dense baseline (B x m x n matrices).
  Returns:
    float32 [...].
  """
  _checks.check_impl(impl)
  _check_pair(xyz1, xyz2)
  lengths1, lengths2 = _lengths(xyz1, xyz2, lengths_a, lengths_b)
  dtype = _checks.out_dtype(xyz1, xyz2)
  xyz1, xyz2 = _checks.to_f32(xyz1, xyz2)  # the match stays float32 whatever the input dtype
  if lengths_a is not None or lengths_b is not None:
    xyz1, xyz2 = _zero_padding(xyz1, xyz2, lengths1, lengths2)
  scale = None
  if normalize_scale:
    # The gradient through s is exactly 0 for a constant match (the cost is homogeneous of degree 1).
    scale = jax.lax.stop_gradient(_joint_scale(xyz1, xyz2, lengths1, lengths2))
    xyz1, xyz2 = xyz1 / scale[..., None, None], xyz2 / scale[..., None, None]
  if impl == "ffi":
    cost = _emd_ffi(xyz1, xyz2, lengths1, lengths2)
  else:
    match = jax.lax.stop_gradient(_approx_match_f32(xyz1, xyz2, lengths1, lengths2, impl))
    cost = _match_cost(*_mask_match(xyz1, xyz2, match, lengths1, lengths2), impl)
  if scale is not None:
    cost = cost * scale
  return cost.astype(dtype)
