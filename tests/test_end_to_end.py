"""The real pipeline end to end at tiny sizes (in the style of flax/examples' train_test): synthetic data in the
AttentionDPCR format -> the real sparse, dense and finetune models and losses through train_and_evaluate (no
stand-ins) -> the protocol evaluation with baselines -> a prediction from an image file.

64 px images, width x1/8, 64 -> 256 -> 1024 points, kNN k 8, 2 categories x 5 models x 12 views, a few steps
per stage. It checks the wiring (configs, stage table, data pipeline, checkpoints between stages, evaluation
and inference), not accuracy. Its time is XLA compilation of the three training steps (the finetune step alone
~40 s on an idle 2-core CPU), so it is marked slow: about 2 minutes on such a machine, not the 1 minute hoped for.
"""
import json
import os

import numpy as np
from PIL import Image
import pytest

from configs import quickstart
from dpcr_jax import evaluation, predict, train
from dpcr_jax.synth import generate

CATEGORIES = ["chair", "lamp"]


def _config(stage: str, root: str):
  config = quickstart.get_config(stage)
  config.model.image_size, config.model.width, config.model.dense.k = 64, 0.125, 8
  config.data.root, config.data.categories = root, CATEGORIES
  config.batch_size = config.eval_batch_size = 8
  config.num_train_steps, config.log_every, config.checkpoint_every = 3, 1, 3
  config.eval_every, config.eval_batches = -1, 1
  config.lr_schedule = "constant"
  return config


@pytest.mark.slow
def test_sparse_dense_finetune_evaluate_predict(tmp_path):
  root = str(tmp_path / "data")
  generate.generate_synthetic(root, 5, image_size=64, n_dense=1024, n_mid=256, n_sparse=64,
                               categories=CATEGORIES, r2n2_views=0, progress=False)
  runs = {}
  for stage in ("sparse", "dense", "finetune"):
    config = _config(stage, root)
    assert (config.data.n_sparse, config.data.n_mid, config.data.n_dense) == (64, 256, 1024)  # derived
    if stage == "finetune":
      config.init.sparse_checkpoint, config.init.dense_checkpoint = runs["sparse"], runs["dense"]
      config.num_train_steps = 2
    runs[stage] = str(tmp_path / stage)
    state = train.train_and_evaluate(config, runs[stage])
    assert int(state.step) == config.num_train_steps
    records = [json.loads(line) for line in open(os.path.join(runs[stage], "metrics.jsonl"))]
    assert all(np.isfinite(r["loss"]) for r in records)
  assert {"sparse", "dense"} <= set(state.params)  # the finetune model holds both networks

  predictor = predict.Predictor(runs["finetune"])
  result = evaluation.evaluate_run(runs["finetune"], str(tmp_path / "results"), emd_examples_per_category=1,
                                   exact_emd_clouds=2, medoid_max_per_group=2, predictor=predictor)
  tables = result["tables"]
  assert set(tables) == {"model", "sparse_x16", "medoid", "oracle_medoid"}
  assert set(tables["model"]) == {"chair", "lamp", "mean"} and tables["model"]["chair"]["count"] == 12
  assert all(np.isfinite(tables[m]["mean"]["cd"]) for m in tables)
  assert os.path.exists(result["paths"][1])

  test_image = tmp_path / "photo.png"
  Image.fromarray(np.full((48, 80, 3), 90, np.uint8)).save(test_image)
  written = predict.predict_files(predictor, [str(test_image)], str(tmp_path / "out"), batch_size=2)
  cloud = np.load(written[0]["npy"])
  assert cloud.shape == (1024, 3) and np.isfinite(cloud).all()
