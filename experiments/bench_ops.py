"""Benchmark of the xla_ops CPU custom calls vs their pure-jnp versions and the CPU tools a user would pick.

Every case (an op at one size) runs in a fresh subprocess (same interpreter and environment) that sets up
all its implementations, then times them interleaved (round r runs every implementation once), so the
ratios between implementations come from the same minutes of a shared, noisy machine:

* time: median of ``--repeats`` rounds after one warm-up run (jax functions are compiled ahead of time and
  every run blocks until its results are ready);
* memory: peak RSS of an implementation's first execution minus the RSS just before it (inputs created,
  function compiled, freed heap returned with malloc_trim), read from /proc/self/status (VmHWM, reset
  through /proc/self/clear_refs); it includes XLA's temporaries, the handlers' own buffers and outputs;
* arithmetic limit: the op's flop count divided by the CPU's peak fp32 rate (stated in the output). For ops
  that use a spatial index (nn_distance, knn and ball query via trees) the count is the brute-force one,
  so a ratio below 1 means faster than any brute-force evaluation could be.

On a GPU (``--gpu``) the cases run at the paper's sizes (``Case.gpu``) with the jax implementations only
(ffi vs jnp on the same GPU); memory is XLA's own accounting of the compiled program (arguments + outputs +
temporaries from ``compiled.memory_analysis()``; the custom calls' workspaces are outputs, so they count),
and the arithmetic limit is the GPU's fp32 rate (SMs x fp32 lanes x 2 x max SM clock).

  python -m experiments.bench_ops            # full sizes; prints the table, writes docs/benchmarks.md
  python -m experiments.bench_ops --quick    # small sizes (smoke test); writes a file only with --out
  python -m experiments.bench_ops --gpu --out=DIR/bench_ops.md --json=DIR/bench_ops.json   # experiments/gpu_check.py
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

from experiments.machine import cpu_peak

_QUICK = flags.DEFINE_bool("quick", False, "Small sizes and 2 timed runs (smoke test).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median reported); --quick uses 2.")
_OUT = flags.DEFINE_string("out", None, "Markdown output (default docs/benchmarks.md for a full run).")
_CASES = flags.DEFINE_list("cases", None, "Only these cases (names as in the table's first column).")
_ISOLATE = flags.DEFINE_bool("isolate", None, "One subprocess per case (default: on, off with --quick).")
_WORKER = flags.DEFINE_string("worker", None, "Internal: measure one case in this process, print JSON.")
_GPU = flags.DEFINE_bool("gpu", False, "Paper sizes on the default (GPU) device, ffi vs jnp only (see the docstring).")
_JSON = flags.DEFINE_string("json", None, "Also write the rows and target verdicts as JSON here.")



# ---- the cases ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Impl:
  label: str
  setup: Callable[[dict], Callable[[], Any]]  # sizes -> a no-argument function that runs once, blocking
  needs: str  # an xla_ops op ("xla_ops.<name>") or a module that must import


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  full: dict
  quick: dict
  describe: Callable[[dict], str]
  flops: Callable[[dict], float]  # per run
  flop_note: str
  impls: tuple[Impl, ...]
  gpu: dict | None = None  # the paper's sizes, run with --gpu (None: not a GPU case)


def _rng():
  import numpy as np
  return np.random.default_rng(0)


def _clouds(s: dict, *shapes):
  """Uniform float32 clouds in the unit cube, one per shape (tuples of size names or ints)."""
  rng = _rng()
  return [rng.random(tuple(s[d] if isinstance(d, str) else d for d in shape), dtype="float32") for shape in shapes]


def _jax_runner(fn, *args):
  """AOT-compiles ``fn`` for ``args`` (placed on the default device); returns a blocking no-argument runner
  whose ``xla_bytes`` is XLA's memory accounting of the program (arguments + outputs + temporaries)."""
  import jax
  args = [jax.device_put(a) for a in args]
  compiled = jax.jit(fn).lower(*args).compile()

  def run():
    return jax.block_until_ready(compiled(*args))
  try:
    mem = compiled.memory_analysis()
    run.xla_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    run.xla_bytes = None
  return run


def _xla_op(name):
  import xla_ops
  return getattr(xla_ops, name)


