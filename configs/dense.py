"""Stage 2 at paper settings: 1024 GT FPS points -> 4096 -> 16384; batch 12, 20 epochs, Adam 3e-5 (§4.2).

  python -m experiments.train --config configs/dense.py --workdir runs/dense \
      --config.data.root=/path/to/attdpcr

The batch of 12 must be divisible by the device count (use 1, 2, 3, 4, 6 or 12 devices, or change it).
"""
from configs import default


def get_config():
  config = default.base_config("dense")
  config.batch_size = config.eval_batch_size = 12
  config.num_train_steps = 20 * default.PAPER_STEPS_PER_EPOCH[12]
  return config
