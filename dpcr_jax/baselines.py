"""Image-blind baselines scored with the same protocol as the model (dpcr_jax/evaluation.py):

  - 'medoid': for each view, the training cloud with the lowest mean CD to all training clouds of that view
    (clouds are in the camera frame, so the view matters);
  - 'oracle_medoid': the same per (category, view): knows the category, ignores the image.
(The third reference row, 'sparse_x16', the model's own sparse points repeated, is made in evaluation.py.)
"""
from __future__ import annotations

import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from dpcr_jax.metrics import normalize_unit_cube
from xla_ops.chamfer import chamfer_distance


@functools.partial(jax.jit, static_argnames="impl")
def _per_pair_cd(a: jax.Array, b: jax.Array, impl: str) -> jax.Array:
  """[K,P,3] x [K,P,3] -> [K] CD; module level so that every medoid search reuses one compiled program."""
  return chamfer_distance(a, b, reduction="none", impl=impl)


def _pairwise_cd(clouds: jax.Array, impl: str, chunk: int = 256) -> np.ndarray:
  """[K,P,3] normalised clouds -> [K,K] symmetric CD matrix."""
  k = clouds.shape[0]
  ii, jj = np.triu_indices(k, 1)
  fn = functools.partial(_per_pair_cd, impl=impl)
  values = np.zeros(len(ii), np.float32)
  for s in range(0, len(ii), chunk):
    a, b = ii[s:s + chunk], jj[s:s + chunk]
    pad = chunk - len(a)
    a_p, b_p = np.pad(a, (0, pad)), np.pad(b, (0, pad))  # fixed shapes: one compile
    values[s:s + len(a)] = np.asarray(fn(clouds[a_p], clouds[b_p]))[:len(a)]
  matrix = np.zeros((k, k), np.float32)
  matrix[ii, jj] = values
  return matrix + matrix.T


def medoid_index(clouds: np.ndarray, num_points: int = 512, impl: str = "ffi", seed: int = 0) -> int:
  """Index of the cloud [K,N,3] with the lowest mean CD (normalised, on ``num_points`` random points) to
  the others."""
  if len(clouds) == 1:
    return 0
  rng = np.random.default_rng(seed)
  sub = rng.choice(clouds.shape[1], min(num_points, clouds.shape[1]), replace=False)
  normed = normalize_unit_cube(jnp.asarray(clouds[:, sub]))
  return int(np.argmin(_pairwise_cd(normed, impl).mean(axis=1)))


class MedoidBaselines:
  """Training-set medoids per view ('medoid') and per (category, view) ('oracle_medoid').

  Built from up to ``max_per_group`` training clouds per (category, view), read from a training iterator.
  """

  def __init__(self, train_batches: Iterator[dict], max_per_group: int = 32, max_examples: int = 5000,
               num_points: int = 512, impl: str = "ffi"):
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    seen = 0
    for batch in train_batches:
      views = batch.get("view", np.zeros(len(batch["category"]), np.int32))
      for cloud, cat, view in zip(batch["points_dense"], batch["category"], views):
        bucket = groups.setdefault((int(cat), int(view)), [])
        if len(bucket) < max_per_group:
          bucket.append(np.asarray(cloud))
      seen += len(batch["category"])
      if seen >= max_examples:
        break
    if not groups:
      raise ValueError("no training clouds to build the medoid baselines from")
    self.oracle = {key: clouds[medoid_index(np.stack(clouds), num_points, impl)]
                   for key, clouds in groups.items()}
    by_view: dict[int, list[np.ndarray]] = {}
    for (_, view), clouds in groups.items():
      by_view.setdefault(view, []).extend(clouds)
    self.blind = {view: clouds[medoid_index(np.stack(clouds), num_points, impl)]
                  for view, clouds in by_view.items()}
    self.num_clouds = sum(len(c) for c in groups.values())

  def predict(self, categories: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
    """[B] category and view -> {'medoid': [B,N,3], 'oracle_medoid': [B,N,3]}."""
    blind = np.stack([self.blind.get(int(v), next(iter(self.blind.values()))) for v in views])
    oracle = np.stack([self.oracle.get((int(c), int(v)), self.blind.get(int(v), blind[0]))
                       for c, v in zip(categories, views)])
    return {"medoid": blind, "oracle_medoid": oracle}
