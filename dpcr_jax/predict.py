"""Inference from a trained run: images in; PLY (dpcr_jax/cloud_io.py), NPY and PNG pictures out.

A run's workdir holds ``config.json`` (written by train.py) and ``checkpoints/``; ``Predictor`` rebuilds the
model from the former and restores params and batch stats (only) from the latter. A finetune run predicts
the sparse and dense clouds; a sparse-stage run predicts the sparse cloud only.

Input images: any size and format PIL reads, decoded by dpcr_jax/images.py (transparency over black, 16-bit
scaled, undecodable files reported by path and skipped). As in the paper's data, the object sits on a black
background: an optional mask (white = object) blacks out everything else (the paper's Pix3D protocol);
non-square images are padded with black to a square, then resized to the model's input size.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpcr_jax import checkpointing, cloud_io, images as images_lib, stages, visualize
from dpcr_jax.images import load_image  # pylint: disable=unused-import  (part of this module's API)


def _run_dir(path: str) -> str:
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path)):
    if os.path.exists(os.path.join(candidate, "config.json")):
      return candidate
  raise ValueError(f"{path!r} is not a training run directory (no config.json in it or its parent)")


def load_run_config(path: str) -> ml_collections.ConfigDict:
  """A run's saved config; model fields added since the run was made take their defaults (the behaviour
  such runs were trained with), and fields that have moved are read from their old homes
  (model.ops_impl -> ops_impl; model.sparse_grid, now derived from model.image_size, is dropped)."""
  from dpcr_jax.models import default_model_config  # pylint: disable=g-import-not-at-top
  with open(os.path.join(_run_dir(path), "config.json")) as f:
    saved = json.load(f)
  saved_model = saved.get("model", {})
  if "ops_impl" in saved_model:
    saved.setdefault("ops_impl", saved_model.pop("ops_impl"))
  saved_model.pop("sparse_grid", None)
  saved.setdefault("ops_impl", "ffi")
  config = ml_collections.ConfigDict(saved)
  model = default_model_config()
  model.update(saved_model)
  config.model = model
  return config


class Predictor:
  """Restores a run and predicts point clouds from images.

  Args:
    checkpoint: a run's workdir (or its checkpoints/ folder).
    stage: the stage whose network the run trained (default: the stage table's entry for its config.stage).
  """

  def __init__(self, checkpoint: str, stage: stages.Stage | None = None):
    self.config = load_run_config(checkpoint)
    stage = stage or stages.get(self.config.stage)
    if not stage.predicts_from_images:
      raise ValueError(f"a {stage.name}-stage run predicts from {stage.inputs}, not images; use a finetune "
                       "(or sparse) run")
    self.image_size = self.config.model.image_size
    model = stage.build_model(self.config)
    variables = checkpointing.load_variables(os.path.join(_run_dir(checkpoint), "checkpoints"))
    self._apply = jax.jit(lambda images: model.apply(variables, {"image": images}, train=False))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [B,S,S,3] float32 in [0,1] -> {'sparse': [B,P,3], 'dense': [B,N,3] (finetune runs)}."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], got {images.shape}")
    outputs = jax.device_get(self._apply(jnp.asarray(images)))
    return {k: np.asarray(v) for k, v in outputs.items() if k in ("sparse", "dense")}




def expand_paths(pattern_or_dir: str) -> list[str]:
  """A file, a folder (its .png/.jpg/.jpeg files) or a glob -> sorted list of paths."""
  if os.path.isdir(pattern_or_dir):
    paths = [p for p in glob.glob(os.path.join(pattern_or_dir, "*"))
             if p.lower().endswith((".png", ".jpg", ".jpeg"))]
  else:
    paths = glob.glob(pattern_or_dir)
  if not paths:
    raise ValueError(f"no images match {pattern_or_dir!r}")
  return sorted(paths)


def predict_files(predictor: Predictor, image_paths: Sequence[str], output_dir: str,
                  mask_paths: Sequence[str] | None = None, batch_size: int = 8) -> list[dict]:
  """Predicts every image; writes <name>.ply + <name>.npy (the densest cloud) and <name>.png (input |
  clouds rendered from the input camera) into ``output_dir``; names are distinct (images.output_stems).

  Returns one record per input, in order: {'image', 'ply', 'npy', 'png'} when written, {'image', 'error'}
  when the image (or its mask) could not be decoded or the prediction was not finite (nothing is written for
  it; the other images still are).
  """
  if not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f"batch_size (--batch_size) must be a positive int, got {batch_size!r}")
  if mask_paths is not None and len(mask_paths) != len(image_paths):
    raise ValueError(f"got {len(mask_paths)} masks for {len(image_paths)} images")
  os.makedirs(output_dir, exist_ok=True)
  names = images_lib.output_stems(image_paths)
  masks = list(mask_paths) if mask_paths is not None else [None] * len(image_paths)
  records: list[dict | None] = [None] * len(image_paths)
  loaded = []  # (input index, image) of the decodable inputs
  for k, path in enumerate(image_paths):
    try:
      loaded.append((k, images_lib.load_image(path, predictor.image_size, masks[k])))
    except images_lib.ImageError as e:
      records[k] = {"image": path, "error": str(e)}
  for start in range(0, len(loaded), batch_size):
    indices = [k for k, _ in loaded[start:start + batch_size]]
    images = np.stack([x for _, x in loaded[start:start + batch_size]])
    n = len(indices)
    if n < batch_size:  # pad to a fixed batch: one compilation
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    outputs = predictor(images)
    for i, k in enumerate(indices):
      path, stem = image_paths[k], os.path.join(output_dir, names[k])
      bad = [key for key in ("sparse", "dense") if key in outputs and not np.isfinite(outputs[key][i]).all()]
      if bad:
        records[k] = {"image": path, "error": f"{path}: non-finite {' and '.join(bad)} prediction "
                                                  "(nothing written for it)"}
        continue
      cloud = outputs["dense"][i] if "dense" in outputs else outputs["sparse"][i]
      cloud_io.write_ply(stem + ".ply", cloud)
      np.save(stem + ".npy", cloud)
      columns = ["input"] + [k for k in ("sparse", "dense") if k in outputs]
      visualize.qualitative_grid([[images[i]] + [outputs[k][i] for k in columns[1:]]], columns, stem + ".png")
      records[k] = {"image": path, "ply": stem + ".ply", "npy": stem + ".npy", "png": stem + ".png"}
  return records