def _nn(impl):
  def setup(s):
    a, b = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    return _jax_runner(lambda a, b: _xla_op("nn_distance")(a, b, impl=impl), a, b)
  return setup


def _nn_ckdtree(s):
  from scipy.spatial import cKDTree
  a, b = _clouds(s, ("B", "N", 3), ("B", "M", 3))

  def run():  # both trees and both directions, per example, queries on all cores
    for x, y in zip(a, b):
      tx, ty = cKDTree(x), cKDTree(y)
      ty.query(x, k=1, workers=-1)
      tx.query(y, k=1, workers=-1)
  return run


def _chamfer_grad(impl):
  def setup(s):
    import jax
    a, b = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    loss = lambda a, b: _xla_op("chamfer_distance")(a, b, impl=impl)
    return _jax_runner(jax.value_and_grad(loss, argnums=(0, 1)), a, b)
  return setup


def _fps(impl):
  def setup(s):
    (xyz,) = _clouds(s, ("B", "N", 3))
    return _jax_runner(lambda x: _xla_op("farthest_point_sample")(x, s["npoint"], impl=impl), xyz)
  return setup


def _fps_fpsample(s):
  import fpsample
  (xyz,) = _clouds(s, ("B", "N", 3))
  return lambda: [fpsample.fps_sampling(x, s["npoint"], start_idx=0) for x in xyz]


def _knn(impl):
  def setup(s):
    (x,) = _clouds(s, ("B", "N", "C"))
    return _jax_runner(lambda x: _xla_op("knn")(x, x, s["k"], impl=impl), x)
  return setup


def _knn_ckdtree(s):
  from scipy.spatial import cKDTree
  (x,) = _clouds(s, ("B", "N", "C"))
  return lambda: [cKDTree(p).query(p, k=s["k"], workers=-1) for p in x]


def _ball(impl):
  def setup(s):
    xyz, new_xyz = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    return _jax_runner(
        lambda x, q: _xla_op("ball_query")(x, q, s["radius"], s["nsample"], impl=impl), xyz, new_xyz)
  return setup


def _ball_ckdtree(s):
  from scipy.spatial import cKDTree
  xyz, new_xyz = _clouds(s, ("B", "N", 3), ("B", "M", 3))
  # All hits of every ball, sorted by index (the first nsample are the op's result; truncating is not timed).
  return lambda: [cKDTree(x).query_ball_point(q, s["radius"], workers=-1, return_sorted=True)
                  for x, q in zip(xyz, new_xyz)]


def _three_nn(impl):
  def setup(s):
    unknown, known = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    return _jax_runner(lambda u, k: _xla_op("three_nn")(u, k, impl=impl), unknown, known)
  return setup


def _three_nn_ckdtree(s):
  from scipy.spatial import cKDTree
  unknown, known = _clouds(s, ("B", "N", 3), ("B", "M", 3))
  return lambda: [cKDTree(k).query(u, k=3, workers=-1) for u, k in zip(unknown, known)]


def _identical(op):
  """knn (k = s["k"]) or three_nn of a cloud of N identical points with itself: every distance ties."""
  def setup(s):
    import numpy as np
    x = np.full((s["B"], s["N"], 3), 0.5, np.float32)
    fn = (lambda x: _xla_op("knn")(x, x, s["k"])) if op == "knn" else (lambda x: _xla_op("three_nn")(x, x))
    return _jax_runner(fn, x)
  return setup


def _emd(impl):
  def setup(s):
    x1, x2 = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    match_cost, approx_match = _xla_op("match_cost"), _xla_op("approx_match")
    return _jax_runner(lambda p, q: match_cost(p, q, approx_match(p, q, impl=impl), impl=impl), x1, x2)
  return setup


def _emd_value_grad(fused: bool):
  """Value and gradient of the approximate EMD: fused (earth_mover_distance, xla_ops_emd: the match is never
  formed) or today's dense form (match_cost(approx_match): a B x M x N float32 match)."""
  def setup(s):
    import jax
    import jax.numpy as jnp
    x1, x2 = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    if fused:
      emd = _xla_op("earth_mover_distance")
      loss = lambda p, q: jnp.sum(emd(p, q))
    else:
      match_cost, approx_match = _xla_op("match_cost"), _xla_op("approx_match")
      loss = lambda p, q: jnp.sum(match_cost(p, q, approx_match(p, q)))
    return _jax_runner(jax.value_and_grad(loss, argnums=(0, 1)), x1, x2)
  return setup


