"""The paper's evaluation metrics (docs/original.md "Evaluation protocol") plus clearly labelled extras.

Protocol (the original's test.py): every cloud, prediction and ground truth alike, is normalised to the unit
cube on its own (bbox centre to the origin, longest bbox side = 1); then, at the dense point count,
  - CD  = (mean_gt d(gt->pred) + mean_pred d(pred->gt)) x 1000, with SQUARED nearest-neighbour distances;
  - EMD = match_cost(gt, pred, approx_match(gt, pred)) / 1000, the SUM of matched Euclidean distances (not
    divided by the point count, so it scales with it). Computed by xla_ops.earth_mover_distance, which never
    forms the N x N match (O(B N) memory), so the paper's 16384 points need no subsampling (docs/ops.md, "EMD").
Extras (not in the paper): 'cd_l1' = the same with Euclidean (non-squared) distances x 100; 'fscore' = F-score
at threshold 0.01 (1% of the unit cube side) in percent; exact EMD on small random subsets of the clouds
(scipy's linear_sum_assignment) next to the approximate EMD of the same subsets, to show the approximation's
error. Per-category averaging is in reports.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from xla_ops.chamfer import nn_distance
from xla_ops.emd import earth_mover_distance

FSCORE_THRESHOLD = 0.01


def normalize_unit_cube(points: jax.Array) -> jax.Array:
  """[..., N, 3] -> each cloud centred on its bbox centre and divided by its longest bbox side."""
  lo, hi = jnp.min(points, axis=-2, keepdims=True), jnp.max(points, axis=-2, keepdims=True)
  side = jnp.max(hi - lo, axis=-1, keepdims=True)
  return (points - (lo + hi) / 2) / jnp.maximum(side, 1e-12)


@functools.partial(jax.jit, static_argnames=("with_emd", "impl"))
def cloud_metrics(pred: jax.Array, gt: jax.Array, with_emd: bool = True, impl: str = "ffi") -> dict:
  """Per-example protocol metrics of pred [B,N,3] vs gt [B,M,3] -> dict of [B] arrays (see module doc)."""
  d_gt, _, d_pred, _ = nn_distance(normalize_unit_cube(gt), normalize_unit_cube(pred), impl=impl)
  out = {"cd": (jnp.mean(d_gt, -1) + jnp.mean(d_pred, -1)) * 1000.0}
  e_gt, e_pred = jnp.sqrt(d_gt), jnp.sqrt(d_pred)
  out["cd_l1"] = (jnp.mean(e_gt, -1) + jnp.mean(e_pred, -1)) * 100.0
  precision = jnp.mean(e_pred < FSCORE_THRESHOLD, -1)
  recall = jnp.mean(e_gt < FSCORE_THRESHOLD, -1)
  out["fscore"] = 100.0 * jnp.where(precision + recall > 0, 2 * precision * recall
                                    / jnp.maximum(precision + recall, 1e-12), 0.0)
  if with_emd:
    out["emd"] = protocol_emd(pred, gt, impl=impl)
  return out


@functools.partial(jax.jit, static_argnames="impl")
def protocol_emd(pred: jax.Array, gt: jax.Array, impl: str = "ffi") -> jax.Array:
  """The protocol's EMD of pred [B,N,3] vs gt [B,N,3] -> [B]: approximate-match cost of the unit-cube
  normalised clouds (sum over points) / 1000."""
  return earth_mover_distance(normalize_unit_cube(gt), normalize_unit_cube(pred), impl=impl) / 1000.0


def exact_emd(a: np.ndarray, b: np.ndarray) -> float:
  """Exact EMD (sum of matched Euclidean distances, one-to-one) of two clouds [N,3] with the same N."""
  cost = np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))
  rows, cols = linear_sum_assignment(cost)
  return float(cost[rows, cols].sum())


def emd_approximation_error(preds: np.ndarray, gts: np.ndarray, num_points: int = 256, seed: int = 0,
                            impl: str = "ffi") -> dict:
  """Approximate vs exact EMD on random ``num_points`` subsets of normalised clouds [K,N,3] / [K,M,3].

  Returns {'num_clouds', 'num_points', 'exact_mean', 'approx_mean', 'mean_relative_error'} where the relative
  error is mean((approx - exact) / exact) (approx >= exact up to rounding: it is a feasible transport).
  """
  rng = np.random.default_rng(seed)
  num_points = min(num_points, preds.shape[1], gts.shape[1])
  preds = np.asarray(normalize_unit_cube(jnp.asarray(preds)))
  gts = np.asarray(normalize_unit_cube(jnp.asarray(gts)))
  sub_p = np.stack([p[rng.choice(len(p), num_points, replace=False)] for p in preds])
  sub_g = np.stack([g[rng.choice(len(g), num_points, replace=False)] for g in gts])
  approx = np.asarray(earth_mover_distance(jnp.asarray(sub_g), jnp.asarray(sub_p), impl=impl), np.float64)
  exact = np.array([exact_emd(g, p) for g, p in zip(sub_g, sub_p)])
  return {"num_clouds": len(preds), "num_points": num_points, "exact_mean": float(exact.mean()),
          "approx_mean": float(approx.mean()),
          "mean_relative_error": float(np.mean((approx - exact) / np.maximum(exact, 1e-12)))}
