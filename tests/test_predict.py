"""Inference: image loading and masking, PLY round trip, predicting a folder from a trained (stand-in) run."""
import os

import numpy as np
from PIL import Image
import pytest

import standins
from dpcr_jax import cloud_io, predict, visualize


def _write_png(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_load_image_masks_pads_and_resizes(tmp_path):
  image = np.full((20, 40, 3), 200, np.uint8)  # wide: padded top and bottom
  mask = np.zeros((20, 40), np.uint8)
  mask[:, 20:] = 255
  out = predict.load_image(_write_png(tmp_path / "i.png", image), 40, _write_png(tmp_path / "m.png", mask))
  assert out.shape == (40, 40, 3) and out.dtype == np.float32
  assert out[:10].max() == 0 and out[30:].max() == 0  # padding is black
  np.testing.assert_allclose(out[20, 30], 200 / 255, atol=1 / 255)  # inside the mask: kept
  assert out[20, 5].max() == 0  # outside the mask: blacked out
  with pytest.raises(ValueError, match="mask"):
    predict.load_image(str(tmp_path / "i.png"), 40, _write_png(tmp_path / "small.png", mask[:5]))


def test_ply_round_trip(tmp_path):
  pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
  cloud_io.write_ply(str(tmp_path / "a.ply"), pts)
  np.testing.assert_array_equal(cloud_io.read_ply(str(tmp_path / "a.ply")), pts)


def test_render_points():
  pts = np.random.default_rng(0).normal(size=(500, 3))
  image = visualize.render_points(pts, image_size=64)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert (image < 255).any(axis=-1).mean() > 0.1  # points were drawn
  assert (image[0, 0] == 255).all()  # background corner
  with pytest.raises(ValueError, match=r"\[N, 3\]"):
    visualize.render_points(np.zeros((5, 2)))


def test_predict_folder_from_a_trained_run(tmp_path):
  config = standins.tiny_config("finetune", str(tmp_path))
  config.num_train_steps, config.checkpoint_every = 2, 2
  run = str(tmp_path / "run")
  standins.run_training(config, run)

  rng = np.random.default_rng(0)
  folder = tmp_path / "images"
  folder.mkdir()
  for name in ("a", "b", "c"):
    _write_png(folder / f"{name}.png", rng.integers(0, 255, size=(16, 12, 3), dtype=np.uint8))
  predictor = predict.Predictor(run, stage=standins.stage("finetune"))
  paths = predict.expand_paths(str(folder))
  written = predict.predict_files(predictor, paths, str(tmp_path / "out"), batch_size=2)
  assert [os.path.basename(w["ply"]) for w in written] == ["a.ply", "b.ply", "c.ply"]
  for w in written:
    cloud = np.load(w["npy"])
    assert cloud.shape == (standins.N_DENSE, 3)
    np.testing.assert_array_equal(cloud_io.read_ply(w["ply"]), cloud)
    assert os.path.getsize(w["png"]) > 500
  # Same predictions with another batch size (padding does not change results).
  again = predict.predict_files(predictor, paths, str(tmp_path / "out2"), batch_size=4)
  for w, v in zip(written, again):
    np.testing.assert_allclose(np.load(w["npy"]), np.load(v["npy"]), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="images must be"):
    predictor(np.zeros((1, 5, 5, 3), np.float32))
  with pytest.raises(ValueError, match="no config.json"):
    predict.Predictor(str(tmp_path))


def test_run_config_of_an_older_run_gets_new_model_defaults(tmp_path):
  """A config.json written before a model field existed (here dense.predict_offsets) still loads, with the
  field's default (the behaviour the run was trained with); saved values win over defaults."""
  import json  # pylint: disable=g-import-not-at-top
  from dpcr_jax.models import default_model_config  # pylint: disable=g-import-not-at-top
  model = default_model_config().to_dict()
  del model["dense"]["predict_offsets"]
  model["dense"]["k"] = 7
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"stage": "finetune", "model": model}, f)
  config = predict.load_run_config(str(tmp_path))
  assert config.model.dense.predict_offsets is False and config.model.dense.k == 7
  assert config.ops_impl == "ffi"


def test_run_config_from_before_ops_impl_moved(tmp_path):
  """Runs saved with model.ops_impl and model.sparse_grid load with ops_impl at the top level."""
  import json  # pylint: disable=g-import-not-at-top
  from dpcr_jax.models import default_model_config  # pylint: disable=g-import-not-at-top
  model = dict(default_model_config().to_dict(), ops_impl="jnp", sparse_grid=32)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"stage": "finetune", "model": model}, f)
  config = predict.load_run_config(str(tmp_path))
  assert config.ops_impl == "jnp" and "ops_impl" not in config.model and "sparse_grid" not in config.model
