"""Training library: sharded vs single-device step, the loop on stand-ins (through its seams), config validation.

The real models, losses and data pipeline run through the same loop in tests/test_end_to_end.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import ml_collections
import pytest

import standins
from dpcr_jax import config_lib, train


def _step_on(devices, stage_name="finetune"):
  mesh = train.make_mesh(devices)
  config = standins.tiny_config(stage_name, "unused")
  stage = standins.stage(stage_name)
  model, loss_fn = stage.build_model(config), stage.make_loss_fn(config)
  tx = optax.adam(1e-2)
  batch = train.select_batch(next(standins.inputs(config).train), stage)
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


def test_train_and_evaluate_writes_metrics_and_learns(tmp_path):
  config = standins.tiny_config("sparse", str(tmp_path))
  config.num_train_steps, config.log_every, config.eval_every = 40, 10, 20
  workdir = str(tmp_path / "run")
  state = standins.run_training(config, workdir)
  assert int(state.step) == 40
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_losses = [r["loss"] for r in records if r["split"] == "train"]
  assert [r["step"] for r in records if r["split"] == "eval"] == [20, 40]
  assert len(train_losses) == 4 and train_losses[-1] < 0.8 * train_losses[0]
  assert {"steps_per_sec", "cd", "grad_norm"} <= set(records[0])
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.getsize(os.path.join(workdir, "curves.png")) > 1000
  assert json.load(open(os.path.join(workdir, "config.json")))["stage"] == "sparse"


def test_training_from_scratch_is_bitwise_repeatable(tmp_path):
  """Two runs of one config from scratch (threaded grain input, async dispatch) agree bit for bit."""
  config = standins.tiny_config("finetune", str(tmp_path))
  config.num_train_steps, config.eval_every = 8, 8
  states, logs = [], []
  for name in ("a", "b"):
    workdir = str(tmp_path / name)
    states.append(jax.device_get(standins.run_training(config, workdir)))
    records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    logs.append([{k: v for k, v in r.items() if k != "steps_per_sec"} for r in records])
  assert logs[0] == logs[1] and len(logs[0]) == 3
  leaves = [jax.tree.leaves((s.params, s.batch_stats, s.opt_state, s.rng)) for s in states]
  assert len(leaves[0]) == len(leaves[1])
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("override, message", [
    (dict(stage="medium"), "stage must be one of"),
    (dict(ops_impl="cuda"), "config.ops_impl must be one of"),
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
  assert not os.path.exists(tmp_path / "run")  # rejected before anything was written


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


# ---------------------------------------------------------------------------------------- one home per setting


def test_data_sizes_follow_the_model():
  """The data's image size and point counts are derived from config.model, not repeated."""
  config = standins.tiny_config("finetune", "unused")
  assert (config.data.image_size, config.data.n_sparse, config.data.n_mid, config.data.n_dense) == (64, 64, 256, 1024)
  config.model.image_size = 128
  config.model.dense.upsample = 9
  assert (config.data.image_size, config.data.n_sparse, config.data.n_mid, config.data.n_dense) == \
      (128, 256, 2304, 20736)
  config.data.root = "."
  config_lib.validate_config(config)


def _unlinked(config):
  """The config with plain (unlinked) data sizes, as a config.json or a hand-made ConfigDict has them."""
  config.data = ml_collections.ConfigDict(config.data.to_dict())
  return config


@pytest.mark.parametrize("field, value, message", [
    ("image_size", 128, r"config.data.image_size=128 differs from config.model.image_size=64"),
    ("n_sparse", 256, r"config.data.n_sparse=256 .*config.model.image_size=64"),
    ("n_mid", 512, r"config.data.n_mid=512 .*config.model.dense.upsample=4, config.model.dense.levels=2"),
    ("n_dense", 4096, r"config.data.n_dense=4096 .*config.model.dense.upsample=4, config.model.dense.levels=2"),
])
def test_inconsistent_sizes_are_rejected_naming_both_fields(tmp_path, field, value, message):
  config = _unlinked(standins.tiny_config("dense", str(tmp_path)))
  config.data[field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_overriding_a_derived_size_is_rejected(tmp_path):
  """--config.data.n_sparse=... on a linked config breaks the derivation: rejected, not trained at 100 points."""
  config = standins.tiny_config("sparse", str(tmp_path))
  config.data.n_sparse = 100
  with pytest.raises(ValueError, match="config.data.n_sparse=100"):
    config_lib.validate_config(config)


def test_ops_impl_has_one_top_level_home(tmp_path):
  config = standins.tiny_config("sparse", str(tmp_path))
  assert "ops_impl" not in config.model and config.ops_impl == "jnp"
  config.model.ops_impl = "jnp"  # where older configs had it
  with pytest.raises(ValueError, match="config.model.ops_impl has moved to config.ops_impl"):
    config_lib.validate_config(config)


@pytest.fixture(scope="module")
def synthetic_config(tmp_path_factory):
  """tiny_config on a real synthetic dataset: 5 chairs (4 train, 1 test) x 12 views at the tiny sizes."""
  from dpcr_jax.synth import generate  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("synth"))
  generate.generate_synthetic(root, 5, image_size=standins.IMAGE_SIZE, n_dense=standins.N_DENSE,
                               n_mid=standins.N_MID, n_sparse=standins.N_SPARSE, categories=["chair"],
                               r2n2_views=0, progress=False)
  config = standins.tiny_config("sparse", root)
  config.data.categories = ["chair"]
  return config


def test_data_shuffle_controls_the_training_order(synthetic_config):
  """config.data.shuffle is the one shuffle setting: make_inputs reads it (there is no top-level one)."""
  config = ml_collections.ConfigDict(synthetic_config.to_dict())
  assert "shuffle" not in config
  views = lambda cfg: [int(v) for v in next(train.make_inputs(cfg).train)["view"]]  # noqa: E731
  config.data.shuffle = False
  assert views(config) == list(range(8))
  config.data.shuffle = True
  assert views(config) != list(range(8))


def test_periodic_evaluation_uses_eval_batch_size(synthetic_config):
  config = ml_collections.ConfigDict(synthetic_config.to_dict())
  config.batch_size, config.eval_batch_size = 8, 12
  inputs = train.make_inputs(config)
  assert len(next(inputs.train)["image"]) == 8
  assert [len(b["image"]) for b in inputs.eval()] == [12]  # the test split: 1 chair x 12 views
