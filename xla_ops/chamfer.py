"""Nearest-neighbour distances between two point sets and the Chamfer distance built on them.

``nn_distance`` is the original ``NnDistance`` op: for every point of ``a`` the squared distance to (and the
index of) its nearest point in ``b``, and the same from ``b`` to ``a``; ties go to the lowest index. The
custom call returns only the indices' winners; the distances are recomputed in jnp from a gather, so their
gradient (to both inputs) is exactly the original ``NnDistanceGrad`` and no ``N x M`` matrix is ever built.

The CPU handler is exact (same float32 distances and tie rule as brute force): brute force for small
clouds, otherwise a k-d tree per point set and batch item with branch-and-bound queries: about
O((N + M) log(N + M)) time per example on typical clouds (O(N * M) in the worst case) and O(B * (N + M))
memory.

NaN/Inf (impl="ffi"): a NaN distance never wins a comparison and each search starts from (+inf, index 0),
so a query with no finite candidate distance (a NaN/Inf coordinate in the query, or in every point of the
other set) gets index 0, and its distance, recomputed from that pair, is NaN or Inf. Points with a NaN/Inf
coordinate never win for other queries; rows not touching them are unaffected. impl="jnp" uses
``jnp.argmin``, which instead returns the first NaN distance's index.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from xla_ops import _checks, _jnp
from xla_ops._ffi import batched_call


def _gather(points: jax.Array, idx: jax.Array) -> jax.Array:
  """points [..., M, C], idx [..., K] -> [..., K, C]."""
  return jnp.take_along_axis(points, idx[..., None], axis=-2)


def _sq_dist_to(x: jax.Array, y: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.sum((x - _gather(y, idx)) ** 2, axis=-1)


def _nn_indices_ffi(a, b):
  _, idx_ab, _, idx_ba = batched_call(
      "xla_ops_nn_distance", (a, b), core_ndims=(2, 2),
      out_core=(((a.shape[-2],), jnp.float32), ((a.shape[-2],), jnp.int32),
                ((b.shape[-2],), jnp.float32), ((b.shape[-2],), jnp.int32)))
  return idx_ab, idx_ba


def _nearest_jnp(x, y, chunk: int = 1024):
  """Index of the nearest point of y for every point of x, ``chunk`` queries at a time (jnp baseline)."""
  nearest = lambda q, p: (jnp.argmin(jnp.sum((q - p) ** 2, axis=-1)).astype(jnp.int32),)  # noqa: E731
  return _jnp.map_queries(nearest, x, y, chunk)[0]


def _nn_distance_f32(a, b, impl, valid_a=None, valid_b=None):
  """nn_distance of float32 a [..., N, 3], b [..., M, 3] (checked); distances float32.

  valid_a [..., N] / valid_b [..., M]: optional masks of the real points (ragged batches). Padded points are
  moved to +inf for the search, so they never win (the kernels' documented non-finite rule), and zeroed
  for the distances, so whatever they hold (NaN included) reaches neither values nor gradients. Padded
  queries, and real queries whose other set is empty, get distance 0 and index -1.
  """
  if valid_a is None and valid_b is None:
    sa, sb = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
    if impl == "ffi":
      idx_ab, idx_ba = _nn_indices_ffi(sa, sb)
    else:
      idx_ab, idx_ba = _nearest_jnp(sa, sb), _nearest_jnp(sb, sa)
    return _sq_dist_to(a, b, idx_ab), idx_ab, _sq_dist_to(b, a, idx_ba), idx_ba
  valid_a = jnp.ones(a.shape[:-1], bool) if valid_a is None else valid_a
  valid_b = jnp.ones(b.shape[:-1], bool) if valid_b is None else valid_b
  a = jnp.where(valid_a[..., None], a, 0.0)
  b = jnp.where(valid_b[..., None], b, 0.0)
  sa = jnp.where(valid_a[..., None], jax.lax.stop_gradient(a), jnp.inf)
  sb = jnp.where(valid_b[..., None], jax.lax.stop_gradient(b), jnp.inf)
  if impl == "ffi":
    idx_ab, idx_ba = _nn_indices_ffi(sa, sb)
  else:
    idx_ab, idx_ba = _nearest_jnp(sa, sb), _nearest_jnp(sb, sa)
  real_ab = valid_a & jnp.any(valid_b, axis=-1, keepdims=True)
  real_ba = valid_b & jnp.any(valid_a, axis=-1, keepdims=True)
  # Indices of the masked rows may be anything in range (a NaN search); the clean points keep them finite.
  d_ab = jnp.where(real_ab, _sq_dist_to(a, b, idx_ab), 0.0)
  d_ba = jnp.where(real_ba, _sq_dist_to(b, a, idx_ba), 0.0)
  return d_ab, jnp.where(real_ab, idx_ab, -1), d_ba, jnp.where(real_ba, idx_ba, -1)


def _check_pair(a, b, impl):
  _checks.check_impl(impl)
  _checks.check_points(a, "a")
  _checks.check_points(b, "b")
  _checks.check_same_batch("a", a.shape[:-2], "b", b.shape[:-2])


def nn_distance(a: jax.Array, b: jax.Array, *, lengths_a: jax.Array | None = None,
                lengths_b: jax.Array | None = None, impl: str = "ffi"):
  """Nearest neighbours in both directions.

  Args:
    a: float32 [..., N, 3] (float16 / bfloat16: computed in float32).
    b: float32 [..., M, 3], same batch shape as ``a``.
    lengths_a, lengths_b: optional int32 [...] numbers of real points per example (ragged batches, PyTorch3D's
      ``lengths1/lengths2``): points at positions >= the length are padding, never chosen as neighbours,
      and whatever they hold never reaches the results or gradients.
    impl: "ffi" (custom call) or "jnp" (chunked pure-jnp baseline).
  Returns:
    (dist_ab [..., N], idx_ab [..., N] i32, dist_ba [..., M], idx_ba [..., M] i32); distances are squared,
    in the promoted input dtype; differentiable w.r.t. ``a`` and ``b`` through the distances. With lengths,
    padded rows (and rows whose other set has length 0) hold distance 0 and index -1.
  """
  _check_pair(a, b, impl)
  dtype = _checks.out_dtype(a, b)
  batch = tuple(a.shape[:-2])
  valid_a = _checks.check_lengths(lengths_a, "lengths_a", batch, a.shape[-2])
  valid_b = _checks.check_lengths(lengths_b, "lengths_b", batch, b.shape[-2])
  d_ab, idx_ab, d_ba, idx_ba = _nn_distance_f32(*_checks.to_f32(a, b), impl, valid_a, valid_b)
  return d_ab.astype(dtype), idx_ab, d_ba.astype(dtype), idx_ba


POINT_REDUCTIONS = ("mean", "sum", "max", "none")
REDUCTIONS = ("mean", "sum", "none")


def _euclidean(d2: jax.Array) -> jax.Array:
  """sqrt of squared distances with gradient 0 (not inf) where the distance is 0."""
  positive = d2 > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, d2, 1.0)), 0.0)


def _reduce_points(d: jax.Array, point_reduction: str, valid: jax.Array | None = None) -> jax.Array:
  if point_reduction == "mean" and valid is not None:
    count = jnp.sum(valid, axis=-1)
    return jnp.sum(d, axis=-1) / jnp.maximum(count, 1).astype(d.dtype)
  if point_reduction == "mean":
    return jnp.mean(d, axis=-1)
  if point_reduction == "sum":
    return jnp.sum(d, axis=-1)
  return jnp.max(d, axis=-1)


def chamfer_distance(a: jax.Array, b: jax.Array, *, weight_ab: float = 1.0, weight_ba: float = 1.0,
                     reduction: str = "mean", point_reduction: str = "mean", single_directional: bool = False,
                     squared: bool = True, weights: jax.Array | None = None, lengths_a: jax.Array | None = None,
                     lengths_b: jax.Array | None = None, impl: str = "ffi"):
  """Chamfer distance; by default ``mean over examples of (weight_ab * mean_i d(a_i, b) + weight_ba * mean_j
  d(b_j, a))`` with squared distances d (the original's loss).

  Args:
    a, b: float32 / float16 / bfloat16 [..., N, 3] and [..., M, 3], same batch shape.
    weight_ab, weight_ba: weights of the two directions (the original sparse loss uses 0.55 on pred->gt).
    reduction: over the examples: "mean" (of the per-example values; with ``weights``, the weighted mean
      ``sum(w * x) / sum(w)``, 0 when ``sum(w) == 0``, as PyTorch3D), "sum", or "none" (per example [...]).
    point_reduction: over each example's points, per direction: "mean", "sum", "max" (with
      ``squared=False`` and unit weights, the Hausdorff distance: the two directions are combined by max, as
      PyTorch3D) or "none" (per-point values; then ``reduction`` must be "none").
    single_directional: only the a -> b term (``weight_ba`` is ignored), as PyTorch3D's option.
    squared: squared Euclidean distances (default) or, if False, Euclidean distances (their gradient at a
      zero distance is 0).
    weights: optional per-example weights, shape = the batch shape [...] (not checked for sign).
    lengths_a, lengths_b: optional int32 [...] real points per example (ragged batches, PyTorch3D's
      ``x_lengths/y_lengths``): padded points are never neighbours and never counted; "mean" divides by each
      example's length; per-point outputs are 0 beyond a length; a direction whose queries (or targets)
      are all padding contributes 0.
    impl: "ffi" or "jnp" (for the nearest-neighbour search).
  Returns:
    point_reduction != "none": a scalar (reduction "mean" / "sum") or [...] ("none").
    point_reduction == "none": per-point values ``(weight_ab * w * d_ab [..., N], weight_ba * w * d_ba
    [..., M])``, or just the first array when ``single_directional``.
    Floating results have the promoted input dtype (computed and reduced in float32).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
  if point_reduction not in POINT_REDUCTIONS:
    raise ValueError(f"point_reduction must be one of {POINT_REDUCTIONS}, got {point_reduction!r}")
  if point_reduction == "none" and reduction != "none":
    raise ValueError(f"point_reduction='none' returns per-point values: reduction must be 'none', got {reduction!r}")
  _check_pair(a, b, impl)
  batch = tuple(a.shape[:-2])
  if weights is not None:
    _checks.check_float_dtype(weights, "weights")
    if tuple(weights.shape) != batch:
      raise ValueError(f"weights must have the batch shape {batch}, got shape {tuple(weights.shape)}")
  dtype = _checks.out_dtype(a, b) if weights is None else _checks.out_dtype(a, b, weights)
  valid_a = _checks.check_lengths(lengths_a, "lengths_a", batch, a.shape[-2])
  valid_b = _checks.check_lengths(lengths_b, "lengths_b", batch, b.shape[-2])
  d_ab, _, d_ba, _ = _nn_distance_f32(*_checks.to_f32(a, b), impl, valid_a, valid_b)  # reduced in float32
  if not squared:
    d_ab, d_ba = _euclidean(d_ab), _euclidean(d_ba)
  w = None if weights is None else _checks.to_f32(weights)[0]
  if point_reduction == "none":
    scale = (lambda d: d) if w is None else (lambda d: d * w[..., None])
    out_ab = scale(weight_ab * d_ab).astype(dtype)
    return out_ab if single_directional else (out_ab, scale(weight_ba * d_ba).astype(dtype))
  # Padded entries are 0, so sum and max (of values >= 0) need no mask; mean divides by the real count.
  term_ab = weight_ab * _reduce_points(d_ab, point_reduction, valid_a)
  if single_directional:
    per_example = term_ab
  else:
    term_ba = weight_ba * _reduce_points(d_ba, point_reduction, valid_b)
    per_example = jnp.maximum(term_ab, term_ba) if point_reduction == "max" else term_ab + term_ba
  if w is not None:
    per_example = per_example * w
  if reduction == "none":
    out = per_example
  elif reduction == "sum":
    out = jnp.sum(per_example)
  elif w is None:
    out = jnp.mean(per_example)
  else:
    total = jnp.sum(w)
    out = jnp.where(total != 0, jnp.sum(per_example) / jnp.where(total != 0, total, 1.0), 0.0)
  return out.astype(dtype)
