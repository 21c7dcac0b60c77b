"""Every launch config in configs/ builds for each stage, validates and wires consistent sizes into its model."""
import importlib

import jax
import jax.numpy as jnp
import pytest

from dpcr_jax import config_lib, stages
from dpcr_jax.models import point_counts

CONFIGS = ["paper", "quickstart", "psgn_full", "psgn_cpu"]


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("stage_name", stages.NAMES)
def test_config_validates_and_model_shapes_match_the_data(name, stage_name, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "device_count", lambda: 1)  # the paper's batch 12 suits a GPU, not the 8 test devices
  config = importlib.import_module(f"configs.{name}").get_config(stage_name)
  assert config.stage == stage_name
  config.data.root = str(tmp_path)  # validate_config checks that the data root exists
  config_lib.validate_config(config)
  d, s = config.data, config.model.image_size
  assert d.image_size == s and {k: d[k] for k in ("n_sparse", "n_mid", "n_dense")} == point_counts(config.model)
  batch = {"image": jax.ShapeDtypeStruct((2, s, s, 3), jnp.float32),
           "points_sparse": jax.ShapeDtypeStruct((2, d.n_sparse, 3), jnp.float32)}
  stage = stages.get(stage_name)
  model = stage.build_model(config)
  variables = jax.eval_shape(lambda b: model.init(jax.random.key(0), b, train=False), batch)
  outputs = jax.eval_shape(lambda v, b: model.apply(v, b, train=False), variables, batch)
  sizes = {"sparse": d.n_sparse, "mid": d.n_mid, "dense": d.n_dense}
  assert {k: v.shape for k, v in outputs.items()} == {k: (2, sizes[k], 3) for k in stage.outputs}


def test_psgn_configs_point_at_the_shared_batches():
  for name in ("psgn_full", "psgn_cpu"):
    config = importlib.import_module(f"configs.{name}").get_config("sparse")
    assert config.data.source == "psgn" and config.data.root.endswith("shared/data/psgn-shapenet")
    assert config.eval_split == "val"


def test_paper_stage_settings():
  paper = importlib.import_module("configs.paper")
  assert [paper.get_config(s).batch_size for s in stages.NAMES] == [32, 12, 10]
  assert (paper.get_config("dense").data.n_dense, paper.get_config("sparse").data.n_sparse) == (16384, 1024)
