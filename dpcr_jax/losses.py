"""Training losses of the three stages, with the original's exact weights (spec §4.1-4.3).

CD(a, b) = mean d(a->b) + mean d(b->a) with squared nearest-neighbour distances, means over batch and
points together. EMD(a, b) = batch mean of the *sum* of matched Euclidean distances under
``approx_match`` (treated as a constant).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

import xla_ops
from dpcr_jax.models.sparse import decoder_kernels


def _chamfer_terms(gt: jax.Array, pred: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
  """(mean d(gt->pred), mean d(pred->gt)) over batch and points."""
  d_gt, _, d_pred, _ = xla_ops.nn_distance(gt, pred, impl=impl)
  return jnp.mean(d_gt), jnp.mean(d_pred)


def _chamfer(gt: jax.Array, pred: jax.Array, impl: str) -> jax.Array:
  return sum(_chamfer_terms(gt, pred, impl))


def decoder_l2(sparse_params, weight_decay: float) -> jax.Array:
  """tflearn L2 regularisation: sum over the 11 sparse-decoder kernels of weight_decay * 0.5 * ||W||^2."""
  return sum(weight_decay * 0.5 * jnp.sum(jnp.square(w)) for w in decoder_kernels(sparse_params))


def compute_loss(stage: str, outputs: dict, batch: dict, params, loss_config: ml_collections.ConfigDict,
                 ops_impl: str = "ffi") -> tuple[jax.Array, dict]:
  """Total loss of a stage and scalar metrics ('loss', 'cd' as the original logs it, and every term).

  Args:
    stage: 'sparse', 'dense' or 'finetune'.
    outputs: the model's output dict for that stage ('sparse' [B,P,3]; 'mid', 'dense').
    batch: 'points_sparse' [B,P,3] (FPS GT) and 'points_dense' [B,16P,3].
    params: the model's 'params' (the sparse stage reads its decoder kernels for the L2 term).
    loss_config: ``default_loss_config()``.
    ops_impl: xla_ops backend, "ffi" or "jnp".
  """
  c = loss_config
  if stage == "sparse":
    gt = batch[c.sparse_gt_key]
    gt_to_pred, pred_to_gt = _chamfer_terms(gt, outputs["sparse"], ops_impl)
    chamfer = c.sparse_scale * (gt_to_pred + c.sparse_pred_to_gt_weight * pred_to_gt)
    l2 = decoder_l2(params, c.decoder_weight_decay)
    loss = chamfer + c.decoder_l2_factor * l2
    metrics = {"cd": gt_to_pred + pred_to_gt, "chamfer_loss": chamfer, "decoder_l2": l2,
               "cd_gt_to_pred": gt_to_pred, "cd_pred_to_gt": pred_to_gt}
  elif stage == "dense":
    gt = batch["points_dense"]
    cd_mid, cd_dense = _chamfer(gt, outputs["mid"], ops_impl), _chamfer(gt, outputs["dense"], ops_impl)
    loss = c.dense_scale * (cd_mid + cd_dense)
    metrics = {"cd": cd_dense, "cd_mid": cd_mid, "cd_dense": cd_dense}
  elif stage == "finetune":
    gt_sparse, gt_dense = batch["points_sparse"], batch["points_dense"]
    cd_sparse = _chamfer(gt_sparse, outputs["sparse"], ops_impl)
    emd_sparse = jnp.mean(xla_ops.earth_mover_distance(gt_sparse, outputs["sparse"], impl=ops_impl))
    cd_mid, cd_dense = _chamfer(gt_dense, outputs["mid"], ops_impl), _chamfer(gt_dense, outputs["dense"], ops_impl)
    loss = (c.finetune_sparse_weight * (cd_sparse + c.finetune_emd_scale * emd_sparse)
            + c.finetune_dense_weight * (cd_mid + cd_dense))
    metrics = {"cd": cd_dense, "cd_sparse": cd_sparse, "emd_sparse": emd_sparse, "cd_mid": cd_mid,
               "cd_dense": cd_dense}
  else:
    raise ValueError(f"stage must be 'sparse', 'dense' or 'finetune', got {stage!r}")
  return loss, {"loss": loss, **metrics}
