"""Stage 3: the sparse and dense networks joined end to end (docs/original.md §3), no stop-gradient between them."""
from __future__ import annotations

import flax.linen as nn

from dpcr_jax.models.dense import DenseNet
from dpcr_jax.models.sparse import SparseNet


class Finetune(nn.Module):
  """image [B, S, S, 3] -> {'sparse': [B, P, 3], 'mid': [B, 4P, 3], 'dense': [B, 16P, 3]}.

  The submodules are named ``sparse`` and ``dense`` and are the stage-1 / stage-2 modules themselves, so
  their variables are exactly those of the stage models (initialise from the stage checkpoints by placing
  them under these keys).
  """
  sparse: SparseNet
  dense: DenseNet

  def __call__(self, batch: dict, train: bool) -> dict:
    sparse = self.sparse.reconstruct(batch["image"], train)
    *_, mid, dense = self.dense.upsample_points(sparse, train)
    return {"sparse": sparse, "mid": mid, "dense": dense}
