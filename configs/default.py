"""Shared defaults of every training config (the paper's settings, docs/original.md "Training"); the launch
configs (paper.py, quickstart.py, psgn_full.py, psgn_cpu.py) override them.

Every setting has one home: point counts and the data's image size are derived from the model config
(dpcr_jax/config_lib.py ``link_data_to_model``): change ``model.image_size`` or ``model.dense.upsample`` and the
data follow. ``ops_impl`` (top level) picks the xla_ops backend of the model, the losses and the evaluation.
"""
import ml_collections

from dpcr_jax import config_lib
from dpcr_jax.data import default_data_config
from dpcr_jax.models import default_loss_config, default_model_config
from dpcr_jax.stages import NAMES as STAGES

# Training steps per epoch of the paper's runs: sum over the 13 categories of floor(12 * models / batch) with
# the R2N2 train lists (the shapenet-splits train_models.json, docs/data.md); the original drops each
# category's remainder batch.
PAPER_STEPS_PER_EPOCH = {32: 13127, 12: 35022, 10: 42021}


def base_config(stage: str) -> ml_collections.ConfigDict:
  """Paper settings common to the three stages; ``stage`` in {'sparse', 'dense', 'finetune'}."""
  if stage not in STAGES:  # the argument after ':' in --config configs/<file>.py:<stage>
    raise ValueError(f"unknown stage {stage!r} (after ':' in the config path); expected one of {', '.join(STAGES)}")
  config = ml_collections.ConfigDict()
  config.stage = stage
  config.ops_impl = "ffi"  # xla_ops backend of every point op: "ffi" (custom calls) or "jnp" (pure jax.numpy)
  config.model = default_model_config()
  config.loss = default_loss_config()
  config.data = default_data_config()  # set data.root (AttentionDPCR HDF5 folder, or a synthetic root)
  config_lib.link_data_to_model(config)  # data.image_size, n_sparse, n_mid, n_dense follow config.model
  config.eval_split = "test"

  config.learning_rate = 3e-5  # Adam peak learning rate (the paper: constant 3e-5)
  # After a linear warm-up over lr_warmup_steps: "constant" (the paper), "step" (learning_rate until step
  # round(lr_step_at * num_train_steps), then lr_final_fraction * learning_rate; the quickstart's short runs)
  # or "cosine" (cosine decay to lr_final_fraction * learning_rate at num_train_steps; did worse than both in
  # the quickstart trials, docs/training.md).
  config.lr_schedule = "constant"
  config.lr_warmup_steps = 0
  config.lr_final_fraction = 0.01
  config.lr_step_at = 0.9
  config.batch_size = 32  # global (over every device of every process)
  config.eval_batch_size = 32  # global; periodic evaluation during training and experiments.evaluate
  config.num_train_steps = 20 * PAPER_STEPS_PER_EPOCH[32]

  config.log_every = 100  # the original logs every 100 iterations
  config.eval_every = 5000  # loss on eval_batches of the eval split every this many steps and at the end (<= 0: never)
  config.eval_batches = 50  # batches of the eval split per periodic evaluation (-1: all)
  config.checkpoint_every = 2000
  # A non-finite loss or gradient: "stop" the run (naming the step and the term; the newest checkpoint is
  # the last good state) or "skip" the step's update and count it (docs/guarantees.md).
  config.nonfinite_policy = "stop"
  config.keep_checkpoints = 3
  config.seed = 0  # parameter initialisation, dropout and the data order (the same on every process)

  # Finetune only: stage checkpoints (a run's workdir or its checkpoints/ folder) to start from.
  config.init = ml_collections.ConfigDict({"sparse_checkpoint": "", "dense_checkpoint": ""})
  # Multi-host: jax.distributed.initialize(**these) when enabled (docs/training.md). On TPU pods and SLURM
  # the three values can stay unset (auto-detected).
  config.distributed = ml_collections.ConfigDict({
      "enabled": False, "coordinator_address": "", "num_processes": -1, "process_id": -1})
  return config
