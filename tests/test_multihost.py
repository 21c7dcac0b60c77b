"""Multi-host training on one machine: 2 processes x 2 CPU devices joined by jax.distributed (gloo).

Each process runs ``train.train_and_evaluate`` (tests/multihost_worker.py) on the stand-in model, loading its
half of every global batch through the real batching (dpcr_jax.data.pipeline.batch_iterator); both must end
with the parameters of a single-process, single-device run with the same global batch size and seed (so the
processes read disjoint halves of the same global batches), and a second launch must resume from the shared
checkpoints.
"""
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import standins
from dpcr_jax import train

_WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES, GLOBAL_BATCH = 2, 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir: str, num_steps: int) -> list[str]:
  """Runs the worker processes to completion; returns their logs."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(_WORKER), _REPO]))
  logs = [f"{workdir}.{pid}.log" for pid in range(NUM_PROCESSES)]
  procs = []
  for pid, log in enumerate(logs):
    with open(log, "ab") as out:  # the child keeps its own copy of the descriptor
      procs.append(subprocess.Popen(
          [sys.executable, _WORKER, workdir, str(pid), str(NUM_PROCESSES), str(port), str(num_steps)],
          cwd=_REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  try:
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  texts = [open(l).read() for l in logs]
  assert codes == [0] * NUM_PROCESSES, "\n\n".join(t[-3000:] for t in texts)
  return texts


def _worker_params(workdir: str, pid: int) -> list[np.ndarray]:
  with np.load(os.path.join(workdir, f"params_{pid}.npz")) as f:
    return [f[f"arr_{i}"] for i in range(len(f.files))]


def _single_device_reference(snapshot_steps: tuple[int, ...], seed: int = 0) -> dict[int, list[np.ndarray]]:
  """The same training in this one process on one device, reading whole global batches; returns the
  parameter leaves after each of ``snapshot_steps``."""
  config = standins.tiny_config("sparse", "unused")
  config.seed = seed
  assert config.batch_size == GLOBAL_BATCH
  batches = standins.inputs(config).train  # one process: shard 0 of 1 = the whole global batch
  stage = standins.stage("sparse")
  model, loss_fn = stage.build_model(config), stage.make_loss_fn(config)
  tx = train.make_optimizer(config)
  mesh = train.make_mesh(jax.devices()[:1])
  state, snapshots = None, {}
  train_fn, _ = train.jit_steps(model, tx, loss_fn, mesh)
  for step in range(1, max(snapshot_steps) + 1):
    batch = train.select_batch(next(batches), stage)
    if state is None:
      state = train.replicate(train.create_train_state(model, tx, jax.tree.map(jnp.asarray, batch),
                                                       config.seed), mesh)
    state, _ = train_fn(state, train.shard_batch(batch, mesh))
    if step in snapshot_steps:
      snapshots[step] = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
  return snapshots


# Float32 reduction order (4 devices vs 1) moves parameters by ~1e-5 in 6 steps; other batches (another data
# seed) move them by > 1e-2 (measured in one process).
ATOL = 1e-4


def _assert_params_close(actual, expected):
  assert len(actual) == len(expected)
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=ATOL)


def test_two_process_training_matches_single_device_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  reference = _single_device_reference((6, 8))
  other_batches = _single_device_reference((6,), seed=1)[6]
  assert max(np.abs(a - b).max() for a, b in zip(reference[6], other_batches)) > 10 * ATOL
  logs = _launch(workdir, num_steps=6)
  assert "4 devices, global batch 8" in logs[0], logs[0][-2000:]
  per_process = [_worker_params(workdir, pid) for pid in range(NUM_PROCESSES)]
  for a, b in zip(*per_process):  # every process holds the same replicated parameters
    np.testing.assert_array_equal(a, b)
  _assert_params_close(per_process[0], reference[6])
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())[-1] == 6

  logs = _launch(workdir, num_steps=8)  # a second launch continues from the shared step-6 checkpoint
  assert all("Resumed from step 6" in l for l in logs), logs[0][-2000:]
  for pid in range(NUM_PROCESSES):
    _assert_params_close(_worker_params(workdir, pid), reference[8])