def _emd_pot(s):
  import numpy as np
  import ot
  x1, x2 = _clouds(s, ("B", "N", 3), ("B", "M", 3))
  n, m = s["N"], s["M"]

  def exact():  # total cost with every point of mass 1 (n == m), as match_cost sums it
    return np.array([n * ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), ot.dist(p, q, metric="euclidean"))
                     for p, q in zip(x1.astype(np.float64), x2.astype(np.float64))])
  return exact


def _emd_error(s) -> str:
  """Relative error of approx_match + match_cost (ffi) against POT's exact EMD, same clouds."""
  import numpy as np
  x1, x2 = _clouds(s, ("B", "N", 3), ("B", "M", 3))
  approx = np.asarray(_xla_op("earth_mover_distance")(x1, x2), np.float64)
  exact = _emd_pot(s)()
  rel = approx / exact - 1
  return f"approx EMD / exact - 1: mean {rel.mean():+.2%}, range [{rel.min():+.2%}, {rel.max():+.2%}]"


def _bnm(s):
  return f"B={s['B']} N={s['N']} M={s['M']}"


CASES = (
    Case("nn_distance", dict(B=4, N=16384, M=16384), dict(B=2, N=512, M=512), _bnm,
         lambda s: 2 * s["B"] * s["N"] * s["M"] * 8, "2 directions x B*N*M pairs x 8 (3 sub, 3 mul, 2 add)",
         (Impl("ffi", _nn("ffi"), "xla_ops.nn_distance"), Impl("jnp (chunked)", _nn("jnp"), "xla_ops.nn_distance"),
          Impl("scipy cKDTree", _nn_ckdtree, "scipy.spatial")), gpu=dict(B=32, N=16384, M=16384)),
    Case("chamfer_distance value+grad", dict(B=4, N=16384, M=16384), dict(B=2, N=512, M=512), _bnm,
         lambda s: 2 * s["B"] * s["N"] * s["M"] * 8, "as nn_distance (the gradient is O(B*(N+M)))",
         (Impl("ffi", _chamfer_grad("ffi"), "xla_ops.chamfer_distance"),
          Impl("jnp (chunked)", _chamfer_grad("jnp"), "xla_ops.chamfer_distance")), gpu=dict(B=32, N=16384, M=16384)),
    Case("farthest_point_sample", dict(B=8, N=16384, npoint=4096), dict(B=2, N=1024, npoint=128),
         lambda s: f"B={s['B']} N={s['N']} npoint={s['npoint']}",
         lambda s: s["B"] * s["npoint"] * s["N"] * 10, "B*npoint*N x 10 (distance 8, min 1, argmax 1)",
         (Impl("ffi", _fps("ffi"), "xla_ops.farthest_point_sample"),
          Impl("jnp (fori_loop)", _fps("jnp"), "xla_ops.farthest_point_sample"),
          Impl("fpsample.fps_sampling", _fps_fpsample, "fpsample")), gpu=dict(B=32, N=16384, npoint=4096)),
    Case("knn", dict(B=4, N=4096, C=64, k=20), dict(B=2, N=256, C=16, k=8),
         lambda s: f"B={s['B']} N=M={s['N']} C={s['C']} k={s['k']}",
         lambda s: s["B"] * s["N"] * s["N"] * 3 * s["C"], "B*N*N pairs x 3C (sub, mul, add per channel)",
         (Impl("ffi", _knn("ffi"), "xla_ops.knn"), Impl("jnp (top_k)", _knn("jnp"), "xla_ops.knn"),
          Impl("scipy cKDTree", _knn_ckdtree, "scipy.spatial")), gpu=dict(B=32, N=4096, C=64, k=20)),
    Case("ball_query", dict(B=8, N=16384, M=1024, radius=0.1, nsample=32),
         dict(B=2, N=1024, M=128, radius=0.2, nsample=16),
         lambda s: f"B={s['B']} N={s['N']} M={s['M']} r={s['radius']} nsample={s['nsample']}",
         lambda s: s["B"] * s["M"] * s["N"] * 8, "B*M*N pairs x 8 (full scan; the op may stop early)",
         (Impl("ffi", _ball("ffi"), "xla_ops.ball_query"), Impl("jnp", _ball("jnp"), "xla_ops.ball_query"),
          Impl("scipy cKDTree (all hits)", _ball_ckdtree, "scipy.spatial")),
         gpu=dict(B=32, N=16384, M=1024, radius=0.1, nsample=32)),
    # 3-D knn and three_nn (issue 11, item 5): k-d trees on the CPU (the same results as brute force).
    Case("knn 3-D k=20", dict(B=4, N=8192, C=3, k=20), dict(B=2, N=512, C=3, k=20),
         lambda s: f"B={s['B']} N=M={s['N']} C=3 k={s['k']}",
         lambda s: s["B"] * s["N"] * s["N"] * 3 * s["C"], "B*N*N pairs x 3C (brute-force count)",
         (Impl("ffi", _knn("ffi"), "xla_ops.knn"), Impl("jnp (top_k)", _knn("jnp"), "xla_ops.knn"),
          Impl("scipy cKDTree", _knn_ckdtree, "scipy.spatial"))),
    Case("knn 3-D k=1", dict(B=4, N=8192, C=3, k=1), dict(B=2, N=512, C=3, k=1),
         lambda s: f"B={s['B']} N=M={s['N']} C=3 k={s['k']}",
         lambda s: s["B"] * s["N"] * s["N"] * 3 * s["C"], "B*N*N pairs x 3C (brute-force count)",
         (Impl("ffi", _knn("ffi"), "xla_ops.knn"), Impl("jnp (top_k)", _knn("jnp"), "xla_ops.knn"),
          Impl("scipy cKDTree", _knn_ckdtree, "scipy.spatial"))),
    Case("three_nn", dict(B=4, N=8192, M=2048), dict(B=2, N=512, M=128), _bnm,
         lambda s: s["B"] * s["N"] * s["M"] * 8, "B*N*M pairs x 8 (brute-force count)",
         (Impl("ffi", _three_nn("ffi"), "xla_ops.three_nn"), Impl("jnp", _three_nn("jnp"), "xla_ops.three_nn"),
          Impl("scipy cKDTree", _three_nn_ckdtree, "scipy.spatial"))),
    # N identical points (every distance ties): brute force would take minutes (N^2 = 1e12 pairs).
    Case("knn 3-D 1M identical", dict(B=1, N=1_000_000, C=3, k=20), dict(B=1, N=20_000, C=3, k=20),
         lambda s: f"B={s['B']} N=M={s['N']} C=3 k={s['k']}, all points equal",
         lambda s: s["B"] * s["N"] * s["N"] * 3 * s["C"], "B*N*N pairs x 3C (brute-force count)",
         (Impl("ffi", _identical("knn"), "xla_ops.knn"),)),
    Case("three_nn 1M identical", dict(B=1, N=1_000_000), dict(B=1, N=20_000),
         lambda s: f"B={s['B']} N=M={s['N']}, all points equal",
         lambda s: s["B"] * s["N"] * s["N"] * 8, "B*N*N pairs x 8 (brute-force count)",
         (Impl("ffi", _identical("three_nn"), "xla_ops.three_nn"),)),
    Case("approx_match+match_cost", dict(B=8, N=1024, M=1024), dict(B=2, N=128, M=128), _bnm,
         lambda s: s["B"] * s["N"] * s["M"] * (8 + 10 * 20 + 12),
         "B*N*M x (8 distance + 10 rounds x ~20 (exp ~12, 3 weighted sums) + 12 cost)",
         (Impl("ffi", _emd("ffi"), "xla_ops.approx_match"), Impl("jnp", _emd("jnp"), "xla_ops.approx_match"),
          Impl("POT ot.emd2 (exact EMD)", _emd_pot, "ot")), gpu=dict(B=32, N=1024, M=1024)),
    Case("approx_match+match_cost 16k", None, dict(B=1, N=256, M=256), _bnm,
         lambda s: s["B"] * s["N"] * s["M"] * (8 + 10 * 20 + 12), "as approx_match+match_cost",
         (Impl("ffi", _emd("ffi"), "xla_ops.approx_match"), Impl("jnp", _emd("jnp"), "xla_ops.approx_match")),
         gpu=dict(B=4, N=16384, M=16384)),
    Case("earth_mover_distance value+grad", dict(B=8, N=1024, M=1024), dict(B=2, N=128, M=128), _bnm,
         lambda s: s["B"] * s["N"] * s["M"] * (8 + 10 * 20 + 24), "as approx_match+match_cost, gradient 12 more",
         (Impl("ffi", _emd_value_grad(True), "xla_ops.earth_mover_distance"),
          Impl("ffi dense match", _emd_value_grad(False), "xla_ops.approx_match"))),
    Case("earth_mover_distance value+grad 16k", dict(B=4, N=16384, M=16384), dict(B=1, N=256, M=256), _bnm,
         lambda s: s["B"] * s["N"] * s["M"] * (8 + 10 * 20 + 24), "as earth_mover_distance value+grad",
         (Impl("ffi", _emd_value_grad(True), "xla_ops.earth_mover_distance"),
          Impl("ffi dense match", _emd_value_grad(False), "xla_ops.approx_match")), gpu=dict(B=4, N=16384, M=16384)),
)
EXTRA = {("approx_match+match_cost", "POT ot.emd2 (exact EMD)"): _emd_error}
TARGETS = {  # case -> (other implementation, minimum speed-up of ffi over it)
    "nn_distance": [("jnp (chunked)", 8.0), ("scipy cKDTree", 1.0)],
    "chamfer_distance value+grad": [("jnp (chunked)", 8.0)],
    "farthest_point_sample": [("jnp (fori_loop)", 20.0), ("fpsample.fps_sampling", 1.0)],
    "knn": [("jnp (top_k)", 4.0)],
    "knn 3-D k=20": [("scipy cKDTree", 1.5)],
    "ball_query": [("scipy cKDTree (all hits)", 1.0)],
    "approx_match+match_cost": [("jnp", 10.0)],
}
GPU_POINTER = ("GPU: the same ops at the paper's sizes on one GPU, ffi vs jnp, are measured by "
               "`python -m experiments.gpu_check` (`bench_ops --gpu`); results and status in docs/gpu.md.")
