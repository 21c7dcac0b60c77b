r"""One command that proves the GPU path and records every number the first GPU hour should produce.

  python -m experiments.gpu_check --out DIR            # on a machine with one NVIDIA GPU (~8 min on an H200)
  python -m experiments.gpu_check --out DIR --cpu-smoke  # the same steps at tiny sizes on the CPU (CI, <1 min)

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is reported as such
and the later steps still run, within --budget-s overall):

1. environment: Python, jax/jaxlib/flax/optax versions, GPU name, SMs, compute capability, driver, nvcc.
2. build: ``XLA_OPS_CUDA=ON XLA_OPS_CUDA_ARCHS=<this GPU's> pip install --no-build-isolation --no-deps -e .``
   then checks that ``xla_ops._xla_ops_cuda`` imports and registers every target.
3. pytest: the whole suite with the GPU as JAX's default device (tests/conftest.py pins the CPU-semantics
   tests to the CPU; tests/test_cuda.py compares every CUDA handler with the CPU handler and numpy), in 4
   pytest-xdist workers when xdist is installed (it is on the lent machine).
4. bench_ops --gpu: ffi vs jnp on the same GPU at the paper's sizes (nn_distance / chamfer value+grad B=32
   N=M=16384, FPS B=32 16384 -> 4096, knn B=32 N=4096 C=64 k=20, ball_query B=32 N=16384 M=1024,
   approx_match+match_cost B=32 N=M=1024 and B=4 N=M=16384), with XLA's memory accounting and each time as
   a multiple of the GPU's fp32 limit.
5. bench_step: the finetune training step at paper shapes (image 256, 1024 -> 4096 -> 16384 points), batch
   10 as the original, ffi vs jnp, images/s.
6. train smoke: sparse -> dense -> finetune, --train-steps steps each at paper sizes on synthetic data made
   here (random ellipsoids and their orthographic depth images; the finetune stage starts from the two
   trained stages' parameters), ffi ops; records losses and steps/s. It uses the model, losses and optax
   directly, not dpcr_jax.train (whose data pipeline needs grain, and checkpointing orbax): it proves the
   GPU training computation, not the input pipeline.

All steps share one persistent compilation cache (DIR/jax_cache). --steps runs a subset (e.g. a second call
with --skip-build --steps=bench_step,train_smoke finishes a run that hit the budget); the report reads every
step's JSON from DIR, so results of an earlier call into the same DIR stay in it.

Then it writes DIR/gpu.md (and, for a GPU run, docs/gpu.md): versions, GPU, a table per step, every ratio
against the targets of issue 10 (nn_distance >= 10x chunked jnp, knn C=64 >= 3x jnp top_k, FPS >= 10x jnp
fori_loop, approx_match+match_cost >= 5x jnp, finetune step with ffi >= 1.5x jnp) and each op's time as a
multiple of the GPU's fp32 limit. DIR also gets each step's log and JSON.

--cpu-smoke runs the same steps on the CPU (JAX_PLATFORMS=cpu) at tiny sizes: no build (it checks the
installed extension and shows the command), pytest on tests/test_cuda.py only, bench_ops at its quick sizes,
and bench_step / train smoke with tests/standins.py's tiny models (the real network takes minutes to compile
on a small CPU). It proves the orchestration and the report, not the GPU; tests/test_gpu_check.py runs it.

Preparing the GPU machine
-------------------------
The lent machine has no network. It already has Python 3.12, jax 0.11 with the CUDA 13 plugin, nvcc 13,
flax, optax, orbax-checkpoint, chex, pybind11, scikit-build-core, cmake, ninja, h5py, imageio, pillow,
scipy, pytest, pyyaml, absl-py, etils, cloudpickle, protobuf and tqdm (the device README's KINDS.md). Carry
the nine missing wheels (cp312, manylinux x86_64; 38 MB, POT 32 MB of it) in shared/wheels/, fetched where
there is network:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --platform any -d shared/wheels ml-collections grain array-record portpicker trimesh tensorboardX \
        moderngl glcontext POT

(on 2026-12-03: ml_collections 1.1.0, grain 0.2.18, array_record 0.8.6, portpicker 1.6.0, trimesh 5.2.0,
tensorboardx 2.6.5, moderngl 5.13.0, glcontext 3.1.0, pot 0.9.7.post1; every other dependency of theirs is
on the machine). Then, on the GPU machine, from the repository root:

    pip install --no-build-isolation --no-index --find-links shared/wheels \
        ml-collections grain trimesh tensorboardX moderngl POT
    python -m experiments.gpu_check --out /tmp/gpu_check

ml-collections is needed by the model code (the bench_step and train-smoke steps fail at import without it,
and the report says so); grain, trimesh, tensorboardX, moderngl and POT by parts of the test suite (without
them those tests fail in the pytest step; tests/test_bench_smoke.py checks POT's exact-EMD comparison).
fpsample is optional (bench_ops skips its CPU comparison without it; --gpu never runs it). gpu_check builds
the CUDA extension itself
(XLA_OPS_CUDA=ON XLA_OPS_CUDA_ARCHS=<this GPU> pip install --no-build-isolation --no-deps -e .), and the
whole check must fit in 8 minutes on one H200, build included (--budget-s, default 480).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("build", "pytest", "bench_ops", "bench_step", "train_smoke")
STEP_TARGET = 1.5  # finetune step: jnp time / ffi time (issue 10)


# ---- running steps ----------------------------------------------------------------------------------------------
class Runner:
  """Runs steps as subprocesses under an overall budget; records (name, status, seconds, note)."""

  def __init__(self, out_dir: str, budget_s: float, env: dict):
    self.out_dir, self.deadline, self.env = out_dir, time.monotonic() + budget_s, env
    self.steps: list[dict] = []

  def run(self, name: str, cmd: list[str], cap_s: float, env: dict | None = None) -> tuple[bool, str]:
    """Runs ``cmd`` (cwd = repository root) with at most ``cap_s`` seconds; returns (ok, output)."""
    limit = min(cap_s, self.deadline - time.monotonic())
    log = os.path.join(self.out_dir, f"{name}.log")
    if limit < 5:
      self.steps.append(dict(name=name, status="not run (time budget spent)", seconds=0.0, cmd=" ".join(cmd)))
      return False, ""
    start = time.monotonic()
    print(f"== {name}: {' '.join(cmd)} (limit {limit:.0f} s)", flush=True)
    try:
      proc = subprocess.run(cmd, cwd=ROOT, env={**self.env, **(env or {})}, capture_output=True, text=True,
                            timeout=limit)
      output, status = proc.stdout + proc.stderr, ("ok" if proc.returncode == 0 else f"failed (rc {proc.returncode})")
    except subprocess.TimeoutExpired as e:
      output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
      output += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
      status = f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - start
    with open(log, "w") as f:
      f.write(output)
    self.steps.append(dict(name=name, status=status, seconds=seconds, cmd=" ".join(cmd)))
    print(f"   {status} in {seconds:.1f} s (log: {log})", flush=True)
    return status == "ok", output


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ---- environment ------------------------------------------------------------------------------------------------
def environment(cpu_smoke: bool) -> dict:
  import jax
  env = dict(python=platform.python_version(), jax=jax.__version__)
  for name in ("jaxlib", "flax", "optax", "orbax.checkpoint", "numpy"):
    try:
      env[name] = __import__(name, fromlist=["__version__"]).__version__
    except (ImportError, AttributeError):
      env[name] = "missing"
  device = jax.devices()[0]
  env.update(backend=jax.default_backend(), device=str(device), device_kind=device.device_kind,
             sms=getattr(device, "core_count", None), compute_capability=getattr(device, "compute_capability", None))
  for key, cmd in (("nvidia_smi", ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                   "--format=csv,noheader"]), ("nvcc", ["nvcc", "--version"])):
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
      env[key] = out.splitlines()[-1] if out else "no output"
    except (OSError, subprocess.SubprocessError):
      env[key] = "not found"
  if cpu_smoke:
    try:
      with open("/proc/cpuinfo") as f:
        env["cpu"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
      env["cpu"] = platform.processor()
  return env


# ---- train smoke (worker) ---------------------------------------------------------------------------------------
def synthetic_shapes(num: int, image_size: int, n_sparse: int, n_dense: int, seed: int = 0) -> dict:
  """``num`` random ellipsoids (axes in [0.15, 0.45], random rotation), their surface samples ([num, n_dense,
  3] and the first n_sparse of them) and orthographic depth images [num, S, S, 3] (occupancy, depth, 1):
  a learnable image -> cloud mapping made on the spot."""
  import numpy as np
  rng = np.random.default_rng(seed)
  dense = rng.standard_normal((num, n_dense, 3))
  dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
  dense *= rng.uniform(0.15, 0.45, (num, 1, 3))
  q, _ = np.linalg.qr(rng.standard_normal((num, 3, 3)))
  dense = np.einsum("bij,bnj->bni", q, dense).astype(np.float32)
  images = np.zeros((num, image_size, image_size, 3), np.float32)
  images[..., 2] = 1.0
  pix = np.clip(((dense[..., :2] + 0.5) * image_size).astype(int), 0, image_size - 1)
  for i in range(num):
    images[i, pix[i, :, 1], pix[i, :, 0], 0] = 1.0
    images[i, pix[i, :, 1], pix[i, :, 0], 1] = 0.5 + dense[i, :, 2]
  return {"image": images, "points_sparse": np.ascontiguousarray(dense[:, :n_sparse]), "points_dense": dense}


def train_worker(args) -> dict:
  """sparse -> dense -> finetune on synthetic shapes; returns per-stage losses and speed."""
  import functools
  import jax
  import numpy as np
  import optax
  from experiments.bench_step import LEARNING_RATE, _make_step, model_api
  api = model_api(args.model_module, args.image_size)
  data = synthetic_shapes(4 * args.batch_size, api.image_size, api.n_sparse, api.n_dense)
  num = len(data["image"])
  results, trained = {}, {}
  for stage in ("sparse", "dense", "finetune"):
    model = api.build(stage, "ffi")
    optimizer = optax.adam(LEARNING_RATE)
    first = jax.tree.map(lambda x: x[: args.batch_size], data)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"), first)
    params, stats = variables["params"], variables.get("batch_stats", {})
    from_trained = stage == "finetune" and {"sparse", "dense"} <= set(params)
    if from_trained:  # start from the two trained stages, as the paper's finetune does
      params = {**params, "sparse": trained["sparse"][0], "dense": trained["dense"][0]}
      stats = {**stats, **{k: trained[k][1] for k in ("sparse", "dense") if k in stats}}
    step = _make_step(model, api.loss_config, "ffi", optimizer, stage, api.compute_loss)
    state = (params, stats, optimizer.init(params))
    start = time.perf_counter()
    batch0 = jax.device_put(first)
    compiled = step.lower(*state, batch0).compile()
    compile_s = time.perf_counter() - start
    losses, start = [], time.perf_counter()
    for i in range(args.train_steps):
      lo = (i * args.batch_size) % num
      batch = jax.device_put(jax.tree.map(lambda x: x[lo: lo + args.batch_size], data))
      *state, loss = compiled(*state, batch)
      losses.append(loss)
    losses = [float(l) for l in jax.device_get(losses)]
    seconds = time.perf_counter() - start
    trained[stage] = (state[0], state[1])
    k = max(1, len(losses) // 10)
    results[stage] = dict(compile_s=compile_s, steps=len(losses), seconds=seconds,
                          steps_per_s=len(losses) / seconds, images_per_s=len(losses) * args.batch_size / seconds,
                          first_loss=float(np.mean(losses[:k])), last_loss=float(np.mean(losses[-k:])),
                          finite=bool(np.all(np.isfinite(losses))), from_trained_stages=from_trained)
    print(f"{stage}: {results[stage]}", flush=True)
  return dict(batch_size=args.batch_size, image_size=api.image_size, n_sparse=api.n_sparse, n_dense=api.n_dense,
              device=str(jax.devices()[0]), stages=results)


# ---- report -----------------------------------------------------------------------------------------------------
def _fmt_s(t):
  return "-" if t is None else (f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s")


def report(args, env: dict, runner: Runner, pytest_summary: str, ops: dict | None, step: dict | None,
           train: dict | None) -> str:
  now = datetime.datetime.now(datetime.timezone.utc)
  mode = "CPU smoke run (tiny sizes, not a GPU result)" if args.cpu_smoke else "GPU run"
  lines = [
      "# xla_ops and the training step on a GPU",
      "",
      f"Generated by `python -m experiments.gpu_check{' --cpu-smoke' if args.cpu_smoke else ''}` on "
      f"{now:%Y-%m-%d %H:%M} UTC: {mode}. The machine preparation (wheels to carry, install command) is in the "
      "script's docstring and in the section below.",
      "",
      "## Environment",
      "",
      *[f"- {k}: {v}" for k, v in env.items()],
      "",
      "## Steps",
      "",
      "| step | status | seconds |",
      "|---|---|---|",
      *[f"| {s['name']} | {s['status']} | {s['seconds']:.1f} |" for s in runner.steps],
      "",
      f"pytest: {pytest_summary or 'no summary (see pytest.log)'}",
      "",
      "## Point ops: ffi vs jnp on the same device (bench_ops)",
      "",
  ]
  if ops:
    lines += [f"Peak fp32: {ops['peak_note']}. x of limit = median time / (op flops / peak fp32); the flop counts "
              "are in bench_ops.md.", "",
              "| op | sizes | impl | median | XLA MiB | ffi speed-up | x of fp32 limit |", "|---|---|---|---|---|---|---|"]
    for r in ops["rows"]:
      sizes = " ".join(f"{k}={v}" for k, v in r["sizes"].items())
      speed = "" if r["speedup_of_ffi"] is None else f"{r['speedup_of_ffi']:.1f}x"
      lines.append(f"| {r['case']} | {sizes} | {r['impl']} | {_fmt_s(r['median_s'])} | {r['peak_mib']:.0f} | "
                   f"{speed} | {r['x_of_limit']:.3g} |")
    lines += ["", "Targets (ffi speed-up over jnp, same run):", ""]
    lines += [f"- {v['case']}: {v['speedup']:.1f}x vs {v['other']} (target >= {v['target']:g}x): "
              f"{'met' if v['met'] else 'NOT met'}" for v in ops["verdicts"]] or ["- (quick sizes: no verdicts)"]
  else:
    lines.append("No results (see the steps table and bench_ops.log).")
  lines += ["", "## Training step (bench_step)", ""]
  if step:
    lines += [f"{step['stage']} step, batch {step['batch_size']}, image {step['image_size']}, on {step['device']}.", "",
              "| ops | compile | step median | images/s |", "|---|---|---|---|"]
    for impl, r in step["impls"].items():
      lines.append(f"| {impl} | {r['compile_s']:.1f} s | {_fmt_s(r['median_s'])} | {r['images_per_s']:.1f} |")
    if step.get("jnp_over_ffi"):
      ratio = step["jnp_over_ffi"]
      lines += ["", f"ffi speed-up (jnp step time / ffi step time): {ratio:.2f}x (target >= {STEP_TARGET}x): "
                f"{'met' if ratio >= STEP_TARGET else 'NOT met'}"]
  else:
    lines.append("No results (see the steps table and bench_step.log).")
  lines += ["", "## Training smoke test (sparse -> dense -> finetune, synthetic ellipsoids)", ""]
  if train:
    lines += [f"batch {train['batch_size']}, image {train['image_size']}, points {train['n_sparse']} -> "
              f"{train['n_dense']}, on {train['device']}; losses are means of the first / last tenth of the steps.",
              "", "| stage | steps | compile | steps/s | images/s | first loss | last loss | finite |",
              "|---|---|---|---|---|---|---|---|"]
    for stage, r in train["stages"].items():
      lines.append(f"| {stage} | {r['steps']} | {r['compile_s']:.1f} s | {r['steps_per_s']:.2f} | "
                   f"{r['images_per_s']:.1f} | {r['first_loss']:.5g} | {r['last_loss']:.5g} | {r['finite']} |")
    finetune = train["stages"].get("finetune", {})
    lines += ["", "finetune started from the trained sparse and dense parameters: "
              f"{finetune.get('from_trained_stages', False)}"]
  else:
    lines.append("No results (see the steps table and train_smoke.log).")
  lines += ["", PREPARATION]
  return "\n".join(lines) + "\n"


# The machine preparation, from the docstring (its one home), as a markdown section.
PREPARATION = "## Preparing the GPU machine\n\n" + __doc__.split("-------------------------\n", 1)[1].strip()


# ---- driver -----------------------------------------------------------------------------------------------------
def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="Directory for logs, JSON and gpu.md.")
  parser.add_argument("--cpu-smoke", action="store_true", help="Tiny sizes on the CPU (see the docstring).")
  parser.add_argument("--skip-build", action="store_true", help="Use the installed extensions.")
  parser.add_argument("--budget-s", type=float, default=480.0, help="Overall time budget of the steps.")
  parser.add_argument("--train-steps", type=int, default=None, help="Steps per stage (default 100; smoke 3).")
  parser.add_argument("--docs", default=None, help="Also write the report here (default: docs/gpu.md for a GPU "
                      "run, nowhere for --cpu-smoke).")
  parser.add_argument("--steps", default=",".join(STEPS), help=f"Comma-separated subset of {','.join(STEPS)} "
                      "(e.g. to finish a run that hit the budget: --skip-build --steps=bench_step,train_smoke).")
  parser.add_argument("--pytest-workers", type=int, default=None,
                      help="pytest-xdist workers for the GPU run (default 4 when xdist is installed, else 0).")
  parser.add_argument("--train-worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--model-module", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--image-size", type=int, default=256, help=argparse.SUPPRESS)
  parser.add_argument("--batch-size", type=int, default=10, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.train_steps is None:
    args.train_steps = 3 if args.cpu_smoke else 100

  if args.train_worker:
    result = train_worker(args)
    with open(os.path.join(args.out, "train_smoke.json"), "w") as f:
      json.dump(result, f, indent=1)
    return

  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user would run it
  smoke_env = {}
  if args.cpu_smoke:
    smoke_env = {"JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(
        p for p in (os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")) if p)}
    env.update(smoke_env)
    os.environ.update(smoke_env)
  runner = Runner(args.out, args.budget_s, env)
  py = sys.executable
  info = environment(args.cpu_smoke)
  print(json.dumps(info, indent=1), flush=True)
  gpu = not args.cpu_smoke
  if gpu and info["backend"] != "gpu":
    print("gpu_check: JAX sees no GPU (use --cpu-smoke on a CPU machine)", file=sys.stderr)
    sys.exit(2)

  selected = set(args.steps.split(","))
  if selected - set(STEPS):
    parser.error(f"--steps: unknown {sorted(selected - set(STEPS))}; choose from {STEPS}")
  # One persistent compilation cache for every step: the train smoke's finetune step is bench_step's.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.out, "jax_cache"))

  # 2. build
  cc = str(info.get("compute_capability") or "9.0").replace(".", "")
  build_cmd = [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
  check_cmd = [py, "-c", "import xla_ops, importlib; m = importlib.import_module('xla_ops._xla_ops_{}'); "
               "print(sorted(m.registrations()))".format("cpu" if args.cpu_smoke else "cuda")]
  if "build" in selected:
    if args.cpu_smoke or args.skip_build:
      why = "--cpu-smoke" if args.cpu_smoke else "--skip-build"
      runner.steps.append(dict(name="build", status=f"skipped ({why}): would run XLA_OPS_CUDA=ON "
                               f"XLA_OPS_CUDA_ARCHS={cc} {' '.join(build_cmd[1:])}", seconds=0.0))
    else:
      runner.run("build", build_cmd, 240, env={"XLA_OPS_CUDA": "ON", "XLA_OPS_CUDA_ARCHS": cc})
  runner.run("extension", check_cmd, 60)

  # 3. pytest (the GPU run in parallel workers when pytest-xdist is there; no GPU memory preallocation then)
  summary = ""
  if "pytest" in selected:
    tests = ["tests/test_cuda.py"] if args.cpu_smoke else ["tests"]
    workers = args.pytest_workers
    if workers is None:
      workers = 4 if (gpu and importlib.util.find_spec("xdist") is not None) else 0
    extra = ["-n", str(workers)] if workers else []
    _, out = runner.run("pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *tests], 240,
                        env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    summary = next((l.strip("= ") for l in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed)", l)), "")

  # 4. bench_ops (one process: the memory figures come from XLA's accounting, not from the process)
  ops_json = os.path.join(args.out, "bench_ops.json")
  if "bench_ops" in selected:
    ops_cmd = [py, "-m", "experiments.bench_ops", "--gpu", "--isolate=false",
               f"--out={os.path.join(args.out, 'bench_ops.md')}", f"--json={ops_json}"]
    ops_cmd += (["--quick", "--cases=nn_distance,knn,approx_match+match_cost"] if args.cpu_smoke
                else ["--repeats=5"])
    runner.run("bench_ops", ops_cmd, 180)

  # 5. bench_step
  step_json = os.path.join(args.out, "bench_step.json")
  if "bench_step" in selected:
    step_cmd = [py, "-m", "experiments.bench_step", f"--json={step_json}"]
    step_cmd += (["--model_module=standins", "--batch_size=2", "--steps=1"] if args.cpu_smoke
                 else ["--batch_size=10", "--steps=5", "--image_size=256"])
    runner.run("bench_step", step_cmd, 200)

  # 6. train smoke
  if "train_smoke" in selected:
    train_cmd = [py, "-m", "experiments.gpu_check", "--train-worker", f"--out={args.out}",
                 f"--train-steps={args.train_steps}"]
    train_cmd += (["--model-module=standins", "--batch-size=2"] if args.cpu_smoke else ["--batch-size=10"])
    runner.run("train_smoke", train_cmd, 200)

  text = report(args, info, runner, summary, _read_json(ops_json), _read_json(step_json),
                _read_json(os.path.join(args.out, "train_smoke.json")))
  path = os.path.join(args.out, "gpu.md")
  with open(path, "w") as f:
    f.write(text)
  print(text)
  docs = args.docs or (None if args.cpu_smoke else os.path.join(ROOT, "docs", "gpu.md"))
  if docs:
    shutil.copyfile(path, docs)
    print(f"wrote {docs}")
  failed = [s["name"] for s in runner.steps if not (s["status"] == "ok" or s["status"].startswith("skipped"))]
  if failed:
    print(f"gpu_check: steps not ok: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
