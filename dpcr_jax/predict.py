"""Inference from a trained run: images in; PLY, NPY and PNG pictures out.

A run's workdir holds ``config.json`` (written by train.py) and ``checkpoints/``; ``Predictor`` rebuilds the
model from the former and restores params and batch stats (only) from the latter. A finetune run predicts
the sparse and dense clouds; a sparse-stage run predicts the sparse cloud only.

Input images: any size and format PIL reads. As in the paper's data, the object sits on a black
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
from PIL import Image

from dpcr_jax import checkpointing, viewpoints, visualize

MAX_PICTURES = 32  # images drawn in the pictures and the viewer of one prediction set


def _run_dir(path: str) -> str:
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path)):
    if os.path.exists(os.path.join(candidate, "config.json")):
      return candidate
  raise ValueError(f"{path!r} is not a training run directory (no config.json in it or its parent)")


def load_run_config(path: str) -> ml_collections.ConfigDict:
  """A run's saved config; model fields added since the run was made take their defaults (the behaviour
  such runs were trained with)."""
  from dpcr_jax.models import default_model_config  # pylint: disable=g-import-not-at-top
  with open(os.path.join(_run_dir(path), "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  model = default_model_config()
  model.update(config.model.to_dict())
  config.model = model
  return config


class Predictor:
  """Restores a run and predicts point clouds from images.

  Args:
    checkpoint: a run's workdir (or its checkpoints/ folder).
  """

  def __init__(self, checkpoint: str):
    from dpcr_jax.models import build_model  # pylint: disable=g-import-not-at-top
    self.config = load_run_config(checkpoint)
    if self.config.stage == "dense":
      raise ValueError("a dense-stage run predicts from points, not images; use a finetune (or sparse) run")
    self.image_size = self.config.model.image_size
    self.run_dir = _run_dir(checkpoint)
    model = build_model(self.config.model, self.config.stage)
    variables = checkpointing.load_variables(os.path.join(_run_dir(checkpoint), "checkpoints"))
    self._apply = jax.jit(lambda images: model.apply(variables, {"image": images}, train=False))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """images [B,S,S,3] float32 in [0,1] -> {'sparse': [B,P,3], 'dense': [B,N,3] (finetune runs)}."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"images must be [B, {self.image_size}, {self.image_size}, 3], got {images.shape}")
    outputs = jax.device_get(self._apply(jnp.asarray(images)))
    return {k: np.asarray(v) for k, v in outputs.items() if k in ("sparse", "dense")}


def load_image(path: str, size: int, mask_path: str | None = None) -> np.ndarray:
  """An image file -> float32 [size,size,3] in [0,1]: masked to a black background, padded square, resized."""
  image = Image.open(path).convert("RGB")
  array = np.asarray(image, np.float32) / 255.0
  if mask_path is not None:
    mask = Image.open(mask_path).convert("L")
    if mask.size != image.size:
      raise ValueError(f"mask {mask_path} is {mask.size}, image {path} is {image.size}")
    array = array * (np.asarray(mask) > 127)[..., None]
  h, w = array.shape[:2]
  side = max(h, w)
  square = np.zeros((side, side, 3), np.float32)
  square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = array
  resized = Image.fromarray((square * 255).round().astype(np.uint8)).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 255.0


def write_ply(path: str, points: np.ndarray) -> None:
  """Binary little-endian PLY with float x, y, z per vertex."""
  points = np.asarray(points, "<f4")
  header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(points)}\n"
            "property float x\nproperty float y\nproperty float z\nend_header\n")
  with open(path, "wb") as f:
    f.write(header.encode("ascii"))
    f.write(points.tobytes())


def read_ply(path: str) -> np.ndarray:
  """Reads what write_ply writes -> [N,3] float32."""
  with open(path, "rb") as f:
    data = f.read()
  end = data.index(b"end_header\n") + len(b"end_header\n")
  count = int([l for l in data[:end].decode().splitlines() if l.startswith("element vertex")][0].split()[-1])
  return np.frombuffer(data[end:end + count * 12], "<f4").reshape(count, 3)


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
  """Predicts every image; writes <stem>.ply + <stem>.npy (the densest cloud) and <stem>.png (input | dense
  on input | clouds drawn from the input camera of the run's data frame, dpcr_jax.viewpoints) into
  ``output_dir``, and for the first MAX_PICTURES images together: pictures.png, pictures_views.png (front /
  side / top) and viewer.html (interactive; visualize.example_pictures).
  Returns [{'image', 'ply', 'npy', 'png'}]."""
  if mask_paths is not None and len(mask_paths) != len(image_paths):
    raise ValueError(f"got {len(mask_paths)} masks for {len(image_paths)} images")
  os.makedirs(output_dir, exist_ok=True)
  written, shown = [], []
  frame = viewpoints.cloud_frame(predictor.config.data)
  camera = frame.input_camera(predictor.image_size)  # None for canonical-frame runs: fixed views instead
  for start in range(0, len(image_paths), batch_size):
    paths = list(image_paths[start:start + batch_size])
    masks = list(mask_paths[start:start + batch_size]) if mask_paths is not None else [None] * len(paths)
    images = np.stack([load_image(p, predictor.image_size, m) for p, m in zip(paths, masks)])
    n = len(paths)
    if n < batch_size:  # pad to a fixed batch: one compilation
      images = np.concatenate([images, np.repeat(images[-1:], batch_size - n, axis=0)])
    outputs = predictor(images)
    for i, path in enumerate(paths):
      stem = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
      cloud = outputs["dense"][i] if "dense" in outputs else outputs["sparse"][i]
      write_ply(stem + ".ply", cloud)
      np.save(stem + ".npy", cloud)
      columns = ["input"] + [k for k in ("sparse", "dense") if k in outputs]
      visualize.qualitative_grid([[images[i]] + [outputs[k][i] for k in columns[1:]]], columns, stem + ".png",
                                 frame=frame, cameras=[camera], overlay=len(columns) - 1)
      shown.append({"image": images[i], **{k: outputs[k][i] for k in columns[1:]}})
      written.append({"image": path, "ply": stem + ".ply", "npy": stem + ".npy", "png": stem + ".png"})
  visualize.example_pictures(shown[:MAX_PICTURES], frame, predictor.image_size,
                             os.path.join(output_dir, "pictures"), title=f"predictions of {predictor.run_dir}",
                             names=[os.path.basename(w["image"]) for w in written[:MAX_PICTURES]],
                             html_path=os.path.join(output_dir, "viewer.html"))
  return written