GPU_TARGETS = {  # the same on one GPU (issue 10), ffi vs jnp measured in the same run
    "nn_distance": [("jnp (chunked)", 10.0)],
    "chamfer_distance value+grad": [("jnp (chunked)", 10.0)],
    "farthest_point_sample": [("jnp (fori_loop)", 10.0)],
    "knn": [("jnp (top_k)", 3.0)],
    "approx_match+match_cost": [("jnp", 5.0)],
    "approx_match+match_cost 16k": [("jnp", 5.0)],
}



# ---- half precision (issue 11, item 3): bfloat16 inputs vs float32 inputs, both through the custom calls --
def _half_chamfer_grad(dtype):
  def setup(s):
    import jax
    import jax.numpy as jnp
    a, b = (jnp.asarray(x, jnp.dtype(dtype)) for x in _clouds(s, ("B", "N", 3), ("B", "M", 3)))
    loss = lambda a, b: _xla_op("chamfer_distance")(a, b).astype("float32")
    return _jax_runner(jax.value_and_grad(loss, argnums=(0, 1)), a, b)
  return setup


def _half_knn(dtype):
  def setup(s):
    import jax.numpy as jnp
    (x,) = (jnp.asarray(x, jnp.dtype(dtype)) for x in _clouds(s, ("B", "N", "C")))
    return _jax_runner(lambda x: _xla_op("knn")(x, x, s["k"]), x)
  return setup


