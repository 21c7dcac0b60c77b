"""The one place that calls ``jax.ffi.ffi_call``: registration and the batched-call machinery.

Every custom call of xla_ops goes through :func:`batched_call`, which gives it the behaviour of a native,
batched JAX op:

* **Batching.** Each operand has ``core_ndims`` trailing "core" dims (e.g. 2 for a point set ``[N, C]``);
  everything in front is a batch shape that all operands share and the C++ handlers flatten. Under
  ``jax.vmap`` (a ``custom_vmap`` rule) the mapped axis simply becomes one more batch dim: one custom call,
  no loop.
* **Sharding under plain jit.** The call is wrapped in ``custom_partitioning`` whose rule keeps every batch
  dim's sharding and replicates the core dims, so with batch-sharded inputs each device runs the op on its
  own shard (no all-gather); see tests/test_jax_transforms.py.
* **shard_map.** ``ffi_call`` forgets shard_map's varying-axes type (docs/ops.md, "shard_map"): its outputs would
  be typed invariant, making gradients silently mesh-size times too large. The outputs are re-marked
  varying over the union of the operands' varying axes.

Handlers are registered under the same target name for CPU and (when built) CUDA.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_PLATFORM_MODULES = {"cpu": "xla_ops._xla_ops_cpu", "CUDA": "xla_ops._xla_ops_cuda"}


@functools.cache
def registered_platforms() -> tuple[str, ...]:
  """Registers the handlers of every built extension with XLA (once); returns their platforms."""
  platforms = []
  for platform, module_name in _PLATFORM_MODULES.items():
    try:
      module = importlib.import_module(module_name)
    except ImportError:
      if platform == "cpu":
        raise ImportError(
            "xla_ops: the compiled extension _xla_ops_cpu is missing; install the package with "
            "`pip install ./xla_ops` or `pip install -e ./xla_ops` from the repository root (it builds the C++ handlers)") from None
      continue
    for name, capsule in module.registrations().items():
      jax.ffi.register_ffi_target(name, capsule, platform=platform)
    platforms.append(platform)
  return tuple(platforms)


def _varying_axes(*xs: jax.Array) -> tuple[str, ...]:
  axes: set[str] = set()
  for x in xs:
    axes |= set(jax.typeof(x).mat.varying)
  return tuple(sorted(axes))


def _mark_varying(outs: Sequence[jax.Array], axes: tuple[str, ...]) -> tuple[jax.Array, ...]:
  """Re-marks ``outs`` as varying over ``axes`` inside shard_map (no-op outside it)."""
  if not axes:
    return tuple(outs)
  marked = []
  for out in outs:
    missing = tuple(a for a in axes if a not in jax.typeof(out).mat.varying)
    marked.append(jax.lax.pcast(out, missing, to="varying") if missing else out)
  return tuple(marked)


def _batch_shape(args: Sequence[jax.Array], core_ndims: Sequence[int]) -> tuple[int, ...]:
  return tuple(args[0].shape[: args[0].ndim - core_ndims[0]])


def _make_call(target: str, core_ndims: tuple[int, ...], out_core: tuple[tuple[tuple[int, ...], Any], ...],
               attrs: tuple[tuple[str, Any], ...]):
  """Builds the vmappable, batch-partitioned callable for one (target, shapes, attributes) signature."""
  attributes = dict(attrs)

  def raw(*args):
    batch = _batch_shape(args, core_ndims)
    result_shapes = tuple(jax.ShapeDtypeStruct(batch + shape, dtype) for shape, dtype in out_core)
    outs = jax.ffi.ffi_call(target, result_shapes, vmap_method="broadcast_all")(*args, **attributes)
    return _mark_varying(outs, _varying_axes(*args))

  def partition(mesh, arg_shapes, result_shapes):
    nbatch = arg_shapes[0].ndim - core_ndims[0]
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * nbatch
    batch_spec = spec[:nbatch]

    def sharding(ndim):
      return NamedSharding(mesh, PartitionSpec(*batch_spec, *([None] * (ndim - nbatch))))

    arg_shardings = tuple(sharding(s.ndim) for s in arg_shapes)
    result_shardings = tuple(sharding(s.ndim) for s in result_shapes)
    return mesh, raw, result_shardings, arg_shardings

  def infer(mesh, arg_shapes, result_shapes):
    nbatch = arg_shapes[0].ndim - core_ndims[0]
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * nbatch
    return tuple(NamedSharding(mesh, PartitionSpec(*spec[:nbatch])) for _ in result_shapes)

  @functools.cache
  def partitioned(nbatch: int):
    batch_letters = [f"b{i}" for i in range(nbatch)]
    letters = iter(f"k{i}" for i in range(64))
    ins = [" ".join(batch_letters + [next(letters) for _ in range(nd)]) for nd in core_ndims]
    outs = [" ".join(batch_letters + [next(letters) for _ in shape]) for shape, _ in out_core]
    fn = custom_partitioning(raw)
    fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=f"{', '.join(ins)} -> {', '.join(outs)}")
    return fn

  @jax.custom_batching.custom_vmap
  def call(*args):
    return partitioned(args[0].ndim - core_ndims[0])(*args)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip(args, in_batched)]
    return call(*args), (True,) * len(out_core)

  return call


_make_call_cached = functools.lru_cache(maxsize=512)(_make_call)


def batched_call(target: str, args: Sequence[jax.Array], core_ndims: Sequence[int],
                 out_core: Sequence[tuple[tuple[int, ...], Any]], **attributes) -> tuple[jax.Array, ...]:
  """Calls the FFI target ``target`` as a batched, vmappable, batch-sharded op.

  Args:
    target: registered FFI target name (``xla_ops_<op>``).
    args: operands; all share the batch shape ``args[0].shape[:-core_ndims[0]]``.
    core_ndims: number of trailing non-batch dims of each operand.
    out_core: ``(core_shape, dtype)`` of each result; the batch shape is prepended.
    **attributes: static FFI attributes (Python/numpy scalars), e.g. ``npoint=np.int32(1024)``.
  Returns:
    The results as a tuple of arrays.
  """
  registered_platforms()
  key_attrs = tuple(sorted((k, _hashable(v)) for k, v in attributes.items()))
  out_key = tuple((tuple(int(d) for d in shape), jnp.dtype(dtype)) for shape, dtype in out_core)
  call = _make_call_cached(target, tuple(core_ndims), out_key, key_attrs)
  axes = _varying_axes(*args)
  return _mark_varying(call(*args), axes)


def _hashable(v):
  # FFI attributes must keep their numpy scalar type (it selects the attribute's C++ type).
  if isinstance(v, np.generic):
    return v
  raise TypeError(f"FFI attribute values must be numpy scalars (np.int32, np.float32), got {type(v)}")
