"""Shared defaults of every training config (paper settings, spec §4 and §10); stage configs override them.

Not a launch config by itself: use configs/sparse.py, dense.py, finetune.py, quickstart.py, psgn_full.py or psgn_cpu.py.
"""
import ml_collections

from dpcr_jax.data import default_data_config
from dpcr_jax.models import default_loss_config, default_model_config
from dpcr_jax.train import STAGES

# Training steps per epoch of the paper's runs: sum over the 13 categories of floor(12 * models / batch) with
# the R2N2 train lists (../shared/data/shapenet-splits/train_models.json); the original drops each category's
# remainder batch.
PAPER_STEPS_PER_EPOCH = {32: 13127, 12: 35022, 10: 42021}


def base_config(stage: str) -> ml_collections.ConfigDict:
  """Paper settings common to the three stages; ``stage`` in {'sparse', 'dense', 'finetune'}."""
  if stage not in STAGES:  # the argument after ':' in --config configs/<file>.py:<stage>
    raise ValueError(f"unknown stage {stage!r} (after ':' in the config path); expected one of {', '.join(STAGES)}")
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.model = default_model_config()
  config.loss = default_loss_config()
  config.data = default_data_config()  # set data.root (AttentionDPCR HDF5 folder, or a synthetic root)
  config.shuffle = True  # the original never shuffles (quirk §9.3)
  config.eval_split = "test"

  config.learning_rate = 3e-5  # Adam peak learning rate (§4: constant 3e-5)
  # After a linear warm-up over lr_warmup_steps: "constant" (the paper), "step" (learning_rate until step
  # round(lr_step_at * num_train_steps), then lr_final_fraction * learning_rate; the quickstart's short runs)
  # or "cosine" (cosine decay to lr_final_fraction * learning_rate at num_train_steps; did worse than both in
  # the quickstart trials, docs/training.md).
  config.lr_schedule = "constant"
  config.lr_warmup_steps = 0
  config.lr_final_fraction = 0.01
  config.lr_step_at = 0.9
  config.batch_size = 32
  config.eval_batch_size = 32
  config.num_train_steps = 20 * PAPER_STEPS_PER_EPOCH[32]

  config.log_every = 100  # the original logs every 100 iterations
  config.eval_every = 5000  # loss on eval_batches of the eval split every this many steps and at the end (<= 0: never)
  config.eval_batches = 50  # batches of the eval split per periodic evaluation (-1: all)
  config.checkpoint_every = 2000
  # A non-finite loss or gradient: "stop" the run (naming the step and the term; the newest checkpoint is
  # the last good state) or "skip" the step's update and count it (docs/guarantees.md).
  config.nonfinite_policy = "stop"
  config.keep_checkpoints = 3
  config.seed = 0

  # Finetune only: stage checkpoints (a run's workdir or its checkpoints/ folder) to start from.
  config.init = ml_collections.ConfigDict({"sparse_checkpoint": "", "dense_checkpoint": ""})
  # Multi-host: jax.distributed.initialize(**these) when enabled (docs/training.md). On TPU pods and SLURM
  # the three values can stay unset (auto-detected).
  config.distributed = ml_collections.ConfigDict({
      "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1})
  return config