HALF_CASES = (
    Case("chamfer_distance value+grad bf16", dict(B=4, N=16384, M=16384), dict(B=2, N=512, M=512), _bnm,
         lambda s: 2 * s["B"] * s["N"] * s["M"] * 8, "as nn_distance (computed in float32 inside)",
         (Impl("ffi", _half_chamfer_grad("bfloat16"), "xla_ops.chamfer_distance"),
          Impl("ffi float32 inputs", _half_chamfer_grad("float32"), "xla_ops.chamfer_distance"))),
    Case("knn bf16", dict(B=4, N=4096, C=64, k=20), dict(B=2, N=256, C=16, k=8),
         lambda s: f"B={s['B']} N=M={s['N']} C={s['C']} k={s['k']}",
         lambda s: s["B"] * s["N"] * s["N"] * 3 * s["C"], "as knn (computed in float32 inside)",
         (Impl("ffi", _half_knn("bfloat16"), "xla_ops.knn"),
          Impl("ffi float32 inputs", _half_knn("float32"), "xla_ops.knn"))),
)


# ---- ragged batches (issue 11, item 2): chamfer with per-example lengths vs the same call without ---------
def _chamfer_lengths(with_lengths):
  def setup(s):
    import jax
    import numpy as np
    a, b = _clouds(s, ("B", "N", 3), ("B", "M", 3))
    la, lb = np.full(s["B"], s["N"], np.int32), np.full(s["B"], s["M"], np.int32)  # all real: same work
    def loss(a, b, la, lb):
      kw = dict(lengths_a=la, lengths_b=lb) if with_lengths else {}
      return _xla_op("chamfer_distance")(a, b, **kw)
    return _jax_runner(jax.value_and_grad(loss, argnums=(0, 1)), a, b, la, lb)
  return setup


