"""Every launch config in configs/ builds, validates and wires consistent sizes into its model."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from dpcr_jax import train
from dpcr_jax.models import STAGES, build_model

CONFIGS = ["sparse", "dense", "finetune", "quickstart", "psgn_full", "psgn_cpu"]


def _config(name: str, stage: str):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if name in STAGES else module.get_config(stage)


def _stages(name: str):
  return [name] if name in STAGES else list(STAGES)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_validates_and_model_shapes_match_the_data(name, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # the paper's batch 12 suits a GPU, not the 8 test devices
  for stage in _stages(name):
    config = _config(name, stage)
    assert config.stage == stage
    config.data.root = str(tmp_path)  # validate_config checks that the data root exists
    train.validate_config(config)
    d, s = config.data, config.model.image_size
    assert d.image_size == s and d.n_sparse == config.model.sparse_grid ** 2
    r = config.model.dense.upsample
    assert d.n_mid == r * d.n_sparse and d.n_dense == r * r * d.n_sparse
    batch = {"image": jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
             "points_sparse": jax.ShapeDtypeStruct((2, d.n_sparse, 3), jnp.float32)}
    model = build_model(config.model, stage)
    variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
    outputs = jax.eval_shape(lambda v, b: model.apply(v, b, train=False), variables, batch)
    expected = {"sparse": {"sparse": d.n_sparse}, "dense": {"mid": d.n_mid, "dense": d.n_dense},
                "finetune": {"sparse": d.n_sparse, "mid": d.n_mid, "dense": d.n_dense}}[stage]
    assert {k: v.shape for k, v in outputs.items()} == {k: (2, n, 3) for k, n in expected.items()}


def test_psgn_configs_point_at_the_shared_batches():
  for name in ("psgn_full", "psgn_cpu"):
    config = _config(name, "sparse")
    assert config.data.source == "psgn" and config.data.root.endswith("shared/data/psgn-shapenet")
    assert config.eval_split == "val"
