"""Training library: sharded vs single-device step, the loop end to end, config validation."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import standins
from dpcr_jax import train


def _step_on(devices, stage="finetune"):
  mesh = train.make_mesh(devices)
  model = standins.build_model(None, stage)
  tx = optax.adam(1e-2)
  loss_fn = lambda outputs, batch, params: standins.compute_loss(stage, outputs, batch, params, None, "jnp")
  batch = train.select_batch(next(standins.ArrayIterator(8, seed=0, shuffle=False)), stage)
  state = train.create_train_state(model, tx, jax.tree.map(jnp.asarray, batch), seed=0)
  state = train.replicate(state, mesh)
  train_fn, _ = train.jit_steps(model, tx, loss_fn, mesh)
  sharded = train.shard_batch(batch, mesh)
  state, metrics = train_fn(state, sharded)
  state, metrics = train_fn(state, sharded)
  return jax.device_get(state), jax.device_get(metrics), sharded


def test_sharded_step_matches_single_device():
  assert jax.device_count() == 8
  state8, metrics8, batch8 = _step_on(jax.devices())
  state1, metrics1, _ = _step_on(jax.devices()[:1])
  assert len(batch8["image"].sharding.device_set) == 8
  np.testing.assert_allclose(metrics8["loss"], metrics1["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state8.params, state1.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state8.batch_stats, state1.batch_stats)
  assert int(state8.step) == 2


def test_train_and_evaluate_writes_metrics_and_learns(tmp_path, monkeypatch):
  standins.patch_training(monkeypatch.setattr)
  config = standins.tiny_config("sparse", str(tmp_path))
  config.num_train_steps, config.log_every, config.eval_every = 40, 10, 20
  workdir = str(tmp_path / "run")
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 40
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert [r["step"] for r in records if r["split"] == "eval"] == [20, 40]
  assert len(train_losses) == 4 and train_losses[-1] < 0.8 * train_losses[0]
  assert {"steps_per_sec", "cd", "grad_norm"} <= set(records[0])
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert json.load(open(os.path.join(workdir, "config.json")))["stage"] == "sparse"


@pytest.mark.parametrize("override, message", [
    (dict(stage="medium"), "config.stage must be one of"),
    (dict(batch_size=12), "divisible by the number of devices"),
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(num_train_steps=0), "num_train_steps"),
    (dict(lr_schedule="linear"), "lr_schedule"),
    (dict(lr_schedule="cosine", lr_warmup_steps=10 ** 9), "lr_warmup_steps"),
    (dict(lr_schedule="cosine", lr_final_fraction=-0.5), "lr_final_fraction"),
    (dict(lr_schedule="step", lr_step_at=1.5), "lr_step_at"),
    (dict(lr_schedule="step", lr_warmup_steps=10, lr_step_at=0.5), "inside the warm-up"),
])
def test_bad_config_is_rejected_before_compiling(tmp_path, override, message):
  config = standins.tiny_config("sparse", str(tmp_path))
  config.update(override)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_learning_rate_schedules():
  config = standins.tiny_config("sparse", "unused")
  config.learning_rate, config.num_train_steps = 1e-3, 100
  assert float(train.learning_rate_schedule(config)(57)) == pytest.approx(1e-3)  # the paper's constant Adam
  config.lr_schedule, config.lr_warmup_steps, config.lr_final_fraction = "cosine", 10, 0.01
  schedule = train.learning_rate_schedule(config)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(5e-4)  # linear warm-up
  assert float(schedule(10)) == pytest.approx(1e-3)  # peak
  assert float(schedule(55)) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5), rel=1e-4)  # half way down the cosine
  assert float(schedule(100)) == pytest.approx(1e-5)  # the final fraction
  config.lr_schedule, config.lr_step_at, config.lr_final_fraction = "step", 0.9, 0.1
  schedule = train.learning_rate_schedule(config)
  assert float(schedule(5)) == pytest.approx(5e-4) and float(schedule(10)) == pytest.approx(1e-3)
  assert float(schedule(89)) == pytest.approx(1e-3) and float(schedule(90)) == pytest.approx(1e-4)  # one drop at 90%
  assert float(schedule(100)) == pytest.approx(1e-4)
  config.lr_warmup_steps = 0
  assert float(train.learning_rate_schedule(config)(0)) == pytest.approx(1e-3)


def test_missing_data_root_is_rejected(tmp_path):
  config = standins.tiny_config("sparse", str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="config.data.root"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
