"""A run never destroys or hides a result: mismatched restarts, non-finite steps, damaged checkpoints, a
second launcher, unwritable folders and failed saves (docs/guarantees.md)."""
import fnmatch
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import standins
from configs import default
from dpcr_jax import checkpointing, nonfinite, train, workdir as workdir_lib


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _config(tmp_path, stage="sparse", steps=8):
  config = standins.tiny_config(stage, str(tmp_path))
  config.num_train_steps, config.checkpoint_every, config.eval_every, config.log_every = steps, 4, 100, 4
  return config


def _train(config, workdir, inputs_fn=standins.inputs, **kwargs):
  """train.train_and_evaluate with the stand-in stage (tests/standins.py) and ``inputs_fn``."""
  return train.train_and_evaluate(config, workdir, stage=standins.stage(config.stage), inputs_fn=inputs_fn,
                                  **kwargs)


class _Hooked:
  """A training iterator that passes each batch through ``hook(position, batch) -> batch``, position being the
  0-based number of the batch in the run (checkpointed and restored with the wrapped iterator's state)."""

  def __init__(self, it, hook):
    self.it, self.hook, self.position = it, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = self.hook(self.position, next(self.it))
    self.position += 1
    return batch

  def get_state(self):
    return {"inner": self.it.get_state(), "position": self.position}

  def set_state(self, state):
    self.it.set_state(state["inner"])
    self.position = state["position"]


def _hooked_inputs(hook):
  """standins.inputs with its training batches passed through ``hook`` (see _Hooked)."""
  def inputs_fn(config):
    inputs = standins.inputs(config)
    return train.Inputs(train=_Hooked(inputs.train, hook), eval=inputs.eval)
  return inputs_fn


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------------------------------------
# 1. A restart with another config or stage is refused; nothing is changed; --restart moves the run aside.


def test_restart_with_another_config_is_refused_and_changes_nothing(tmp_path):
  run = str(tmp_path / "run")
  config = _config(tmp_path)
  _train(config, run)
  saved_config = open(os.path.join(run, "config.json")).read()
  before = {s: os.listdir(os.path.join(run, "checkpoints", str(s))) for s in _steps(run)}

  other = _config(tmp_path)
  other.learning_rate = 0.5
  with pytest.raises(workdir_lib.ConfigMismatchError, match=r"learning_rate: 0\.01 -> 0\.5"):
    _train(other, run)
  wrong_stage = _config(tmp_path, stage="dense")
  with pytest.raises(workdir_lib.ConfigMismatchError, match=r'stage: "sparse" -> "dense"'):
    _train(wrong_stage, run)
  assert open(os.path.join(run, "config.json")).read() == saved_config
  assert {s: os.listdir(os.path.join(run, "checkpoints", str(s))) for s in _steps(run)} == before
  assert not os.path.exists(os.path.join(run, workdir_lib.LOCK_NAME))  # released after each refusal

  # Training longer, or with the other ops backend, is a resume, not a mismatch.
  longer = _config(tmp_path, steps=12)
  longer.ops_impl = "ffi"
  assert int(_train(longer, run).step) == 12
  saved = json.load(open(os.path.join(run, "config.json")))
  assert saved["num_train_steps"] == 12 and saved["ops_impl"] == "ffi"

  # An explicit restart moves the old run aside (nothing deleted) and starts from step 0.
  old_steps = _steps(run)
  state = _train(other, run, restart=True)
  assert int(state.step) == 8
  (previous,) = os.listdir(os.path.join(run, workdir_lib.PREVIOUS_RUNS))
  moved = os.path.join(run, workdir_lib.PREVIOUS_RUNS, previous)
  assert _steps(moved) == old_steps
  assert json.load(open(os.path.join(moved, "config.json")))["learning_rate"] == 0.01
  assert json.load(open(os.path.join(run, "config.json")))["learning_rate"] == 0.5


def test_checkpoint_of_another_model_is_a_mismatch_not_damage(tmp_path):
  """Without config.json to compare, the restore itself tells a different model from damaged files."""
  run = str(tmp_path / "run")
  _train(_config(tmp_path), run)
  os.remove(os.path.join(run, "config.json"))
  steps = _steps(run)
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"another model or stage: .*Dense_0"):
    _train(_config(tmp_path, stage="dense"), run)
  assert _steps(run) == steps and not os.path.exists(os.path.join(run, checkpointing.DAMAGED_DIR))
  assert not os.path.exists(os.path.join(run, "config.json"))  # not rewritten for the refused config


def test_resumable_fields_name_fields_of_the_config():
  """A field renamed or moved in configs/ must be renamed in RESUMABLE_FIELDS too, or resuming is refused."""
  config = json.loads(default.base_config("finetune").to_json())
  fields = set(workdir_lib._flatten(config))  # pylint: disable=protected-access
  for pattern in workdir_lib.RESUMABLE_FIELDS:
    assert fnmatch.filter(fields, pattern), f"RESUMABLE_FIELDS names {pattern!r}, which no config field matches"


