"""Generic JAX-transformation behaviour of every op in ``xla_ops.__all__``.

For each op (the SPECS table below, one entry per public function of docs/ops.md): jit; vmap with
in_axes 0 and None (still the op's custom calls, no loop); ``jax.shard_map`` on the 8 fake CPU devices with
gradients equal to the single-device ones (regression test for the varying-axes trap,
docs/ops.md, "shard_map") and ``out_specs=P()`` rejected; plain ``jax.jit`` on batch-sharded
inputs running the custom call per shard without an all-gather; results independent of XLA's thread count.

Only ops present in ``xla_ops.__all__`` are tested; ``test_every_public_op_has_a_spec`` keeps the table
complete.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import xla_ops


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """How to call one op generically."""
  make_args: Callable[[np.random.Generator, tuple, int], tuple]  # (rng, batch shape, size n) -> operands
  kwargs: dict = dataclasses.field(default_factory=dict)  # static arguments
  diff_argnums: tuple[int, ...] = ()  # operands the op is differentiable in
  custom_call: bool = True  # False for plain-jnp helpers


def _pts(rng, batch, n, c=3):
  return rng.random(batch + (n, c), dtype=np.float32)


def _idx(rng, batch, shape, upper):
  return rng.integers(0, upper, batch + shape).astype(np.int32)


SPECS: dict[str, OpSpec] = {
    "farthest_point_sample": OpSpec(lambda r, b, n: (_pts(r, b, n),), dict(npoint=16)),
    "ball_query": OpSpec(lambda r, b, n: (_pts(r, b, n), _pts(r, b, n // 4)), dict(radius=0.3, nsample=8)),
    "group_points": OpSpec(lambda r, b, n: (_pts(r, b, n, 5), _idx(r, b, (n // 4, 4), n)), {}, (0,)),
    "knn": OpSpec(lambda r, b, n: (_pts(r, b, n // 4, 5), _pts(r, b, n, 5)), dict(k=4), (0, 1)),
    "three_nn": OpSpec(lambda r, b, n: (_pts(r, b, n), _pts(r, b, n // 4)), {}, (0, 1)),
    "three_interpolate": OpSpec(
        lambda r, b, n: (_pts(r, b, n // 4, 5), _idx(r, b, (n, 3), n // 4), _pts(r, b, n)), {}, (0, 2)),
    "inverse_distance_weights": OpSpec(lambda r, b, n: (_pts(r, b, n) + 0.01,), {}, (0,), custom_call=False),
    "nn_distance": OpSpec(lambda r, b, n: (_pts(r, b, n), _pts(r, b, 3 * n // 4)), {}, (0, 1)),
    "chamfer_distance": OpSpec(lambda r, b, n: (_pts(r, b, n), _pts(r, b, 3 * n // 4)),
                               dict(weight_ab=0.55, reduction="none"), (0, 1)),
    "approx_match": OpSpec(lambda r, b, n: (_pts(r, b, n // 2), _pts(r, b, n // 4))),
    "match_cost": OpSpec(lambda r, b, n: (_pts(r, b, n // 2), _pts(r, b, n // 4), _pts(r, b, n // 4, n // 2)),
                         {}, (0, 1)),
    "earth_mover_distance": OpSpec(lambda r, b, n: (_pts(r, b, n // 2), _pts(r, b, n // 4)), {}, (0, 1)),
}
OPS = [name for name in SPECS if name in xla_ops.__all__]
SIZE = 64  # points per cloud in the tests run in this process
SHARDED_BATCH = 16  # 2 examples per fake device


def call(name: str, *args):
  """Calls op ``name`` with its static arguments; always returns a tuple of arrays."""
  out = getattr(xla_ops, name)(*args, **SPECS[name].kwargs)
  return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def make_args(name: str, batch: tuple, n: int = SIZE, seed: int = 0) -> tuple:
  return SPECS[name].make_args(np.random.default_rng(seed), batch, n)


def per_example_loss(name: str, nbatch: int):
  """A scalar per example (shape = the batch shape): a fixed weighted sum of the op's float outputs."""

  def loss(*args):
    total = 0.0
    for out in call(name, *args):
      if jnp.issubdtype(out.dtype, jnp.floating):
        flat = out.reshape(out.shape[:nbatch] + (-1,))
        total = total + jnp.sum(flat * jnp.cos(jnp.arange(flat.shape[-1], dtype=flat.dtype)), axis=-1)
    return total

  return loss


def _assert_trees_close(got, want, rtol=1e-6, atol=1e-6):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


def _ffi_targets(text: str) -> list[str]:
  return re.findall(r"target_name=(xla_ops_\w+)", text)


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))


def test_every_public_op_has_a_spec():
  assert set(xla_ops.__all__) <= set(SPECS), f"add SPECS entries for {set(xla_ops.__all__) - set(SPECS)}"


@pytest.mark.parametrize("name", OPS)
def test_jit_matches_eager(name):
  args = make_args(name, (2,))
  _assert_trees_close(jax.jit(lambda *a: call(name, *a))(*args), call(name, *args))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("mode", ["all_mapped", "first_mapped_rest_none"])
