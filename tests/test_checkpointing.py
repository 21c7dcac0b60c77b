"""Checkpoints: kill -9 and resume, damaged latest step, finetune init from stage checkpoints, inference load."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import standins
from dpcr_jax import checkpointing

_SCRIPT = os.path.join(os.path.dirname(__file__), "standins.py")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(workdir, steps):
  """Trains the stand-in sparse model in a subprocess on one CPU device; its log goes to <workdir>.log."""
  env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=_REPO)
  log = open(workdir + ".log", "ab")
  return subprocess.Popen([sys.executable, _SCRIPT, workdir, str(steps)], cwd=_REPO, env=env,
                          stdout=log, stderr=log)


def _log(workdir):
  with open(workdir + ".log") as f:
    return f.read()


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _assert_same_variables(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_killed_run_resumes_to_the_same_params(tmp_path):
  steps = 16
  reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
  ref_proc = _run(reference, steps)
  proc = _run(killed, steps)
  deadline = time.time() + 60
  while time.time() < deadline and not [s for s in _steps(killed) if s >= 4] and proc.poll() is None:
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed; " + _log(killed)[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = _steps(killed)
  assert saved and saved[-1] < steps
  resumed = _run(killed, steps)
  assert resumed.wait(timeout=120) == 0, _log(killed)[-3000:]
  assert ref_proc.wait(timeout=120) == 0, _log(reference)[-3000:]
  assert f"Resumed from step {saved[-1]}" in _log(killed)
  _assert_same_variables(checkpointing.load_variables(killed), checkpointing.load_variables(reference))


def _trained_state(tmp_path, monkeypatch, stage, name, steps=8):
  del monkeypatch
  config = standins.tiny_config(stage, str(tmp_path))
  config.num_train_steps, config.checkpoint_every, config.eval_every = steps, 4, 100
  workdir = str(tmp_path / name)
  return standins.run_training(config, workdir), workdir, config


def test_damaged_latest_checkpoint_falls_back_to_previous(tmp_path, monkeypatch):
  _, workdir, config = _trained_state(tmp_path, monkeypatch, "sparse", "run")
  assert _steps(workdir) == [4, 8]
  step8 = os.path.join(workdir, "checkpoints", "8", "variables")
  for root, _, files in os.walk(step8):  # damage every data file of step 8's variables
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  before = checkpointing.load_variables(os.path.join(workdir, "checkpoints"), step=4)
  assert_close = checkpointing.load_variables(workdir)  # falls back to step 4
  _assert_same_variables(assert_close, before)
  # And the training loop resumes from step 4 (then trains to 8 again).
  config.num_train_steps = 8
  state = standins.run_training(config, workdir)
  assert int(state.step) == 8


def test_finetune_starts_from_stage_checkpoints(tmp_path, monkeypatch):
  sparse_state, sparse_dir, _ = _trained_state(tmp_path, monkeypatch, "sparse", "sparse")
  dense_state, dense_dir, _ = _trained_state(tmp_path, monkeypatch, "dense", "dense")
  config = standins.tiny_config("finetune", str(tmp_path))
  config.init.sparse_checkpoint, config.init.dense_checkpoint = sparse_dir, dense_dir
  config.num_train_steps = 1
  captured = {}
  original = checkpointing.init_finetune_state

  def spy(state, *paths):
    state = original(state, *paths)
    captured["state"] = jax.device_get(state)  # a copy: the training step donates the state's buffers
    return state

  monkeypatch.setattr(checkpointing, "init_finetune_state", spy)
  standins.run_training(config, str(tmp_path / "finetune"))
  init = captured["state"]
  _assert_same_variables(init.params["sparse"], jax.device_get(sparse_state.params))
  _assert_same_variables(init.batch_stats["sparse"], jax.device_get(sparse_state.batch_stats))
  _assert_same_variables(init.params["dense"], jax.device_get(dense_state.params))
  assert int(init.step) == 0


def test_stage_checkpoint_with_other_shapes_is_rejected(tmp_path, monkeypatch):
  _, dense_dir, _ = _trained_state(tmp_path, monkeypatch, "dense", "dense", steps=4)
  config = standins.tiny_config("finetune", str(tmp_path))
  config.init.sparse_checkpoint = dense_dir  # wrong stage
  with pytest.raises(ValueError, match="do not match the finetune model's 'sparse'"):
    standins.run_training(config, str(tmp_path / "finetune"))


def test_load_variables_errors(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    checkpointing.load_variables(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no checkpoint found"):
    checkpointing.load_variables(str(tmp_path / "empty"))
