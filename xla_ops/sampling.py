"""Farthest point sampling (the original ``farthest_point_sample`` op).

The first pick is index 0; every point keeps its running minimum squared distance to the picked set
(starting at +inf) and the next pick is the argmax, ties going to the lowest index. The output order has the
prefix property: ``fps(P, 4096)[..., :1024] == fps(P, 1024)``. A picked point is never picked again,
whatever its coordinates: its distance is retired to -1. Once every distinct point is picked (inputs with
duplicates, npoint close to N) the remaining distances are 0 and the picks continue with the lowest unpicked
indices, so the output always holds npoint distinct indices.

Differences from the original GPU kernel: its tree reduction breaks ties by thread id, not strictly by the
lowest index, and its running distance starts at 1e38 instead of +inf; the picks agree whenever there are
no exact ties.

Ragged batches (``lengths=``, PyTorch3D's ``sample_farthest_points(points, lengths)``): points at positions
>= an example's length are padding and are never picked while a real point is unpicked; output slots
``t >= length`` hold -1 (so with ``npoint > length`` the first ``length`` slots are the real points' order
and the rest is -1). Implemented in Python on the unchanged kernels: the real points are rolled so that the
start is index 0 (as ``start=`` does, cyclically within the length) and every padded point is overwritten
with a copy of one real point p with finite coordinates (the first one from the start, if any). A copy has
exactly p's running distance until p is picked (so p, at a lower index, wins every tie) and distance 0
afterwards, so it ranks after every unpicked real point (their distances are >= 0, ties to the lower index):
the picks among the real points are those of the unpadded cloud. Whatever the padding held (NaN included)
never reaches the search.

NaN coordinates: a NaN distance never replaces a running minimum, so a NaN point keeps distance +inf and is
picked as soon as no point with a larger distance remains (lowest NaN index first); if a picked point is
NaN, that pass updates nothing (the next pick is the lowest unpicked index still at +inf). Every output
index is in ``[0, N)`` and distinct; no error is raised.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from xla_ops import _checks
from xla_ops._ffi import batched_call


def _fps_jnp(xyz: jax.Array, npoint: int) -> jax.Array:
  """lax.fori_loop FPS of one example: xyz [N, 3] -> [npoint] int32."""
  x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]

  def body(t, state):
    dist, idx = state
    dist = dist.at[idx[t - 1]].set(-1.0)  # a picked point is never picked again
    c = xyz[idx[t - 1]]
    dx, dy, dz = x - c[0], y - c[1], z - c[2]
    d = dx * dx + dy * dy + dz * dz
    dist = jnp.where(d < dist, d, dist)  # NaN never replaces
    return dist, idx.at[t].set(jnp.argmax(dist).astype(jnp.int32))  # argmax: first maximum

  dist0 = jnp.full(xyz.shape[0], jnp.inf, jnp.float32)
  idx0 = jnp.zeros(npoint, jnp.int32)
  return jax.lax.fori_loop(1, npoint, body, (dist0, idx0))[1]


def farthest_point_sample(xyz: jax.Array, npoint: int, *, key: jax.Array | None = None,
                          start: jax.Array | None = None, lengths: jax.Array | None = None,
                          impl: str = "ffi") -> jax.Array:
  """Farthest point sampling, from index 0 unless a random (``key``) or given (``start``) first point.

  Args:
    xyz: float32 [..., N, 3] (float16 / bfloat16 are computed in float32).
    npoint: number of points to pick, 1 <= npoint <= N (a Python int).
    key: optional PRNG key: each example starts at its own uniformly drawn index (PyTorch3D's
      ``random_start_point=True``, torch-cluster's ``random_start=True``).
    start: optional int32 [...] first index of each example (taken modulo N, or modulo the example's
      length with ``lengths``). At most one of key / start.
    lengths: optional int32 [...] real points per example (ragged batch): padded points are never picked,
      slots at or beyond an example's length hold -1 (values outside [0, N] act clipped; ``key`` draws the
      start uniformly from the real points).
    impl: "ffi" (custom call; examples run in parallel, each on one thread) or "jnp" (lax.fori_loop).
  Returns:
    int32 [..., npoint] indices into the N points, ``[..., 0] == start``. Not differentiable (xyz is
    stop-gradient'ed). With a start s, ties go to the first index in the cyclic order s, s+1, ..., s-1
    (index order for s = 0).
  """
  _checks.check_impl(impl)
  _checks.check_points(xyz, "xyz")
  _checks.check_positive_int(npoint, "npoint", upper=xyz.shape[-2], upper_name="the number of points N")
  (xyz,) = _checks.to_f32(jax.lax.stop_gradient(xyz))
  batch, n = xyz.shape[:-2], xyz.shape[-2]
  if key is not None and start is not None:
    raise ValueError("give at most one of key and start")
  valid = _checks.check_lengths(lengths, "lengths", batch, n)
  if valid is not None:
    return _fps_ragged(xyz, npoint, valid, key, start, impl)
  if key is not None:
    start = jax.random.randint(key, batch, 0, n, dtype=jnp.int32)
  if start is not None:
    _checks.check_per_example_int32(start, "start", batch)
    # FPS from s on P == FPS from 0 on P rolled by -s, indices shifted back: no kernel change needed, and the
    # rolled order makes ties go to the first index after s (cyclically).
    start = jnp.asarray(start) % n
    order = (jnp.arange(n, dtype=jnp.int32) + start[..., None]) % n  # [..., N]
    rolled = jnp.take_along_axis(xyz, order[..., None], axis=-2)
    return (farthest_point_sample(rolled, npoint, impl=impl) + start[..., None]) % n
  if impl == "ffi":
    n = xyz.shape[-2]  # workspace: running minimum distances [n] (CUDA handler only)
    idx, _ = batched_call("xla_ops_farthest_point_sample", (xyz,), core_ndims=(2,),
                          out_core=(((npoint,), jnp.int32), ((n,), jnp.float32)), npoint=np.int32(npoint))
    return idx
  batch = xyz.shape[:-2]
  flat = xyz.reshape((-1,) + xyz.shape[-2:])
  return jax.vmap(lambda p: _fps_jnp(p, npoint))(flat).reshape(batch + (npoint,))


def _fps_ragged(xyz, npoint, valid, key, start, impl):
  """FPS of float32 xyz [..., N, 3] whose points with ``valid`` [..., N] False are padding (module docstring)."""
  batch, n = xyz.shape[:-2], xyz.shape[-2]
  length = jnp.sum(valid, axis=-1, dtype=jnp.int32)  # [...]
  span = jnp.maximum(length, 1)
  if key is not None:
    start = jax.random.randint(key, batch, 0, span, dtype=jnp.int32)
  elif start is not None:
    _checks.check_per_example_int32(start, "start", batch)
  else:
    start = jnp.zeros(batch, jnp.int32)
  start = jnp.asarray(start) % span
  positions = jnp.arange(n, dtype=jnp.int32)
  # The real points rolled so the start is position 0 (cyclically within the length); padding stays put.
  order = jnp.where(valid, (positions + start[..., None]) % span[..., None], positions)  # [..., N]
  rolled = jnp.take_along_axis(xyz, order[..., None], axis=-2)
  finite = valid & jnp.all(jnp.isfinite(rolled), axis=-1)
  source = jnp.argmax(finite, axis=-1)  # first real finite point from the start (0 if none)
  copy = jnp.take_along_axis(rolled, source[..., None, None], axis=-2)  # [..., 1, 3]
  rolled = jnp.where(valid[..., None], rolled, copy)
  idx = farthest_point_sample(rolled, npoint, impl=impl)  # [..., npoint] positions in `rolled`
  return jnp.where(jnp.arange(npoint) < length[..., None], jnp.take_along_axis(order, idx, axis=-1), -1)
