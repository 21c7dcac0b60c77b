r"""Profile of one quickstart training step per stage: where the time goes, and its FLOPs against the CPU's peak.

  python -m experiments.profile_step                          # sparse, dense, finetune; prints markdown
  python -m experiments.profile_step --stages=sparse --rounds=7 --data_root=runs/quickstart/data
  python -m experiments.profile_step --stages=sparse --xla_variants="|--xla_cpu_use_onednn=true"

Per stage (configs/quickstart.py sizes, synthetic batches of the stage's shapes, the real ``train.jit_steps``
step with its donation and non-finite guard):

1. Pieces jitted on their own, timed interleaved (round r runs each once; medians over rounds after a warm-up),
   each with XLA's cost-analysis FLOPs: the forward pass (train mode), forward + loss, forward + loss + backward
   (value_and_grad), the Adam update with the non-finite guard, the whole step, the whole step with Adam's
   moments as flat vectors (optax.flatten, tried and not kept); host -> device copy of one
   batch and device -> host copy of the step's metrics; with ``--data_root`` also one batch of the grain input
   pipeline (read on the consumer's thread, without the prefetch that hides it in training).
2. A jax.profiler trace of a few whole steps: every executed HLO op (XLA:CPU thunk) is mapped to its JAX
   name stack (the op_name metadata of the compiled HLO) and summed into parts: forward / backward x network
   part (encoder, decoder, dense levels) x kind (convolution, transposed convolution, matmul, batch norm,
   pooling, point ops, other element-wise), the loss, the optimizer, copies XLA inserted. Op times are summed over the
   threads that run them, so a part's share is of the busy CPU time, not of the wall time.

``--xla_variants`` instead times the whole sparse/dense/finetune step under different XLA_FLAGS, one child
process per (round, variant), variants interleaved within each round, and prints each variant's median step
time relative to the first variant (XLA_FLAGS must be set before jax starts, so they cannot share a process).

Peak: cores x nominal GHz (/proc/cpuinfo) x fp32 flops per cycle (64 with AVX-512 and two FMA units, 32 with
AVX2 + FMA; which one is printed). "% of peak" = FLOPs / (time x peak).
"""
from __future__ import annotations

import collections
import functools
import glob
import gzip
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import quickstart
from dpcr_jax import nonfinite, stages, train
from dpcr_jax.models import point_counts
from experiments.machine import cpu_peak, load_average

_STAGES = flags.DEFINE_list("stages", ["sparse", "dense", "finetune"], "Stages to profile.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (medians) after one warm-up round.")
_TRACE_STEPS = flags.DEFINE_integer("trace_steps", 3, "Whole steps traced for the per-part breakdown.")
_DATA_ROOT = flags.DEFINE_string("data_root", "", "Synthetic data root (experiments/main.py's runs/*/data): also "
                                 "time the input pipeline.")
_VARIANTS = flags.DEFINE_string("xla_variants", None, "'|'-separated XLA_FLAGS strings to compare (the first "
                                "is the baseline; '' = no flags), one child process per round and variant.")
_STEPS_PER_CHILD = flags.DEFINE_integer("steps_per_child", 8, "--xla_variants: timed steps per child (median).")
FLAT_ADAM = "whole step with flat Adam moments (optax.flatten, not kept)"

_CHILD = flags.DEFINE_bool("child", False, "Internal: time the whole step once under the current XLA_FLAGS.")


# ----------------------------------------------------------------------------------------------------------
# The stage's pieces.


def quickstart_setup(stage_name: str, data_root: str = ""):
  """(config, stage, model, tx, loss_fn, batches) at quickstart sizes; batches: 2 synthetic numpy batches."""
  config = quickstart.get_config(stage_name)
  config.data.root = data_root or tempfile.gettempdir()
  stage = stages.get(stage_name)
  counts = point_counts(config.model)
  b, s = config.batch_size, config.model.image_size
  batches = []
  for seed in range(2):
    rng = np.random.default_rng(seed)
    full = {"image": rng.random((b, s, s, 3), dtype=np.float32),
            "points_sparse": (0.3 * rng.standard_normal((b, counts["n_sparse"], 3))).astype(np.float32),
            "points_dense": (0.3 * rng.standard_normal((b, counts["n_dense"], 3))).astype(np.float32)}
    batches.append({k: full[k] for k in stage.batch_keys})
  return (config, stage, stage.build_model(config), train.make_optimizer(config), stage.make_loss_fn(config),
          batches)


