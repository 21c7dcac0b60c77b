"""Training losses of the three stages, with the original's exact weights (docs/original.md §4.1-4.3).

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


def sparse_loss(outputs: dict, batch: dict, params, loss_config: ml_collections.ConfigDict,
                ops_impl: str = "ffi") -> tuple[jax.Array, dict]:
  """Stage 1: sparse_scale * (mean d(gt->pred) + w * mean d(pred->gt)) + l2_factor * decoder L2.

  Args:
    outputs: {'sparse': [B,P,3]}.
    batch: ``loss_config.sparse_gt_key`` ('points_dense' [B,N,3] in the original).
    params: the sparse network's 'params' (its decoder kernels give the L2 term).
  Returns:
    (loss, metrics): 'loss', 'cd' (as the original logs it) and every term.
  """
  c = loss_config
  gt_to_pred, pred_to_gt = _chamfer_terms(batch[c.sparse_gt_key], outputs["sparse"], ops_impl)
  chamfer = c.sparse_scale * (gt_to_pred + c.sparse_pred_to_gt_weight * pred_to_gt)
  l2 = decoder_l2(params, c.decoder_weight_decay)
  loss = chamfer + c.decoder_l2_factor * l2
  return loss, {"loss": loss, "cd": gt_to_pred + pred_to_gt, "chamfer_loss": chamfer, "decoder_l2": l2,
                "cd_gt_to_pred": gt_to_pred, "cd_pred_to_gt": pred_to_gt}


def dense_loss(outputs: dict, batch: dict, params, loss_config: ml_collections.ConfigDict,
               ops_impl: str = "ffi") -> tuple[jax.Array, dict]:
  """Stage 2: dense_scale * (CD(gt, mid) + CD(gt, dense)); outputs 'mid', 'dense'; batch 'points_dense'."""
  del params
  gt = batch["points_dense"]
  cd_mid, cd_dense = _chamfer(gt, outputs["mid"], ops_impl), _chamfer(gt, outputs["dense"], ops_impl)
  loss = loss_config.dense_scale * (cd_mid + cd_dense)
  return loss, {"loss": loss, "cd": cd_dense, "cd_mid": cd_mid, "cd_dense": cd_dense}


def finetune_loss(outputs: dict, batch: dict, params, loss_config: ml_collections.ConfigDict,
                  ops_impl: str = "ffi") -> tuple[jax.Array, dict]:
  """Stage 3: sparse_weight * (CD(gt_sparse, sparse) + emd_scale * EMD(gt_sparse, sparse))
  + dense_weight * (CD(gt_dense, mid) + CD(gt_dense, dense)); batch 'points_sparse', 'points_dense'."""
  del params
  c = loss_config
  gt_sparse, gt_dense = batch["points_sparse"], batch["points_dense"]
  cd_sparse = _chamfer(gt_sparse, outputs["sparse"], ops_impl)
  emd_sparse = jnp.mean(xla_ops.earth_mover_distance(gt_sparse, outputs["sparse"], impl=ops_impl))
  cd_mid, cd_dense = _chamfer(gt_dense, outputs["mid"], ops_impl), _chamfer(gt_dense, outputs["dense"], ops_impl)
  loss = (c.finetune_sparse_weight * (cd_sparse + c.finetune_emd_scale * emd_sparse)
          + c.finetune_dense_weight * (cd_mid + cd_dense))
  return loss, {"loss": loss, "cd": cd_dense, "cd_sparse": cd_sparse, "emd_sparse": emd_sparse, "cd_mid": cd_mid,
                "cd_dense": cd_dense}