def test_config_differences():
  saved = {"stage": "sparse", "model": {"width": 1.0, "k": 20}, "num_train_steps": 10, "data": {"root": "a"}}
  now = {"stage": "sparse", "model": {"width": 0.5, "k": 20, "new": 1}, "num_train_steps": 20,
         "data": {"root": "b"}}
  blocking, allowed = workdir_lib.config_differences(saved, now)
  assert blocking == ["model.width: 1.0 -> 0.5"]
  assert allowed == ['data.root: "a" -> "b"', 'model.new: "<absent>" -> 1', "num_train_steps: 10 -> 20"]


# ----------------------------------------------------------------------------------------------------------
# 2. A non-finite loss or gradient stops the run; no checkpoint holds it.


def _nan_at(batch_number):
  """Stand-in inputs whose training batch number ``batch_number`` (0-based) has NaN ground truth."""
  def poison(position, batch):
    if position == batch_number:
      batch = dict(batch, points_dense=np.full_like(batch["points_dense"], np.nan))
    return batch
  return _hooked_inputs(poison)


def test_first_nonfinite_step_stops_the_run_and_saves_nothing(tmp_path):
  run = str(tmp_path / "run")
  with pytest.raises(nonfinite.NonFiniteError, match=r"step 6: non-finite cd, loss .*gradient"):
    _train(_config(tmp_path, steps=12), run, inputs_fn=_nan_at(5))  # the 6th step
  assert _steps(run) == [4]
  assert _all_finite(checkpointing.load_variables(run))
  assert not os.path.exists(os.path.join(run, workdir_lib.LOCK_NAME))


def test_skip_policy_drops_and_counts_nonfinite_steps(tmp_path):
  run = str(tmp_path / "run")
  config = _config(tmp_path, steps=12)
  config.nonfinite_policy = "skip"
  state = _train(config, run, inputs_fn=_nan_at(5))
  assert int(state.step) == 12 and _all_finite(state.params)
  records = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
  records = [r for r in records if r["split"] == "train"]
  assert [r.get("skipped_steps", 0) for r in records] == [0, 1, 1]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert _steps(run) == [4, 8, 12]


