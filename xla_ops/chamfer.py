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


def _nn_distance_f32(a, b, impl):
  """nn_distance of float32 a [..., N, 3], b [..., M, 3] (checked); distances float32."""
  sa, sb = jax.lax.stop_gradient(a), jax.lax.stop_gradient(b)
  if impl == "ffi":
    idx_ab, idx_ba = _nn_indices_ffi(sa, sb)
  else:
    idx_ab, idx_ba = _nearest_jnp(sa, sb), _nearest_jnp(sb, sa)
  return _sq_dist_to(a, b, idx_ab), idx_ab, _sq_dist_to(b, a, idx_ba), idx_ba


def _check_pair(a, b, impl):
  _checks.check_impl(impl)
  _checks.check_points(a, "a")
  _checks.check_points(b, "b")
  _checks.check_same_batch("a", a.shape[:-2], "b", b.shape[:-2])


def nn_distance(a: jax.Array, b: jax.Array, *, impl: str = "ffi"):
  """Nearest neighbours in both directions.

  Args:
    a: float32 [..., N, 3] (float16 / bfloat16: computed in float32).
    b: float32 [..., M, 3], same batch shape as ``a``.
    impl: "ffi" (custom call) or "jnp" (chunked pure-jnp baseline).
  Returns:
    (dist_ab [..., N], idx_ab [..., N] i32, dist_ba [..., M], idx_ba [..., M] i32); distances are squared,
    in the promoted input dtype; differentiable w.r.t. ``a`` and ``b`` through the distances.
  """
  _check_pair(a, b, impl)
  dtype = _checks.out_dtype(a, b)
  d_ab, idx_ab, d_ba, idx_ba = _nn_distance_f32(*_checks.to_f32(a, b), impl)
  return d_ab.astype(dtype), idx_ab, d_ba.astype(dtype), idx_ba


def chamfer_distance(a: jax.Array, b: jax.Array, *, weight_ab: float = 1.0, weight_ba: float = 1.0,
                     reduction: str = "mean", impl: str = "ffi") -> jax.Array:
  """Chamfer distance ``weight_ab * mean d(a->b) + weight_ba * mean d(b->a)`` (squared distances).

  Args:
    a, b: float32 [..., N, 3] and [..., M, 3].
    weight_ab, weight_ba: weights of the two directions (the original sparse loss uses 0.55 on pred->gt).
    reduction: "mean" (over batch and points together, as the original), or "none" (per example [...]).
  """
  if reduction not in ("mean", "none"):
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
  _check_pair(a, b, impl)
  dtype = _checks.out_dtype(a, b)
  d_ab, _, d_ba, _ = _nn_distance_f32(*_checks.to_f32(a, b), impl)  # reduced in float32
  per_example = weight_ab * jnp.mean(d_ab, axis=-1) + weight_ba * jnp.mean(d_ba, axis=-1)
  return (jnp.mean(per_example) if reduction == "mean" else per_example).astype(dtype)
