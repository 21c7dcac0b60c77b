r"""The main job: synthetic data -> sparse -> dense -> finetune (quickstart config) -> evaluation vs baselines.

  python -m experiments.main --workdir runs/quickstart

Writes under --workdir: data/ (the synthetic dataset, made once), sparse/, dense/, finetune/ (training runs:
checkpoints, metrics.jsonl, tensorboard/, curves.png), results.{csv,md} (the paper's protocol, per category,
against the image-blind and category-oracle medoids and the sparse points repeated), qualitative.png
(input | sparse | dense | ground truth), ply/ (a few predicted and ground-truth clouds), timings.json.
Rerunning resumes finished or interrupted stages from their checkpoints.
"""
import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from configs import quickstart
from dpcr_jax import cloud_io, evaluation, predict, train, visualize
from dpcr_jax.data import CATEGORIES, make_iterator
from dpcr_jax.synth import generate_synthetic

_WORKDIR = flags.DEFINE_string("workdir", "runs/quickstart", "Output folder of the whole job.")
_MODELS_PER_CATEGORY = flags.DEFINE_integer("models_per_category", 20, "Synthetic models per category "
                                            "(80% train / 20% test), 12 views each.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Processes for the data generator.")
_STEP_SCALE = flags.DEFINE_float("step_scale", 1.0, "Multiplies every stage's number of training steps.")
_EMD_PER_CATEGORY = flags.DEFINE_integer("emd_examples_per_category", 4,
                                         "Approximate EMD on the first k test examples per category (-1: all).")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent XLA compilation cache folder ('' = off).")


def make_data(root: str, data_config) -> float:
  """Generates the synthetic dataset under ``root`` unless it is there; returns seconds spent."""
  marker = os.path.join(root, "attdpcr")
  if os.path.isdir(marker):
    logging.info("Synthetic data found at %s", root)
    return 0.0
  start = time.time()
  generate_synthetic(root, _MODELS_PER_CATEGORY.value, seed=0, image_size=data_config.image_size,
                     n_dense=data_config.n_dense, n_mid=data_config.n_mid, n_sparse=data_config.n_sparse,
                     workers=_WORKERS.value, r2n2_views=0, progress=False)
  return time.time() - start


def qualitative(predictor: predict.Predictor, config, out_dir: str, per_category: int = 1) -> None:
  """qualitative.png (one test example per category) and PLY files of the predictions and ground truths."""
  chosen = {}
  for batch in make_iterator(config.data, "test", config.eval_batch_size, seed=0, shuffle=False, num_epochs=1,
                             drop_remainder=False):
    for i, c in enumerate(batch["category"]):
      if len(chosen.get(int(c), [])) < per_category:
        chosen.setdefault(int(c), []).append({k: v[i] for k, v in batch.items()})
  examples = [e for c in sorted(chosen) for e in chosen[c]]
  names = [CATEGORIES[c][1] for c in sorted(chosen) for _ in chosen[c]]
  bs = config.eval_batch_size
  rows = []
  ply_dir = os.path.join(out_dir, "ply")
  os.makedirs(ply_dir, exist_ok=True)
  for start in range(0, len(examples), bs):
    chunk = examples[start:start + bs]
    images = np.stack([e["image"] for e in chunk])
    images = np.concatenate([images, np.repeat(images[-1:], bs - len(chunk), axis=0)])
    outputs = predictor(images)
    for i, e in enumerate(chunk):
      rows.append([e["image"], outputs["sparse"][i], outputs["dense"][i], e["points_dense"]])
      name = names[start + i]
      cloud_io.write_ply(os.path.join(ply_dir, f"{name}_pred.ply"), outputs["dense"][i])
      cloud_io.write_ply(os.path.join(ply_dir, f"{name}_gt.ply"), e["points_dense"])
  visualize.qualitative_grid(rows, ["input", "sparse", "dense", "ground truth"],
                             os.path.join(out_dir, "qualitative.png"), cell=160, row_titles=names)


def main(argv):
  del argv
  train.quiet_library_logs()
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
  workdir = os.path.abspath(_WORKDIR.value)
  os.makedirs(workdir, exist_ok=True)
  timings = {}
  job_start = time.time()
  data_root = os.path.join(workdir, "data")
  timings["data"] = make_data(data_root, quickstart.get_config().data)

  runs = {}
  for stage in ("sparse", "dense", "finetune"):
    config = quickstart.get_config(stage)
    config.data.root = data_root
    config.num_train_steps = max(1, int(round(config.num_train_steps * _STEP_SCALE.value)))
    # No loss evaluation during these short runs (it would compile one more program per stage); the
    # protocol evaluation below scores the final model.
    config.eval_every = -1
    if stage == "finetune":
      config.init.sparse_checkpoint, config.init.dense_checkpoint = runs["sparse"], runs["dense"]
    runs[stage] = os.path.join(workdir, stage)
    start = time.time()
    train.train_and_evaluate(config, runs[stage])
    timings[stage] = time.time() - start
    logging.info("Stage %s done in %.0f s", stage, timings[stage])

  start = time.time()
  predictor = predict.Predictor(runs["finetune"])
  result = evaluation.evaluate_run(runs["finetune"], os.path.join(workdir, "results"),
                                   emd_examples_per_category=_EMD_PER_CATEGORY.value, exact_emd_clouds=16,
                                   predictor=predictor)
  timings["evaluation"] = time.time() - start
  start = time.time()
  qualitative(predictor, config, workdir)
  timings["pictures"] = time.time() - start
  timings["total"] = time.time() - job_start
  with open(os.path.join(workdir, "timings.json"), "w") as f:
    json.dump(timings, f, indent=1)

  with open(result["paths"][1]) as f:
    print(f.read())
  tables = result["tables"]
  beaten = [c for c in tables["model"] if c != "mean" and tables["model"][c]["cd"] < tables["medoid"][c]["cd"]]
  print(f"Model CD below the image-blind medoid in {len(beaten)}/{len(tables['model']) - 1} categories.")
  print("Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
  print(f"Outputs in {workdir}: results.md/.csv, qualitative.png, ply/, */curves.png, */metrics.jsonl")


if __name__ == "__main__":
  app.run(main)