def test_nonfinite_step_keeps_the_previous_state(tmp_path):
  config = _config(tmp_path)
  stage = standins.stage("sparse")
  model, loss_fn, tx = stage.build_model(config), stage.make_loss_fn(config), optax.adam(1e-2)
  batch = train.select_batch(next(standins.inputs(config).train), stage)
  state = train.create_train_state(model, tx, jax.tree.map(jnp.asarray, batch), seed=0)
  before = jax.device_get(state)
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, tx=tx, loss_fn=loss_fn))
  bad = dict(batch, image=np.where(np.arange(8)[:, None, None, None] == 3, np.inf, batch["image"]))
  after, metrics = step(state, bad)
  assert not bool(metrics[nonfinite.FINITE]) and int(metrics[nonfinite.FIRST_BAD_GRAD]) >= 0
  assert int(after.step) == 1
  for a, b in zip(jax.tree.leaves((after.params, after.batch_stats, after.opt_state)),
                  jax.tree.leaves((before.params, before.batch_stats, before.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  good, metrics = step(state, batch)
  assert bool(metrics[nonfinite.FINITE]) and int(metrics[nonfinite.FIRST_BAD_GRAD]) == -1
  assert not np.array_equal(np.asarray(good.params["Dense_0"]["kernel"]), before.params["Dense_0"]["kernel"])


def test_save_refuses_nonfinite_state(tmp_path):
  state = _train(_config(tmp_path, steps=4), str(tmp_path / "run"))
  ckpt = checkpointing.Checkpointer(str(tmp_path / "other"), 1, 3)
  bad = state.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim == 1 else x, state.params))
  with pytest.raises(checkpointing.NonFiniteStateError, match="refusing to save step 5: non-finite"):
    ckpt.save(5, bad, {})
  ckpt.close()
  assert _steps(str(tmp_path / "other")) == []


# ----------------------------------------------------------------------------------------------------------
# 3. Restored state is verified: checksums and finiteness; a failure is damage, handled without deleting.


def test_fingerprint_sees_one_flipped_bit():
  x = np.random.default_rng(0).normal(size=(64, 33)).astype(np.float32)
  y = x.copy()
  y.view(np.uint32)[7, 5] ^= 1
  swapped = x.copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  fp = lambda t: checkpointing.tree_fingerprints({"x": t})[0]["x"]
  assert len({fp(x), fp(y), fp(swapped), fp(x.reshape(33, 64))}) == 3  # shapes are checked apart
  assert fp(x) == fp(x.copy())
  _, nonfinite_names = checkpointing.tree_fingerprints({"a": x, "b": np.array([1.0, np.inf], np.float32),
                                                        "c": np.arange(3)})
  assert nonfinite_names == ["b"]


def _random_bytes_into(folder, seed=0):
  """Overwrites the start of every data file under ``folder`` with random bytes (same sizes)."""
  rng = np.random.default_rng(seed)
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size and name not in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt"):
        with open(path, "r+b") as f:
          f.write(rng.integers(0, 256, min(size, 4096), dtype=np.uint8).tobytes())


def test_garbage_in_a_checkpoint_is_damage_falls_back_and_deletes_nothing(tmp_path):
  run = str(tmp_path / "run")
  config = _config(tmp_path)
  _train(config, run)
  good = checkpointing.load_variables(os.path.join(run, "checkpoints"), step=4)
  _random_bytes_into(os.path.join(run, "checkpoints", "8", "variables"))
  # Inference falls back (with a warning) without touching the run.
  loaded = checkpointing.load_variables(run)
  jax.tree.map(np.testing.assert_array_equal, loaded, good)
  assert _steps(run) == [4, 8]
  # Training resumes from 4, keeps the damaged step for inspection and saves a good step 8 again.
  config.num_train_steps = 12
  _train(config, run)
  assert _steps(run) == [4, 8, 12]
  assert os.listdir(os.path.join(run, checkpointing.DAMAGED_DIR)) == ["8"]
  assert _all_finite(checkpointing.load_variables(run))


def test_checksum_mismatch_is_damage(tmp_path):
  """Readable files whose values differ from what was saved (here: the recorded fingerprint is altered)."""
  run = str(tmp_path / "run")
  _train(_config(tmp_path), run)
  path = os.path.join(run, "checkpoints", "8", "checksums", "metadata")
  saved = json.load(open(path))
  saved["fingerprints"]["variables/params/Dense_0/kernel"] ^= 1
  json.dump(saved, open(path, "w"))
  with pytest.raises(ValueError, match=r"step 8: checksum mismatch in variables/params/Dense_0/kernel"):
    checkpointing.load_variables(run, step=8)
  jax.tree.map(np.testing.assert_array_equal, checkpointing.load_variables(run),
               checkpointing.load_variables(run, step=4))


def test_predict_from_a_run_without_a_usable_checkpoint_fails_clearly(tmp_path):
  run = str(tmp_path / "run")
  _train(_config(tmp_path), run)
  for step in _steps(run):
    _random_bytes_into(os.path.join(run, "checkpoints", str(step), "variables"), seed=step)
  with pytest.raises(ValueError, match=r"no usable checkpoint under .*step 8: .*step 4: "):
    checkpointing.load_variables(run)


# ----------------------------------------------------------------------------------------------------------
# 4. One run per workdir; writability; a failed save stops the run at once.


def test_second_launcher_is_refused_at_once(tmp_path):
  run = str(tmp_path / "run")
  os.makedirs(run)
  with workdir_lib.RunLock(run):
    info = json.load(open(os.path.join(run, workdir_lib.LOCK_NAME)))
    assert info["pid"] == os.getpid()
    start = time.time()
    with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by another training run: pid {os.getpid()}"):
      _train(_config(tmp_path), run)
    assert time.time() - start < 5
    assert os.listdir(run) == [workdir_lib.LOCK_NAME]  # nothing written
  assert not os.path.exists(os.path.join(run, workdir_lib.LOCK_NAME))


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
  run = str(tmp_path)
  code = ("import os, sys; from dpcr_jax import workdir; workdir.RunLock(sys.argv[1]).acquire(); "
          "os.kill(os.getpid(), 9)")
  subprocess.run([sys.executable, "-c", code, run], check=False, env=dict(os.environ, XLA_FLAGS=""))
  stale = json.load(open(os.path.join(run, workdir_lib.LOCK_NAME)))
  assert stale["pid"] != os.getpid()
  with workdir_lib.RunLock(run) as lock:
    assert json.load(open(lock.path))["pid"] == os.getpid()


def test_unwritable_workdir_is_refused_before_anything_runs(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(workdir_lib.WorkdirNotWritableError, match="cannot create the workdir"):
    _train(_config(tmp_path), str(blocker / "run"))
  with pytest.raises(workdir_lib.WorkdirNotWritableError, match="cannot write to"):
    workdir_lib.check_writable(str(blocker / "sub"))


def test_failed_save_stops_the_run_at_once(tmp_path):
  """The checkpoints folder turns into a file after step 2: the step-4 save fails; the run stops there."""
  run = str(tmp_path / "run")

  def sabotage(position, batch):
    if position == 2:
      folder = os.path.join(run, "checkpoints")
      os.rename(folder, folder + ".moved")
      with open(folder, "w") as f:
        f.write("not a folder")
    return batch

  start = time.time()
  with pytest.raises(checkpointing.CheckpointSaveError, match=r"saving checkpoint .* failed .*Training stopped"):
    _train(_config(tmp_path, steps=40), run, inputs_fn=_hooked_inputs(sabotage))
  assert time.time() - start < 60
  assert not os.path.exists(os.path.join(run, workdir_lib.LOCK_NAME))