RAGGED_CASES = (
    Case("chamfer_distance value+grad lengths", dict(B=4, N=16384, M=16384), dict(B=2, N=512, M=512), _bnm,
         lambda s: 2 * s["B"] * s["N"] * s["M"] * 8, "as nn_distance",
         (Impl("ffi", _chamfer_lengths(True), "xla_ops.chamfer_distance"),
          Impl("ffi without lengths", _chamfer_lengths(False), "xla_ops.chamfer_distance"))),
)
CASES = CASES + HALF_CASES + RAGGED_CASES
# bf16 no slower than float32 (0.9: the shared machine's noise, see the table's note).
TARGETS.update({c.name: [("ffi float32 inputs", 0.9)] for c in HALF_CASES})
TARGETS["chamfer_distance value+grad lengths"] = [("ffi without lengths", 1 / 1.2)]  # within 1.2x

def _available(needs: str) -> bool:
  if needs.startswith("xla_ops."):
    import xla_ops
    return needs.split(".", 1)[1] in xla_ops.__all__
  try:
    importlib.import_module(needs)
    return True
  except ImportError:
    return False


# ---- measuring (worker process) ------------------------------------------------------------------
def _status_kib(key: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def _first_run_peak_mib(run: Callable[[], Any]) -> float:
  """Runs ``run`` once; returns its peak RSS increase (MiB)."""
  import gc
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current RSS
  before = _status_kib("VmRSS")
  run()
  return (_status_kib("VmHWM") - before) / 1024


def _sizes(case: Case, quick: bool, gpu: bool) -> dict | None:
  if quick:
    return case.quick if (gpu or case.full is not None) else None
  return case.gpu if gpu else case.full


def _measure_case(case_name: str, quick: bool, repeats: int, gpu: bool = False) -> dict:
  """Measures every available implementation of one case in this process: label -> result."""
  case = next(c for c in CASES if c.name == case_name)
  sizes = _sizes(case, quick, gpu)
  runs, results = {}, {}
  for impl in case.impls:
    if gpu and not impl.needs.startswith("xla_ops."):
      continue  # the CPU tools are not GPU implementations
    if not _available(impl.needs):
      print(f"skip {case.name} / {impl.label}: {impl.needs} not available", file=sys.stderr)
      continue
    runs[impl.label] = impl.setup(sizes)
    peak = _first_run_peak_mib(runs[impl.label])
    if gpu:  # RSS says nothing about device memory: XLA's accounting of the compiled program instead
      xla_bytes = getattr(runs[impl.label], "xla_bytes", None)
      peak = float("nan") if xla_bytes is None else xla_bytes / 2**20
    results[impl.label] = dict(peak_mib=peak, times=[])
    runs[impl.label]()  # warm-up
    if (case_name, impl.label) in EXTRA:
      results[impl.label]["extra"] = EXTRA[case_name, impl.label](sizes)
  for _ in range(repeats):  # interleaved: every round times each implementation once
    for label, run in runs.items():
      start = time.perf_counter()
      run()
      results[label]["times"].append(time.perf_counter() - start)
  return results


# ---- driver ---------------------------------------------------------------------------------------
FP32_LANES_PER_SM = {"8.0": 64, "7.5": 64}  # others (8.6, 8.9, 9.0, 10.x, 12.x): 128


def gpu_peak() -> tuple[float, str]:
  """(fp32 flop/s, explanation) of the default GPU: SMs x fp32 lanes/SM x 2 (FMA) x max SM clock."""
  import jax
  device = jax.devices()[0]
  sms = getattr(device, "core_count", None) or 0
  cc = str(getattr(device, "compute_capability", ""))
  lanes = FP32_LANES_PER_SM.get(cc, 128)
  mhz = 0.0
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, timeout=30).stdout
    mhz = float(out.split()[0])
  except (OSError, ValueError, IndexError, subprocess.SubprocessError):
    pass
  peak = sms * lanes * 2 * mhz * 1e6
  note = (f"{device.device_kind}: {sms} SMs x {lanes} fp32 lanes x 2 (FMA) x {mhz:.0f} MHz (max SM clock, "
          f"nvidia-smi) = {peak / 1e12:.1f} TFLOP/s fp32 (compute capability {cc or '?'})")
  return peak, note