def piece_functions(model, tx, loss_fn):
  """The step's pieces as pure functions of (state, batch) (grads for the optimizer piece)."""
  def forward(state, batch):
    return model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch, train=True,
                       mutable=["batch_stats"])

  def forward_loss(state, batch):
    outputs, _ = forward(state, batch)
    return loss_fn(outputs, batch, state.params)

  def forward_backward(state, batch):
    def objective(params):
      outputs, _ = forward(state.replace(params=params), batch)
      return loss_fn(outputs, batch, params)
    return jax.value_and_grad(objective, has_aux=True)(state.params)

  def optimizer(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    return nonfinite.keep_if_finite(finite, (params, opt_state), (state.params, state.opt_state))

  return {"forward (train mode)": forward, "forward + loss": forward_loss,
          "forward + loss + backward": forward_backward, "Adam + non-finite guard": optimizer}


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def time_pieces(stage_name: str, rounds: int, data_root: str) -> tuple[list[dict], dict]:
  """Medians and FLOPs of the pieces and the whole step; returns (rows, context for the trace)."""
  config, stage, model, tx, loss_fn, batches = quickstart_setup(stage_name, data_root)
  mesh = train.make_mesh()
  state = train.replicate(train.create_train_state(model, tx, jax.tree.map(jnp.asarray, batches[0]), config.seed),
                          mesh)
  device_batches = [train.shard_batch(b, mesh) for b in batches]
  step_fn, _ = train.jit_steps(model, tx, loss_fn, mesh)
  start = time.perf_counter()
  step_compiled = step_fn.lower(state, device_batches[0]).compile()
  step_compile_s = time.perf_counter() - start
  grads = jax.jit(lambda s, b: piece_functions(model, tx, loss_fn)["forward + loss + backward"](s, b)[1])(
      state, device_batches[0])

  pieces = {}
  for name, fn in piece_functions(model, tx, loss_fn).items():
    arg = grads if name.startswith("Adam") else device_batches[0]
    compiled = jax.jit(fn).lower(state, arg).compile()
    pieces[name] = (functools.partial(compiled, state, arg), flops_of(compiled))

  step_state = [jax.tree.map(jnp.copy, state)]

  def whole_step():
    step_state[0], metrics = step_compiled(step_state[0], device_batches[0])
    return metrics

  pieces["whole step (train.jit_steps)"] = (whole_step, flops_of(step_compiled))
  # The same step with Adam's moments as flat vectors (optax.flatten; tried and not kept, train.make_optimizer).
  flat_tx = optax.flatten(tx)
  flat_state = [train.replicate(train.create_train_state(model, flat_tx, jax.tree.map(
      jnp.asarray, batches[0]), config.seed), mesh)]
  flat_fn, _ = train.jit_steps(model, flat_tx, loss_fn, mesh)
  flat_compiled = flat_fn.lower(flat_state[0], device_batches[0]).compile()

  def flat_step():
    flat_state[0], metrics = flat_compiled(flat_state[0], device_batches[0])
    return metrics

  pieces[FLAT_ADAM] = (flat_step, flops_of(flat_compiled))
  pieces["host -> device, one batch"] = (lambda: train.shard_batch(batches[1], mesh), 0.0)
  metrics = whole_step()
  pieces["device -> host, step metrics"] = (lambda: jax.device_get(metrics), 0.0)
  if data_root:
    from dpcr_jax.data import make_iterator  # pylint: disable=g-import-not-at-top
    iterator = make_iterator(config.data, "train", config.batch_size, seed=0)
    next(iterator)

    def read_batch():
      return train.select_batch(next(iterator), stage)
    pieces["input pipeline, one batch (no prefetch overlap)"] = (read_batch, 0.0)

  times = collections.defaultdict(list)
  for r in range(rounds + 1):
    for name, (fn, _) in pieces.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      if r:  # round 0 warms up allocators and thread pools
        times[name].append(time.perf_counter() - start)
  rows = [dict(stage=stage_name, piece=name, median_s=statistics.median(times[name]), flops=flops)
          for name, (_, flops) in pieces.items()]
  context = dict(step_compiled=step_compiled, step_state=step_state, batch=device_batches[0],
                 compile_s=step_compile_s, batch_size=config.batch_size,
                 num_params=sum(x.size for x in jax.tree.leaves(state.params)))
  return rows, context


# ----------------------------------------------------------------------------------------------------------
# The trace, mapped to parts of the network.

_POINT_OPS = ("nn_distance", "chamfer", "earth_mover", "approx_match", "match_cost", "knn", "group_points",
              "ffi_call", "custom_call", "three_nn", "three_interpolate", "ball_query", "farthest")


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (opcode, JAX op_name metadata or '') of every instruction in the module text."""
  result = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(", line)
    if not m:
      continue
    meta = re.search(r'op_name="([^"]*)"', line)
    result[m.group(1)] = (m.group(2), meta.group(1) if meta else "")
  return result


def classify(opcode: str, op_name: str, hlo_name: str) -> str:
  """One HLO op -> 'direction: part / kind' (see the module docstring)."""
  if not op_name:
    if opcode == "copy" or hlo_name.startswith("copy"):
      return "other: copies inserted by XLA (state buffers)"
    return f"other: {opcode} without JAX metadata"
  if "transpose(jvp(" in op_name:
    direction = "backward"
  elif "jvp(" in op_name:
    direction = "forward"
  else:
    direction = "other"
  low = op_name.lower()
  if any(p in low for p in _POINT_OPS):
    kind = "point ops (xla_ops)"
  elif "conv_general_dilated" in low:
    kind = "transposed conv" if "/deconv" in low else "conv"
  elif "dot_general" in low:
    kind = "matmul (Dense, 1x1 conv)"
  elif re.search(r"/bn\d*/|/bn_\d+/|batchnorm", low):
    kind = "batch norm"
  elif "reduce_window" in low or "select_and_scatter" in low or "max_pool" in low:
    kind = "max pool"
  else:
    kind = "element-wise / other"
  if direction == "other":
    if "jit(_where)" in low or "select_n" in low:
      return "other: optimizer + non-finite guard (select)"
    if any(k in low for k in ("adam", "sqrt", "update", "apply_updates", "/mul", "/add", "/div", "square",
                              "reduce_sum", "isfinite")):
      return f"other: optimizer, loss means, grad norm ({kind})"
    return f"other: {kind}"
  part = "network"
  for key in ("encoder", "decoder", "level_1", "level_2", "dense"):
    if f"/{key}" in low:
      part = key
      break
  if kind == "point ops (xla_ops)" and "/" not in low.split("jvp(")[-1].split(")")[0] and part == "network":
    part = "loss"
  return f"{direction}: {part} / {kind}"


def trace_breakdown(context: dict, steps: int) -> tuple[list[tuple[str, float, int]], float, float]:
  """[(part, ms per step, ops per step)], busy ms per step, wall ms per step from a profiler trace."""
  names = hlo_op_names(context["step_compiled"].as_text())
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  compiled, state = context["step_compiled"], context["step_state"]
  jax.block_until_ready(state[0])
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(steps):
    state[0], metrics = compiled(state[0], context["batch"])
    jax.block_until_ready(metrics)
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  with gzip.open(files[-1]) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  busy, count = collections.Counter(), collections.Counter()
  for e in events:
    hlo = (e.get("args") or {}).get("hlo_op") or e["name"]
    if hlo not in names:
      continue
    opcode, op_name = names[hlo]
    part = classify(opcode, op_name, hlo)
    busy[part] += e["dur"] / 1000 / steps
    count[part] += 1
  rows = [(part, ms, count[part] // steps) for part, ms in busy.most_common()]
  return rows, sum(busy.values()), wall * 1000


# ----------------------------------------------------------------------------------------------------------
# XLA_FLAGS variants (one process each).


def child_main() -> None:
  stage_name = _STAGES.value[0]
  config, _, model, tx, loss_fn, batches = quickstart_setup(stage_name)
  mesh = train.make_mesh()
  state = train.replicate(train.create_train_state(model, tx, jax.tree.map(jnp.asarray, batches[0]), config.seed),
                          mesh)
  step_fn, _ = train.jit_steps(model, tx, loss_fn, mesh)
  batch = train.shard_batch(batches[0], mesh)
  times = []
  for _ in range(_STEPS_PER_CHILD.value + 2):
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  print("CHILD_RESULT " + json.dumps(dict(median_s=statistics.median(times[2:]), loss=float(metrics["loss"]))))


def compare_variants(variants: list[str], rounds: int) -> None:
  peak, peak_note = cpu_peak()
  print(f"{peak_note}; load average at start {load_average()}")
  results = collections.defaultdict(list)
  losses = {}
  for stage_name in _STAGES.value:
    for r in range(rounds):
      for v in variants:
        env = dict(os.environ, XLA_FLAGS=v)
        out = subprocess.run([sys.executable, "-m", "experiments.profile_step", "--child", f"--stages={stage_name}",
                              f"--steps_per_child={_STEPS_PER_CHILD.value}"], env=env, capture_output=True,
                             text=True, check=False)
        line = [l for l in out.stdout.splitlines() if l.startswith("CHILD_RESULT ")]
        if not line:
          print(f"{stage_name} {v!r}: failed\n{out.stderr[-2000:]}")
          continue
        res = json.loads(line[0].split(" ", 1)[1])
        results[(stage_name, v)].append(res["median_s"])
        losses[(stage_name, v)] = res["loss"]
        print(f"  round {r} {stage_name} {v or '(none)'}: {res['median_s'] * 1000:.1f} ms", flush=True)
    base = statistics.median(results[(stage_name, variants[0])]) if results[(stage_name, variants[0])] else None
    print(f"\n| stage | XLA_FLAGS | median step | vs first | loss after {_STEPS_PER_CHILD.value + 2} steps |")
    print("|---|---|---|---|---|")
    for v in variants:
      if results[(stage_name, v)]:
        med = statistics.median(results[(stage_name, v)])
        print(f"| {stage_name} | `{v or '(none)'}` | {med * 1000:.1f} ms | {base / med:.2f}x | "
              f"{losses[(stage_name, v)]:.6f} |")
  print(f"load average at end {load_average()}")


# ----------------------------------------------------------------------------------------------------------


def main(argv):
  del argv
  if _CHILD.value:
    child_main()
    return
  if _VARIANTS.value is not None:
    compare_variants(_VARIANTS.value.split("|"), _ROUNDS.value)
    return
  peak, peak_note = cpu_peak()
  print(f"{peak_note}\nXLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax {jax.__version__}; "
        f"load average at start {load_average()}\n")
  for stage_name in _STAGES.value:
    rows, context = time_pieces(stage_name, _ROUNDS.value, _DATA_ROOT.value)
    parts, busy_ms, wall_ms = trace_breakdown(context, _TRACE_STEPS.value)
    step = next(r for r in rows if r["piece"].startswith("whole step"))
    print(f"### {stage_name} (batch {context['batch_size']}, {context['num_params'] / 1e6:.2f}M parameters; "
          f"step compile {context['compile_s']:.0f} s; load {load_average()})\n")
    print("| piece | median | GFLOP | % of peak |\n|---|---|---|---|")
    for r in rows:
      flops = r["flops"]
      gflop = f"{flops / 1e9:.2f}" if flops == flops and flops > 0 else "-"
      share = f"{100 * flops / (r['median_s'] * peak):.1f}%" if flops == flops and flops > 0 else "-"
      print(f"| {r['piece']} | {r['median_s'] * 1000:.1f} ms | {gflop} | {share} |")
    flat = next(r for r in rows if r["piece"] == FLAT_ADAM)
    print(f"\nWhole step, flat Adam / per-leaf Adam (train.make_optimizer): "
          f"{flat['median_s'] / step['median_s']:.2f}x")
    print(f"\nTrace of {_TRACE_STEPS.value} whole steps: wall {wall_ms:.1f} ms/step, HLO ops busy {busy_ms:.1f} "
          f"ms/step summed over threads ({busy_ms / wall_ms:.2f} of {os.cpu_count()} cores busy).\n")
    print("| part | busy ms/step | share | ops/step |\n|---|---|---|---|")
    for part, ms, n in parts:
      print(f"| {part} | {ms:.1f} | {100 * ms / busy_ms:.0f}% | {n} |")
    print(flush=True)
  print(f"load average at end {load_average()}")


if __name__ == "__main__":
  app.run(main)
