"""Neighbourhoods of points: ball query, grouping (gather) and k-nearest neighbours.

* ``ball_query``: for every query, the first ``nsample`` points of ``xyz`` in index order with squared
  distance ``< radius**2``; unfilled slots repeat the first hit; ``count`` is the number of hits
  (<= nsample). An empty ball gives idx 0 in every slot and count 0 (the original left it uninitialised).
* ``group_points``: gather ``[..., N, C]`` by ``[..., M, K]`` -> ``[..., M, K, C]``; its gradient w.r.t.
  ``points`` is a deterministic scatter-add custom call (each output element is summed by one thread in
  ascending (m, k) order, so it does not depend on the thread count).
* ``knn``: the ``k`` nearest ``ref`` points of every query in any channel count, ascending, ties to the
  lowest index (a point is its own first neighbour when ``query is ref``, unless it has an exact
  duplicate of lower index). The distances are the float32 sums the neighbours were ranked by (the custom
  call's own output, or the jnp sums for ``impl="jnp"``), so they are exactly ascending. A custom JVP makes
  them differentiable w.r.t. ``query`` and ``ref``: its tangent is that of ``|query - ref[idx]|^2``, and the
  ``[..., M, k, C]`` gather it needs is only evaluated when differentiating.

NaN/Inf: a NaN distance counts as +inf. ``knn`` ranks NaN candidates last (lowest index first) and reports
their distance as +inf (their gradient is NaN); ``ball_query`` never accepts a NaN distance (a NaN query
has an empty ball).
Ragged batches: ``ball_query`` and ``knn`` take per-example lengths (see their docstrings; padded points
are moved to +inf for the search and zeroed for the distances). ``group_points`` takes no lengths: it
searches nothing, and the indices it gathers by come from an op that already kept padded points out (ball
query's fills are real hits or 0 / -1; knn's are -1): mask padded rows with ``count`` or ``idx >= 0``.
Indices outside ``[0, N)`` given to ``group_points``: the CPU custom call raises an INVALID_ARGUMENT error;
the CUDA one and ``impl="jnp"`` read zeros for them.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from xla_ops import _checks, _jnp
from xla_ops._ffi import batched_call

_QUERY_CHUNK = 64  # queries per vmapped step of the jnp implementations


def _check_radius(radius) -> float:
  if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
    raise TypeError(f"radius must be a Python or numpy scalar, got {type(radius).__name__}")
  if not (math.isfinite(float(radius)) and float(radius) > 0):
    raise ValueError(f"radius must be a finite number > 0, got {radius}")
  return float(radius)


# ---- ball_query -------------------------------------------------------------------------------------


def _ball_query_one(q: jax.Array, xyz: jax.Array, r2: jax.Array, nsample: int):
  """Masked-cumsum ball query of one query q [3] against xyz [N, 3] -> (idx [nsample], count [])."""
  dx, dy, dz = xyz[:, 0] - q[0], xyz[:, 1] - q[1], xyz[:, 2] - q[2]
  hit = dx * dx + dy * dy + dz * dz < r2
  rank = jnp.cumsum(hit.astype(jnp.int32))  # rank[j] = hits among 0..j
  # The (s+1)-th hit is the first position where rank reaches s+1 (N when there are fewer hits).
  idx = jnp.searchsorted(rank, jnp.arange(1, nsample + 1, dtype=jnp.int32), side="left").astype(jnp.int32)
  count = jnp.minimum(rank[-1], nsample)
  first = jnp.where(count > 0, idx[0], 0)
  return jnp.where(jnp.arange(nsample) < count, idx, first), count


PADDINGS = ("first", "-1")


def ball_query(xyz: jax.Array, new_xyz: jax.Array, radius: float, nsample: int, *, return_dists: bool = False,
               padding: str = "first", lengths_xyz: jax.Array | None = None,
               lengths_new_xyz: jax.Array | None = None, impl: str = "ffi"):
  """Points of ``xyz`` within ``radius`` of every point of ``new_xyz`` (the first ``nsample``, index order).

  Args:
    xyz: float32 [..., N, 3] searched points.
    new_xyz: float32 [..., M, 3] query centres, same batch shape.
    radius: ball radius > 0 (a point is inside when its squared distance is < radius**2 in float32).
    nsample: slots per query, >= 1 (may exceed N: the extra slots are padding).
    return_dists: also return the squared distances of the slots.
    padding: unfilled slots (beyond ``count``): "first" repeats the first hit (PointNet++; an empty ball
      gives index 0), "-1" gives index -1 (PyTorch3D; note that ``group_points`` on CPU rejects -1: mask
      with ``count`` or ``idx >= 0``).
    lengths_xyz, lengths_new_xyz: optional int32 [...] real points per example (ragged batches, PyTorch3D's
      ``lengths2/lengths1``): padded ``xyz`` points are never hits; a padded query row is an empty ball
      (count 0, idx 0 or -1 by ``padding``, dist 0).
    impl: "ffi" (custom call) or "jnp" (masked cumsum, query chunks).
  Returns:
    (idx int32 [..., M, nsample], count int32 [..., M]) and, with ``return_dists``, dist [..., M, nsample]:
    ``|new_xyz - xyz[idx]|^2`` recomputed from the indices (differentiable w.r.t. both inputs, in the promoted
    input dtype), 0 in padded slots with padding "-1" and in empty balls; with "first" the padded slots hold
    the first hit's distance (they refer to that point). idx and count are not differentiable.
  """
  _checks.check_impl(impl)
  _checks.check_points(xyz, "xyz")
  _checks.check_points(new_xyz, "new_xyz", min_points=0)
  _checks.check_same_batch("xyz", xyz.shape[:-2], "new_xyz", new_xyz.shape[:-2])
  radius = _check_radius(radius)
  _checks.check_positive_int(nsample, "nsample")
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
  dtype = _checks.out_dtype(xyz, new_xyz)
  batch = tuple(xyz.shape[:-2])
  valid_x = _checks.check_lengths(lengths_xyz, "lengths_xyz", batch, xyz.shape[-2])
  valid_q = _checks.check_lengths(lengths_new_xyz, "lengths_new_xyz", batch, new_xyz.shape[-2])
  xyz, new_xyz = _checks.to_f32(xyz, new_xyz)
  if valid_x is not None:  # padded points: zeroed for the distances, at +inf (never within radius) for the search
    xyz = jnp.where(valid_x[..., None], xyz, 0.0)
  if valid_q is not None:  # padded queries: zeroed, and their rows emptied below
    new_xyz = jnp.where(valid_q[..., None], new_xyz, 0.0)
  sx, sq = jax.lax.stop_gradient(xyz), jax.lax.stop_gradient(new_xyz)
  if valid_x is not None:
    sx = jnp.where(valid_x[..., None], sx, jnp.inf)
  m = new_xyz.shape[-2]
  if impl == "ffi":
    idx, count = batched_call("xla_ops_ball_query", (sx, sq), core_ndims=(2, 2),
                              out_core=(((m, nsample), jnp.int32), ((m,), jnp.int32)),
                              radius=np.float32(radius), nsample=np.int32(nsample))
  else:
    r2 = jnp.float32(radius) * jnp.float32(radius)
    idx, count = _jnp.map_queries(lambda q, p: _ball_query_one(q, p, r2, nsample), sq, sx, _QUERY_CHUNK)
  if valid_q is not None:
    count = jnp.where(valid_q, count, 0)
    idx = jnp.where(valid_q[..., None], idx, 0)
  real = jnp.arange(nsample, dtype=jnp.int32) < count[..., None]  # [..., M, nsample]
  if not return_dists:
    return (idx, count) if padding == "first" else (jnp.where(real, idx, -1), count)
  # Distances from the indices, in jnp (O(M * nsample) gather): differentiable like knn's.
  dist = jnp.sum((new_xyz[..., :, None, :] - _gather_jnp(xyz, idx)) ** 2, axis=-1)
  if padding == "first":
    return idx, count, jnp.where(count[..., None] > 0, dist, 0.0).astype(dtype)
  return jnp.where(real, idx, -1), count, jnp.where(real, dist, 0.0).astype(dtype)


# ---- group_points -----------------------------------------------------------------------------------


def _gather_jnp(points: jax.Array, idx: jax.Array) -> jax.Array:
  """points [..., N, C], idx [..., M, K] -> [..., M, K, C] (out-of-range indices read zeros)."""
  m, k = idx.shape[-2:]
  flat = idx.reshape(idx.shape[:-2] + (m * k, 1))
  valid = (flat >= 0) & (flat < points.shape[-2])
  out = jnp.where(valid, jnp.take_along_axis(points, flat, axis=-2, mode="clip"), 0)
  return out.reshape(idx.shape + points.shape[-1:])


def _group_points_call(points, idx):
  m, k = idx.shape[-2:]
  (out,) = batched_call("xla_ops_group_points", (points, idx), core_ndims=(2, 2),
                        out_core=(((m, k, points.shape[-1]), jnp.float32),))
  return out


@jax.custom_vjp
def _group_points_ffi(points, idx):
  return _group_points_call(points, idx)


def _group_points_fwd(points, idx):
  return _group_points_call(points, idx), (idx, points.shape[-2])


def _group_points_bwd(res, grad_out):
  idx, npoints = res
  (grad_points,) = batched_call("xla_ops_group_points_grad", (grad_out, idx), core_ndims=(3, 2),
                                out_core=(((npoints, grad_out.shape[-1]), jnp.float32),),
                                npoints=np.int32(npoints))
  return grad_points, None


_group_points_ffi.defvjp(_group_points_fwd, _group_points_bwd)


def group_points(points: jax.Array, idx: jax.Array, *, impl: str = "ffi") -> jax.Array:
  """Gathers point features by neighbourhood indices.

  Args:
    points: float32 [..., N, C].
    idx: int32 [..., M, K] indices in [0, N), same batch shape.
    impl: "ffi" (custom call, scatter-add custom call for the gradient) or "jnp" (take_along_axis).
  Returns:
    float32 [..., M, K, C], differentiable w.r.t. ``points``.
  """
  _checks.check_impl(impl)
  _checks.check_points(points, "points", channels=None)
  _checks.check_indices(idx, "idx", ndim_min=2)
  _checks.check_same_batch("points", points.shape[:-2], "idx", idx.shape[:-2])
  dtype = points.dtype
  (points,) = _checks.to_f32(points)  # the kernels are float32; a gather is exact, so casting back is too
  out = _group_points_ffi(points, idx) if impl == "ffi" else _gather_jnp(points, idx)
  return out.astype(dtype)


# ---- knn ----------------------------------------------------------------------------------------------


def _knn_one(q: jax.Array, ref: jax.Array, k: int):
  """top_k on -distance of one query q [C] against ref [N, C] -> (dist [k], idx [k]); NaN counts as +inf."""
  d = jnp.sum((ref - q) ** 2, axis=-1)
  neg_dist, idx = jax.lax.top_k(-jnp.where(jnp.isnan(d), jnp.inf, d), k)  # stable: ties keep the lower index
  return -neg_dist, idx.astype(jnp.int32)


@jax.custom_jvp
def _differentiable_knn_dist(query, ref, idx, dist):
  """Returns dist [..., M, k] (= |query - ref[idx]|^2 as ranked) with the tangent of that formula.

  query [..., M, C], ref [..., N, C], idx int32 [..., M, k]; dist must not depend on query or ref through
  differentiable operations (its own tangent is ignored).
  """
  del query, ref, idx
  return dist


@_differentiable_knn_dist.defjvp
def _differentiable_knn_dist_jvp(primals, tangents):
  query, ref, idx, dist = primals
  query_dot, ref_dot, _, _ = tangents
  diff = query[..., :, None, :] - _gather_jnp(ref, idx)
  # Linear in (query_dot, ref_dot), so reverse mode transposes it (the gather into a scatter-add).
  diff_dot = query_dot[..., :, None, :] - _gather_jnp(ref_dot, idx)
  return dist, 2 * jnp.sum(diff * diff_dot, axis=-1)


def knn(query: jax.Array, ref: jax.Array, k: int, *, return_sorted: bool = True,
        lengths_query: jax.Array | None = None, lengths_ref: jax.Array | None = None, impl: str = "ffi"):
  """The k nearest points of ``ref`` to every point of ``query``.

  Args:
    query: float32 [..., M, C].
    ref: float32 [..., N, C], same batch shape and channel count C (any C >= 1).
    k: neighbours per query, 1 <= k <= N.
    return_sorted: accepted for PyTorch3D compatibility (``knn_points(..., return_sorted=False)``); the
      neighbours always come back sorted: both implementations produce them in order at no extra cost.
    lengths_query, lengths_ref: optional int32 [...] real points per example (ragged batches, PyTorch3D's
      ``lengths1/lengths2``): padded ref points are never neighbours; slots of padded queries, and slots
      beyond an example's ref length (k > length), hold idx -1 and dist 0.
    impl: "ffi" (custom call) or "jnp" (lax.top_k on -distances, query chunks).
  Returns:
    (dist float32 [..., M, k] squared distances ascending (+inf for NaN ones), idx int32 [..., M, k]);
    ``dist`` is differentiable w.r.t. ``query`` and ``ref``.
  """
  _checks.check_impl(impl)
  if not isinstance(return_sorted, bool):
    raise TypeError(f"return_sorted must be a bool, got {type(return_sorted).__name__}")
  _checks.check_points(query, "query", channels=None, min_points=0)
  _checks.check_points(ref, "ref", channels=None)
  _checks.check_same_batch("query", query.shape[:-2], "ref", ref.shape[:-2])
  if query.shape[-1] != ref.shape[-1]:
    raise ValueError(f"query and ref must have the same channel count, got query shape {query.shape} and "
                     f"ref shape {ref.shape}")
  _checks.check_positive_int(k, "k", upper=ref.shape[-2], upper_name="the number of ref points N")
  dtype = _checks.out_dtype(query, ref)
  batch = tuple(query.shape[:-2])
  valid_q = _checks.check_lengths(lengths_query, "lengths_query", batch, query.shape[-2])
  valid_r = _checks.check_lengths(lengths_ref, "lengths_ref", batch, ref.shape[-2])
  query, ref = _checks.to_f32(query, ref)
  if valid_q is None and valid_r is None:
    dist, idx = _knn_indices(jax.lax.stop_gradient(query), jax.lax.stop_gradient(ref), k, impl)
    return _differentiable_knn_dist(query, ref, idx, dist).astype(dtype), idx
  # Ragged: padded ref points move to +inf for the search (ranked after every real point, NaN ones
  # included, which rank as +inf with a lower index) and every padded value is zeroed for the distances.
  valid_q = jnp.ones(query.shape[:-1], bool) if valid_q is None else valid_q
  valid_r = jnp.ones(ref.shape[:-1], bool) if valid_r is None else valid_r
  query = jnp.where(valid_q[..., None], query, 0.0)
  ref = jnp.where(valid_r[..., None], ref, 0.0)
  search_ref = jnp.where(valid_r[..., None], jax.lax.stop_gradient(ref), jnp.inf)
  dist, idx = _knn_indices(jax.lax.stop_gradient(query), search_ref, k, impl)
  n_ref = jnp.sum(valid_r, axis=-1)[..., None, None]
  real = (jnp.arange(k) < n_ref) & valid_q[..., None]  # [..., M, k]
  idx = jnp.where(real, idx, 0)
  dist = _differentiable_knn_dist(query, ref, idx, jnp.where(real, dist, 0.0))
  return jnp.where(real, dist, 0.0).astype(dtype), jnp.where(real, idx, -1)


def _knn_indices(sq, sr, k, impl):
  """(dist [..., M, k], idx [..., M, k]) of the kernel (or jnp) for constant float32 sq, sr."""
  if impl == "ffi":
    return batched_call("xla_ops_knn", (sq, sr), core_ndims=(2, 2),
                        out_core=(((sq.shape[-2], k), jnp.float32), ((sq.shape[-2], k), jnp.int32)),
                        k=np.int32(k))
  return _jnp.map_queries(lambda q, p: _knn_one(q, p, k), sq, sr, _QUERY_CHUNK)
