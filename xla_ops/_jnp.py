"""Shared machinery of the pure-jnp implementations (the benchmark baselines and the ``impl="jnp"`` fallback)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def map_queries(fn, queries: jax.Array, points: jax.Array, chunk: int) -> tuple[jax.Array, ...]:
  """Applies ``fn(q [C], points [N, C]) -> tuple of arrays`` to every query of every example.

  queries [..., M, C] and points [..., N, C] share the batch shape; returns arrays [..., M, *out_shape]. The
  queries of an example are processed ``chunk`` at a time (vmapped), so memory stays O(chunk * N) per
  example instead of O(M * N).
  """
  batch = queries.shape[:-2]
  if queries.shape[-2] == 0:  # lax.map cannot batch zero queries
    outs = jax.eval_shape(fn, jax.ShapeDtypeStruct(queries.shape[-1:], queries.dtype),
                          jax.ShapeDtypeStruct(points.shape[-2:], points.dtype))
    return tuple(jnp.zeros(batch + (0,) + o.shape, o.dtype) for o in outs)
  q = queries.reshape((-1,) + queries.shape[-2:])
  p = points.reshape((-1,) + points.shape[-2:])

  def per_example(qe, pe):
    return jax.lax.map(lambda qi: fn(qi, pe), qe, batch_size=chunk)

  outs = jax.vmap(per_example)(q, p)
  return tuple(o.reshape(batch + o.shape[1:]) for o in outs)
