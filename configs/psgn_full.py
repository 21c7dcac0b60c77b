"""The quickstart network on real ShapeNet renders (PSGN batches in ../shared/data/psgn-shapenet), paper sizes.

  python -m experiments.train --config configs/psgn_full.py:sparse --workdir runs/psgn_full/sparse
  python -m experiments.train --config configs/psgn_full.py:dense --workdir runs/psgn_full/dense
  python -m experiments.train --config configs/psgn_full.py:finetune --workdir runs/psgn_full/finetune \
      --config.init.sparse_checkpoint=runs/psgn_full/sparse --config.init.dense_checkpoint=runs/psgn_full/dense
  python -m experiments.evaluate --checkpoint runs/psgn_full/finetune --output runs/psgn_full/results --split val

768 training samples (24 batch files), validation = the 32 samples of batch 15. Images are 192 x 256 on a
grey background, masked to black with the depth map and padded/resized to 256 x 256; the ground truth is in
each image's view frame (not the AttentionDPCR camera frame), so the medoid baselines group all samples as
one 'view' (-1). data.root is ../shared/data/psgn-shapenet next to the checkout. The argument after ':' picks the
stage (sparse, dense or finetune). The files hold 16384 points per cloud, so point counts and image size are
the paper's (1024 -> 4096 -> 16384, 256 px, kNN k 20); the rest is the quickstart's (sparse width x0.25, its
batches and learning rates, offset-regressing dense levels). Meant for a GPU: on a 2-core CPU a dense or
finetune step at 16384 points takes many seconds (configs/psgn_cpu.py is the CPU-sized variant).
"""
import os

from configs import quickstart
from dpcr_jax.data.pipeline import SHARED_DATA

NUM_STEPS = {"sparse": 2000, "dense": 1000, "finetune": 1000}


def use_psgn_data(config):
  """Points a config at the PSGN batches: training on batches 0-24 but 15, evaluation on batch 15."""
  config.data.source = "psgn"
  config.data.root = os.path.join(SHARED_DATA, "psgn-shapenet")
  config.eval_split = "val"
  config.eval_batches = -1  # the whole validation batch file (32 samples)


def get_config(stage: str = "sparse"):
  config = quickstart.get_config(stage)
  use_psgn_data(config)
  config.model.image_size, config.model.dense.k = 256, 20  # 1024 -> 4096 -> 16384 points (derived)
  config.num_train_steps = NUM_STEPS[stage]
  config.eval_every = 500
  config.checkpoint_every = 250
  return config
