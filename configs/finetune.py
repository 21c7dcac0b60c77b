"""Stage 3 at paper settings: both stages end to end from the stage checkpoints; batch 10, 40 epochs (§4.3).

  python -m experiments.train --config configs/finetune.py --workdir runs/finetune \
      --config.data.root=/path/to/attdpcr \
      --config.init.sparse_checkpoint=runs/sparse --config.init.dense_checkpoint=runs/dense

Unlike the original, the stage weights are loaded only when the finetune workdir has no checkpoint of its own
(so a restart resumes instead of re-initialising), and Adam's moments start at zero.
"""
from configs import default


def get_config():
  config = default.base_config("finetune")
  config.batch_size = config.eval_batch_size = 10
  config.num_train_steps = 40 * default.PAPER_STEPS_PER_EPOCH[10]
  return config
