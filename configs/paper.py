"""The paper's three stages (AttentionDPCR, docs/original.md "Training"): Adam 3e-5 throughout;
sparse: image -> 1024 points, batch 32, 20 epochs; dense: 1024 GT FPS points -> 4096 -> 16384, batch 12,
20 epochs; finetune: both end to end from the stage checkpoints, batch 10, 40 epochs.

  python -m experiments.train --config configs/paper.py:sparse --workdir runs/sparse \
      --config.data.root=/path/to/attdpcr
  python -m experiments.train --config configs/paper.py:dense --workdir runs/dense --config.data.root=...
  python -m experiments.train --config configs/paper.py:finetune --workdir runs/finetune --config.data.root=... \
      --config.init.sparse_checkpoint=runs/sparse --config.init.dense_checkpoint=runs/dense

The argument after ':' picks the stage (sparse, dense or finetune). Batch sizes must be divisible by the
device count (12: 1, 2, 3, 4, 6 or 12 devices; or change them). Unlike the original, finetune loads the stage
weights only when its workdir has no checkpoint of its own (a restart resumes), and Adam's moments start at 0.
"""
from configs import default

BATCH_SIZE = {"sparse": 32, "dense": 12, "finetune": 10}
EPOCHS = {"sparse": 20, "dense": 20, "finetune": 40}


def get_config(stage: str = "sparse"):
  config = default.base_config(stage)
  config.batch_size = config.eval_batch_size = BATCH_SIZE[stage]
  config.num_train_steps = EPOCHS[stage] * default.PAPER_STEPS_PER_EPOCH[BATCH_SIZE[stage]]
  return config