def _run_worker(case_name: str, quick: bool, repeats: int, gpu: bool = False) -> dict:
  """Measures one case in a fresh subprocess."""
  cmd = [sys.executable, "-m", "experiments.bench_ops", f"--worker={case_name}", f"--repeats={repeats}"]
  if quick:
    cmd.append("--quick")
  if gpu:
    cmd.append("--gpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  raise RuntimeError(f"{case_name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _fmt_ratio(x: float) -> str:
  return f"{x:.0f}x" if x >= 10 else f"{x:.2g}x"


def _fmt_time(t: float) -> str:
  return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def main(argv):
  del argv
  quick, repeats, gpu = _QUICK.value, (2 if _QUICK.value else _REPEATS.value), _GPU.value
  if _WORKER.value:
    print("RESULT " + json.dumps(_measure_case(_WORKER.value, quick, repeats, gpu)))
    return
  isolate = (not quick) if _ISOLATE.value is None else _ISOLATE.value
  measure = _run_worker if isolate else _measure_case
  if gpu:
    import jax
    peak, peak_note = gpu_peak() if jax.default_backend() == "gpu" else cpu_peak()
  else:
    peak, peak_note = cpu_peak()
  rows, extras, verdicts, records = [], [], [], []
  targets = GPU_TARGETS if gpu else TARGETS
  started = datetime.datetime.now(datetime.timezone.utc)
  for case in CASES:
    if _CASES.value and case.name not in _CASES.value:
      continue
    sizes = _sizes(case, quick, gpu)
    if sizes is None:
      continue
    results = measure(case.name, quick, repeats, gpu)
    for label, r in results.items():
      print(f"{case.name:28s} {label:26s} median {_fmt_time(statistics.median(r['times']))}  "
            f"peak +{r['peak_mib']:.0f} MiB", flush=True)
      if "extra" in r:
        extras.append(f"- {case.name}, {case.describe(sizes)}: {r['extra']}")
    if "ffi" not in results:
      continue
    ffi_time = statistics.median(results["ffi"]["times"])
    limit = case.flops(sizes) / peak if peak > 0 else float("nan")
    for label, r in results.items():
      med = statistics.median(r["times"])
      speedup = "" if label == "ffi" else f"{med / ffi_time:.1f}x"
      rows.append(f"| {case.name} | {case.describe(sizes)} | {label} | {_fmt_time(med)} | "
                  f"{_fmt_time(min(r['times']))} - {_fmt_time(max(r['times']))} | {r['peak_mib']:.0f} | "
                  f"{speedup} | {_fmt_ratio(med / limit)} |")
      records.append(dict(case=case.name, sizes=sizes, impl=label, median_s=med, min_s=min(r["times"]),
                          max_s=max(r["times"]), peak_mib=r["peak_mib"], x_of_limit=med / limit,
                          speedup_of_ffi=(med / ffi_time if label != "ffi" else None)))
    for other, target in targets.get(case.name, []):
      if other in results and not quick:
        got = statistics.median(results[other]["times"]) / ffi_time
        verdicts.append(dict(case=case.name, other=other, speedup=got, target=target, met=got >= target))
  verdict_lines = [f"- {v['case']}: ffi vs {v['other']}: {v['speedup']:.1f}x (target >= {v['target']:g}x): "
                   f"{'met' if v['met'] else 'NOT met'}" for v in verdicts]
  flop_notes = [f"- {c.name}: {c.flop_note}" for c in CASES if not _CASES.value or c.name in _CASES.value]
  if gpu:
    intro = [
        f"# xla_ops GPU benchmarks{' (quick sizes)' if quick else ''}",
        "",
        f"Generated by `python -m experiments.bench_ops --gpu{' --quick' if quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC; {peak_note}.",
        "",
        f"{'Each op/size is a fresh process' if isolate else 'One process'} that times its implementations "
        f"interleaved (round r runs each once): median of {repeats} rounds after one warm-up; jax functions are "
        "compiled ahead of time and every run blocks until its results are ready.",
        "",
        "MiB: XLA's memory accounting of the compiled program (arguments + outputs + temporaries, "
        "`compiled.memory_analysis()`); the custom calls allocate nothing else (their workspaces are outputs).",
        "",
        "x of limit: median time / (flops / peak fp32 rate); flop counts below.",
    ]
  else:
    intro = [
        "# xla_ops CPU benchmarks",
        "",
        f"Generated by `python -m experiments.bench_ops{' --quick' if quick else ''}` on "
        f"{started:%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, {peak_note}.",
        "",
        "The machine is a shared 2-core VM with other jobs running: timings are noisy (often +-30%) and all "
        f"ratios are taken from the same run. {'Each op/size is a fresh process' if isolate else 'One process'}"
        f" that times its implementations interleaved (round r runs each once): median of {repeats} rounds "
        "after one warm-up; jax functions are compiled ahead of time and XLA uses its default "
        "thread pool (one per core); scipy uses workers=-1; fpsample and POT are single-threaded and called "
        "per example.",
        "",
        "Peak MiB: peak RSS of an implementation's first execution minus the RSS just before it (inputs made, "
        "function compiled, malloc_trim), from /proc/self/status VmHWM after resetting it via "
        "/proc/self/clear_refs.",
        "",
        "x of limit: median time / (flops / peak fp32 rate). Flop counts are brute-force counts (below), "
        "so for tree-based searches a value below 1 means faster than any brute-force evaluation.",
        "",
        GPU_POINTER,
    ]
  lines = [
      *intro,
      "",
      f"| op | sizes | implementation | median | min - max | {'MiB' if gpu else 'peak MiB'} | ffi speed-up | x of limit |",
      "|---|---|---|---|---|---|---|---|",
      *rows,
      "",
  ]
  if verdict_lines:
    lines += ["## Targets (this run)", "", *verdict_lines, ""]
  if extras:
    lines += ["## Accuracy", "", *extras, ""]
  lines += ["## Flop counts", "", *flop_notes, ""]
  text = "\n".join(lines)
  print("\n" + text)
  default_out = None if (quick or gpu) else os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
  out = _OUT.value or default_out
  if out:
    write_keeping_sections(out, text)
    print(f"wrote {out}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(peak_flops=peak, peak_note=peak_note, rows=records, verdicts=verdicts, quick=quick,
                     repeats=repeats, started=f"{started:%Y-%m-%d %H:%M} UTC"), f, indent=1)


KEEP_MARKER = "<!-- Sections below this line are not written by experiments/bench_ops.py; it keeps them. -->"


def write_keeping_sections(path: str, generated: str) -> None:
  """Writes ``generated`` to ``path``, keeping whatever the file holds from KEEP_MARKER on (hand-written notes,
  the training-step profile of experiments/profile_step.py)."""
  kept = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    if KEEP_MARKER in old:
      kept = old[old.index(KEEP_MARKER):]
  with open(path, "w") as f:
    f.write(generated.rstrip("\n") + "\n\n" + (kept or KEEP_MARKER + "\n"))


if __name__ == "__main__":
  app.run(main)
