"""Three-nearest-neighbour interpolation (the PointNet++ feature-propagation ops of the original).

* ``three_nn``: for every unknown point, the 3 nearest known points (squared distances, ascending, ties to
  the lowest index). With fewer than 3 known points the missing slots get idx 0 and distance +inf (weight 0).
  The custom call returns the indices; the distances are recomputed in jnp from a gather, so they are
  differentiable w.r.t. both point sets (the original had no gradient).
* ``three_interpolate``: ``sum_i weight_i * features[idx_i]``, differentiable w.r.t. features (a
  deterministic scatter-add custom call: every output element is summed by one thread in ascending
  (point, neighbour) order) and weight (a gather-dot in jnp).
* ``inverse_distance_weights``: the original TF weights ``1 / max(d, 1e-10)``, normalised; a row with no
  finite distance (no neighbour at all) gets weights 0 (the original would divide 0 by 0).

Ragged batches: ``three_nn`` takes ``lengths_unknown`` / ``lengths_known``. Padded known points are never
neighbours (moved to +inf for the search, zeroed for the distances); an example with fewer than 3 real known
points fills the missing slots as an unpadded cloud of that size does (idx 0, dist +inf, weight 0); padded
unknown rows get idx 0 and dist +inf in every slot, so ``inverse_distance_weights`` gives them weight 0 and
``three_interpolate`` a zero output row with no gradient to ``features``. ``three_interpolate`` takes no
lengths: it searches nothing and only reads the rows ``idx`` names. One caveat: an example with no known
point at all has idx 0 pointing at a padding row; its weight is 0, but 0 * NaN is NaN, so if that padding
holds non-finite features, mask those outputs (or zero the padding).

NaN/Inf: in ``three_nn`` a NaN distance never wins a comparison, so a query whose candidates are all NaN gets
idx 0 in every slot and the distance recomputed from that pair (NaN). ``three_interpolate`` propagates NaN
in features or weight to the outputs that use them. Indices outside ``[0, m)``: the CPU custom call raises
an INVALID_ARGUMENT error, the CUDA one and ``impl="jnp"`` read zeros for them.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from xla_ops import _checks
from xla_ops._ffi import batched_call


def _gather(points: jax.Array, idx: jax.Array) -> jax.Array:
  """points [..., m, C], idx [..., n, K] -> [..., n, K, C]; out-of-range indices read zeros."""
  flat = idx.reshape(idx.shape[:-2] + (-1,))
  out = jnp.take_along_axis(points, flat[..., None], axis=-2, mode="fill", fill_value=0)
  return out.reshape(idx.shape + (points.shape[-1],))


def _three_nn_jnp(unknown, known):
  """Indices [..., n, 3] of the 3 nearest known points by a dense distance matrix (baseline)."""
  d = jnp.sum((unknown[..., :, None, :] - known[..., None, :, :]) ** 2, axis=-1)
  # NaN ranks as +inf (after every finite distance), as in the kernels: top_k alone would order a NaN by its
  # sign bit, which depends on how XLA fused the subtraction.
  d = jnp.where(jnp.isnan(d), jnp.inf, d)
  k = min(3, known.shape[-2])
  _, idx = jax.lax.top_k(-d, k)  # top_k is stable: ties keep the lower index first
  return jnp.pad(idx.astype(jnp.int32), [(0, 0)] * (idx.ndim - 1) + [(0, 3 - k)])


def three_nn(unknown: jax.Array, known: jax.Array, *, lengths_unknown: jax.Array | None = None,
             lengths_known: jax.Array | None = None, impl: str = "ffi"):
  """The 3 nearest known points of every unknown point.

  Args:
    unknown: float32 [..., n, 3].
    known: float32 [..., m, 3], same batch shape (m >= 1).
    lengths_unknown, lengths_known: optional int32 [...] real points per example (ragged batches; module
      docstring): padded known points are never neighbours, padded unknown rows get idx 0 and dist +inf.
    impl: "ffi" (custom call) or "jnp" (dense baseline).
  Returns:
    (dist [..., n, 3] f32 squared and ascending, idx [..., n, 3] i32); slots beyond m (or beyond an
    example's known length) get idx 0, dist +inf.
  """
  _checks.check_impl(impl)
  _checks.check_points(unknown, "unknown")
  _checks.check_points(known, "known")
  _checks.check_same_batch("unknown", unknown.shape[:-2], "known", known.shape[:-2])
  dtype = _checks.out_dtype(unknown, known)
  batch = tuple(unknown.shape[:-2])
  valid_u = _checks.check_lengths(lengths_unknown, "lengths_unknown", batch, unknown.shape[-2])
  valid_k = _checks.check_lengths(lengths_known, "lengths_known", batch, known.shape[-2])
  unknown, known = _checks.to_f32(unknown, known)
  if valid_u is not None:
    unknown = jnp.where(valid_u[..., None], unknown, 0.0)
  if valid_k is not None:
    known = jnp.where(valid_k[..., None], known, 0.0)
  su, sk = jax.lax.stop_gradient(unknown), jax.lax.stop_gradient(known)
  if valid_k is not None:
    sk = jnp.where(valid_k[..., None], sk, jnp.inf)
  if impl == "ffi":
    n = unknown.shape[-2]
    _, idx = batched_call("xla_ops_three_nn", (su, sk), core_ndims=(2, 2),
                          out_core=(((n, 3), jnp.float32), ((n, 3), jnp.int32)))
  else:
    idx = _three_nn_jnp(su, sk)
  n_known = known.shape[-2] if valid_k is None else jnp.sum(valid_k, axis=-1)[..., None, None]
  real = jnp.arange(3) < n_known  # slots with a neighbour
  if valid_u is not None:
    real = real & valid_u[..., None]
  idx = jnp.where(real, idx, 0)  # the jnp top_k would name +inf padding in slots beyond the known length
  dist = jnp.sum((unknown[..., :, None, :] - _gather(known, idx)) ** 2, axis=-1)
  return jnp.where(real, dist, jnp.inf).astype(dtype), idx


def _scatter_features_jnp(grad_out, idx, weight, npoints):
  """grad_out [..., n, C] -> [..., npoints, C]: sum over (i, j) of weight[i, j] * grad_out[i] at idx[i, j]."""
  batch = idx.shape[:-2]
  contrib = weight[..., None] * grad_out[..., :, None, :]  # [..., n, 3, C]

  def one(c, i):
    return jnp.zeros((npoints, c.shape[-1]), c.dtype).at[i.reshape(-1)].add(
        c.reshape(-1, c.shape[-1]), mode="drop")

  fn = one
  for _ in batch:
    fn = jax.vmap(fn)
  return fn(contrib, idx)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _three_interpolate(features, idx, weight, impl):
  if impl == "ffi":
    n, c = idx.shape[-2], features.shape[-1]
    (out,) = batched_call("xla_ops_three_interpolate", (features, idx, weight), core_ndims=(2, 2, 2),
                          out_core=(((n, c), jnp.float32),))
    return out
  return jnp.sum(weight[..., None] * _gather(features, idx), axis=-2)


def _three_interpolate_fwd(features, idx, weight, impl):
  return _three_interpolate(features, idx, weight, impl), (features, idx, weight)


def _three_interpolate_bwd(impl, residuals, grad_out):
  features, idx, weight = residuals
  npoints = features.shape[-2]
  if impl == "ffi":
    (grad_features,) = batched_call(
        "xla_ops_three_interpolate_grad", (grad_out, idx, weight), core_ndims=(2, 2, 2),
        out_core=(((npoints, features.shape[-1]), jnp.float32),), npoints=np.int32(npoints))
  else:
    grad_features = _scatter_features_jnp(grad_out, idx, weight, npoints)
  grad_weight = jnp.einsum("...nc,...nkc->...nk", grad_out, _gather(features, idx))
  return grad_features, None, grad_weight


_three_interpolate.defvjp(_three_interpolate_fwd, _three_interpolate_bwd)


def three_interpolate(features: jax.Array, idx: jax.Array, weight: jax.Array, *, impl: str = "ffi"):
  """Weighted sum of 3 gathered feature vectors per point.

  Args:
    features: float32 [..., m, C].
    idx: int32 [..., n, 3] indices into the m points (e.g. from ``three_nn``).
    weight: float32 [..., n, 3] (e.g. from ``inverse_distance_weights``).
    impl: "ffi" or "jnp".
  Returns:
    float32 [..., n, C]; differentiable w.r.t. features and weight (idx gets none).
  """
  _checks.check_impl(impl)
  _checks.check_points(features, "features", channels=None)
  _checks.check_indices(idx, "idx", ndim_min=2)
  if idx.shape[-1] != 3:
    raise ValueError(f"idx must have shape [..., n, 3], got shape {tuple(idx.shape)}")
  _checks.check_points(weight, "weight", channels=3, min_points=0)
  if weight.shape != idx.shape:
    raise ValueError(f"weight must have the shape of idx {tuple(idx.shape)}, got {tuple(weight.shape)}")
  _checks.check_same_batch("features", features.shape[:-2], "idx", idx.shape[:-2])
  dtype = _checks.out_dtype(features, weight)
  features, weight = _checks.to_f32(features, weight)
  return _three_interpolate(features, idx, weight, impl).astype(dtype)


def inverse_distance_weights(dist: jax.Array) -> jax.Array:
  """Interpolation weights of the original: ``1 / max(dist, 1e-10)`` normalised over the last axis.

  Args:
    dist: float32 [..., n, 3] squared distances (from ``three_nn``; +inf slots get weight 0).
  Returns:
    float32 [..., n, 3], rows summing to 1, or 0 where every distance of the row is +inf (no neighbour,
    e.g. a padded row of a ragged ``three_nn``).
  """
  if getattr(dist, "ndim", 0) < 1 or dist.shape[-1] != 3:
    raise ValueError(f"dist must have shape [..., n, 3], got {getattr(dist, 'shape', type(dist))}")
  _checks.check_float_dtype(dist, "dist")
  (d,) = _checks.to_f32(dist)  # 1e-10 is below float16's range: compute in float32
  w = 1.0 / jnp.maximum(d, 1e-10)
  total = jnp.sum(w, axis=-1, keepdims=True)
  has_neighbour = total > 0  # all +inf gives 0 / 0: weight 0 instead (double where keeps the gradient finite)
  return jnp.where(has_neighbour, w / jnp.where(has_neighbour, total, 1.0), 0.0).astype(dist.dtype)