def test_vmap_is_one_batched_call(name, mode):
  args = make_args(name, (3, 2))  # vmapped axis 0 of size 3 over a batch of 2
  if mode == "all_mapped":
    in_axes = (0,) * len(args)
  else:
    if len(args) == 1:
      pytest.skip("single-operand op: in_axes=None would map nothing")
    in_axes = (0,) + (None,) * (len(args) - 1)
    args = (args[0],) + tuple(a[0] for a in args[1:])
  f = lambda *a: call(name, *a)
  got = jax.jit(jax.vmap(f, in_axes=in_axes))(*args)
  slices = [f(*(a[v] if ax == 0 else a for a, ax in zip(args, in_axes))) for v in range(3)]
  want = jax.tree.map(lambda *s: jnp.stack(s), *slices)
  _assert_trees_close(got, want)
  batched = str(jax.make_jaxpr(jax.vmap(f, in_axes=in_axes))(*args))
  unbatched = str(jax.make_jaxpr(f)(*(a[0] if ax == 0 else a for a, ax in zip(args, in_axes))))
  assert "while[" not in batched
  assert sorted(_ffi_targets(batched)) == sorted(_ffi_targets(unbatched))
  assert bool(_ffi_targets(batched)) == SPECS[name].custom_call


@pytest.mark.parametrize("name", OPS)
def test_shard_map_matches_single_device(name):
  """Outputs and gradients through shard_map (check_vma on) equal the unsharded ones."""
  spec = SPECS[name]
  args = make_args(name, (SHARDED_BATCH,))
  mesh = _mesh()
  if not spec.diff_argnums:
    sharded = jax.shard_map(lambda *a: call(name, *a), mesh=mesh, in_specs=P("data"), out_specs=P("data"))
    _assert_trees_close(jax.jit(sharded)(*args), jax.jit(lambda *a: call(name, *a))(*args))
    return
  # The mean over examples is taken outside shard_map, as a training loss would.
  loss = per_example_loss(name, nbatch=1)
  sharded_loss = jax.shard_map(loss, mesh=mesh, in_specs=P("data"), out_specs=P("data"))
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.mean(f(*a)), argnums=spec.diff_argnums))
  _assert_trees_close(value_and_grad(sharded_loss)(*args), value_and_grad(loss)(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", OPS)
def test_shard_map_rejects_replicated_out_specs(name):
  """A per-shard result is varying: claiming it replicated (out_specs=P()) must be an error."""
  args = make_args(name, (SHARDED_BATCH,))
  wrong = jax.shard_map(lambda *a: call(name, *a), mesh=_mesh(), in_specs=P("data"), out_specs=P())
  with pytest.raises(ValueError, match="out_specs"):
    jax.jit(wrong)(*args)


@pytest.mark.parametrize("name", OPS)
def test_plain_jit_on_sharded_inputs_runs_per_shard(name):
  args = make_args(name, (SHARDED_BATCH,))
  sharding = NamedSharding(_mesh(), P("data"))
  sharded_args = [jax.device_put(a, sharding) for a in args]
  f = jax.jit(lambda *a: call(name, *a))
  hlo = f.lower(*sharded_args).compile().as_text()
  assert "all-gather" not in hlo
  calls = [line for line in hlo.splitlines() if 'custom_call_target="xla_ops_' in line]
  assert bool(calls) == SPECS[name].custom_call
  per_shard = SHARDED_BATCH // 8
  for line in calls:  # every operand and result of the custom call has the per-shard batch
    leading = {int(d) for d in re.findall(r"\b[fs]32\[(\d+)", line)}
    assert leading == {per_shard}, line
  _assert_trees_close(f(*sharded_args), f(*args))


_THREADS_SCRIPT = r"""
import collections, importlib.util, os, sys
import numpy as np
spec = importlib.util.spec_from_file_location("test_jax_transforms", sys.argv[1])
module = sys.modules["test_jax_transforms"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
import jax
results = {}
for name in module.OPS:
  args = module.make_args(name, (3,), n=768, seed=1)
  for i, out in enumerate(jax.jit(lambda *a: module.call(name, *a))(*args)):
    results[f"{name}/{i}"] = np.asarray(out)
names = collections.Counter(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))
results["xla_pool_threads"] = np.array(names["tf_XLAEigen"])
np.savez(sys.argv[2], **results)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts XLA's pool threads through /proc")
def test_results_do_not_depend_on_the_thread_count(tmp_path):
  """One device with XLA's intra-op pool at 1 thread vs 7 threads (larger clouds: many parallel tasks).

  In jax 0.10.2 the pool size (the FFI ThreadPool's num_threads) is set by the NPROC environment variable
  read by the PJRT CPU client; --xla_cpu_multi_thread_eigen=false and intra_op_parallelism_threads do not
  change it. The script counts the pool's threads to prove the setting took effect.
  """
  procs = {}
  for threads in (1, 7):
    env = dict(os.environ, NPROC=str(threads), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs[threads] = subprocess.Popen(
        [sys.executable, "-c", _THREADS_SCRIPT, __file__, str(tmp_path / f"{threads}.npz")], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  results = {}
  for threads, proc in procs.items():
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output
    results[threads] = dict(np.load(tmp_path / f"{threads}.npz"))
  one, many = results[1], results[7]
  assert one.pop("xla_pool_threads") == 1 and many.pop("xla_pool_threads") == 7
  assert one.keys() == many.keys() and len(one) > 0
  for key in one:
    np.testing.assert_array_equal(one[key], many[key], err_msg=key)
