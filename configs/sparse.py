"""Stage 1 at paper settings: image -> 1024 points; batch 32, 20 epochs, Adam 3e-5 (spec §4.1).

  python -m experiments.train --config configs/sparse.py --workdir runs/sparse \
      --config.data.root=/path/to/attdpcr
"""
from configs import default


def get_config():
  config = default.base_config("sparse")
  config.batch_size = config.eval_batch_size = 32
  config.num_train_steps = 20 * default.PAPER_STEPS_PER_EPOCH[32]
  return config
