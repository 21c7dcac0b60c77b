"""One training library for the three stages (sparse, dense, finetune).

``train_and_evaluate(config, workdir)`` takes the stage's model and loss from the stage table
(dpcr_jax/stages.py) and its batches from the input pipeline (``make_inputs``), then runs pure
jitted ``train_step`` / ``eval_step`` functions, data parallel over a ``Mesh`` with one ``'data'`` axis that
spans every device (batch sharded ``P('data')``, parameters replicated, one XLA program per step).
Checkpoints (dpcr_jax/checkpointing.py) are saved every ``config.checkpoint_every`` steps and the run resumes
from the newest one in ``workdir``; a finetune run that has nothing to resume starts from the sparse and dense
stage checkpoints named in ``config.init``. Tests and other drivers can pass their own ``stage`` (a
``stages.Stage``) and ``inputs_fn`` (config -> ``Inputs``) instead: those are the loop's two seams.

Outputs under ``workdir``: ``config.json``, ``metrics.jsonl`` (one JSON object per log/eval event),
``tensorboard/`` (event files), ``checkpoints/``, and ``curves.png`` at the end.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging as std_logging
import os
import time
from typing import Any, Callable, Iterator

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from dpcr_jax import checkpointing, nonfinite, stages, workdir as workdir_lib
from dpcr_jax.config_lib import validate_config


class TrainState(struct.PyTreeNode):
  """Everything a training step reads and writes (a plain pytree: checkpointable and shardable)."""
  step: jax.Array  # int32 []
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # uint32 [2], a raw PRNG key; per-step keys are fold_in(rng, step)


# ----------------------------------------------------------------------------------------------------------
# Mesh and batches.


def make_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh with axis 'data' over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def select_batch(batch: dict, stage: stages.Stage) -> dict:
  """The arrays the stage reads (``stage.batch_keys``; dicts from the pipeline may carry more)."""
  missing = [k for k in stage.batch_keys if k not in batch]
  if missing:
    raise ValueError(f"the {stage.name} stage reads batch keys {missing}, which the input batches lack "
                     f"(they have {sorted(batch)})")
  return {k: np.asarray(batch[k]) for k in stage.batch_keys}


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Process-local numpy batch -> global jax arrays sharded over 'data' along the leading axis."""
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------------------
# State, steps.


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warm-up over config.lr_warmup_steps, then config.lr_schedule: 'constant' (the paper), 'step' (one
  drop to lr_final_fraction at step round(lr_step_at * num_train_steps)) or 'cosine' (decay to the final
  fraction at num_train_steps); see configs/default.py."""
  lr, warmup, total = config.learning_rate, config.lr_warmup_steps, config.num_train_steps
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=lr, warmup_steps=warmup,
                                              decay_steps=total, end_value=lr * config.lr_final_fraction)
  if config.lr_schedule == "step":  # join_schedules counts the second schedule's steps from the warm-up's end
    drop = round(config.lr_step_at * total) - warmup
    after = optax.piecewise_constant_schedule(lr, {drop: config.lr_final_fraction})
  else:
    after = optax.constant_schedule(lr)
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (the original: TF defaults b1 0.9, b2 0.999, eps 1e-8) with ``learning_rate_schedule(config)``.

  Moments per parameter leaf (plain ``optax.adam``). Flat moments (``optax.flatten``: a few large kernels instead
  of ~450 small ones) were used for part of 2026-12-03: 1.30x faster under load, 0.96-1.15x idle at the
  quickstart's batch 4 and 8 (docs/benchmarks.md, "Changes measured"), so they were dropped; checkpoints written
  with them do not restore (CheckpointMismatchError).
  """
  return optax.adam(learning_rate_schedule(config), b1=0.9, b2=0.999, eps=1e-8)


def create_train_state(model, tx: optax.GradientTransformation, example_batch: dict, seed: int) -> TrainState:
  """Initialises parameters from ``example_batch`` (only its shapes matter)."""
  # XLA's RngBitGenerator keys: the initialisers of a few hundred parameters compile ~4x faster on CPU than
  # with threefry keys (the forward pass is dead code under jit: init returns only the variables).
  init_rng = jax.random.key(seed, impl="unsafe_rbg")
  state_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
  variables = jax.jit(functools.partial(model.init, train=False))({"params": init_rng}, example_batch)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params), rng=state_rng)


def train_step(state: TrainState, batch: dict, *, model, tx: optax.GradientTransformation,
               loss_fn: Callable) -> tuple[TrainState, dict]:
  """One Adam step on the stage loss. Pure; jit it (the batch may be sharded over 'data').

  Args:
    loss_fn: (outputs, batch, params) -> (loss, metrics dict of scalars).
  Returns:
    (new state, metrics incl. 'loss', 'grad_norm' and the non-finite guard's flags ``nonfinite.HEALTH_KEYS``).
  """
  step_rng = jax.random.fold_in(state.rng, state.step)

  def objective(params):
    outputs, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, batch, train=True,
                                   mutable=["batch_stats"], rngs={"dropout": step_rng})
    loss, metrics = loss_fn(outputs, batch, params)
    return loss, (metrics, updates.get("batch_stats", state.batch_stats))

  (loss, (metrics, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite loss or gradient leaves params, batch stats and optimizer state as they were (nonfinite.py).
  grad_norm, health = nonfinite.step_health(loss, grads)
  params, batch_stats, opt_state = nonfinite.keep_if_finite(
      health[nonfinite.FINITE], (params, batch_stats, opt_state), (state.params, state.batch_stats, state.opt_state))
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, **health)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), metrics


def eval_step(state: TrainState, batch: dict, *, model, loss_fn: Callable) -> dict:
  """Loss and metrics in inference mode (batch-norm running statistics)."""
  outputs = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch, train=False)
  loss, metrics = loss_fn(outputs, batch, state.params)
  return dict(metrics, loss=loss)


def jit_steps(model, tx, loss_fn, mesh):
  """(train_step, eval_step) jitted with replicated state and a 'data'-sharded batch."""
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  train = jax.jit(functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn),
                  in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
                  donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_step, model=model, loss_fn=loss_fn),
                     in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  return train, evaluate


# ----------------------------------------------------------------------------------------------------------
# Logging.


class _LibraryInfoFilter:
  """Drops INFO records of noisy libraries (Orbax logs several lines per checkpoint) from absl's handler."""

  def filter(self, record) -> bool:
    return record.levelno > std_logging.INFO or not any(
        part in record.pathname for part in ("/orbax/", "/jax/_src/xla_bridge"))


def quiet_library_logs() -> None:
  """Keeps the console readable in launch scripts: our INFO lines, and only warnings from Orbax and JAX."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


class MetricWriter:
  """Scalars to ``metrics.jsonl`` and TensorBoard event files (primary process only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), "split": split, **scalars}) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", v, int(step))
    self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _mean_metrics(metrics_list: list[dict]) -> dict:
  host = jax.device_get(metrics_list)
  return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


# ----------------------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class Inputs:
  """What the training loop reads.

  Attributes:
    train: endless iterator of this process's rows of each global training batch (numpy dicts); with
      get_state() / set_state() (grain's) its position is checkpointed and restored.
    eval: () -> a fresh finite iterator over the eval split, global batch config.eval_batch_size.
  """
  train: Iterator[dict]
  eval: Callable[[], Iterator[dict]]


def make_inputs(config: ml_collections.ConfigDict) -> Inputs:
  """The grain pipeline of config.data: training batches of config.batch_size shuffled per epoch when
  config.data.shuffle, the same order on every process, each process reading its own rows (docs/data.md)."""
  from dpcr_jax.data import make_iterator  # pylint: disable=g-import-not-at-top
  train_iter = make_iterator(config.data, "train", config.batch_size, seed=config.seed)

  def eval_iter():
    return make_iterator(config.data, config.eval_split, config.eval_batch_size, seed=config.seed, shuffle=False,
                         num_epochs=1)
  return Inputs(train=train_iter, eval=eval_iter)


def evaluate_loss(eval_fn, state: TrainState, batches: Iterator[dict], stage: stages.Stage, mesh,
                  max_batches: int) -> dict:
  """Mean stage metrics over up to ``max_batches`` batches (all when < 0)."""
  results = []
  for i, batch in enumerate(batches):
    if 0 <= max_batches <= i:
      break
    results.append(eval_fn(state, shard_batch(select_batch(batch, stage), mesh)))
  if not results:
    raise ValueError("the evaluation split gave no full batch; lower config.eval_batch_size or add data")
  return _mean_metrics(results)


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Multi-host: jax.distributed.initialize from config.distributed (see docs/training.md)."""
  dist = config.get("distributed")
  if not dist or not dist.get("enabled"):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {k: dist.get(k) for k in ("coordinator_address", "num_processes", "process_id")
            if dist.get(k) not in (None, "", -1)}
  jax.distributed.initialize(**kwargs)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stage: stages.Stage | None = None,
                       inputs_fn: Callable[[ml_collections.ConfigDict], Inputs] | None = None,
                       restart: bool = False) -> TrainState:
  """Trains ``config.stage`` in ``workdir`` (resuming if it holds checkpoints); returns the final state.

  The workdir is locked for the run, and a config that differs from the run saved there in what is trained
  is refused (dpcr_jax/workdir.py); ``restart=True`` moves that run aside and starts from step 0 instead.

  Args:
    stage: the model and loss (default: ``stages.get(config.stage)``).
    inputs_fn: config -> the batches (default: ``make_inputs``); called after jax.distributed is up and the
      config validated, so it may ask for jax.process_index().
    restart: move a run already in ``workdir`` to ``previous_runs/`` and start from step 0, instead of
      refusing a config that differs from it.
  """
  maybe_initialize_distributed(config)  # first: jax.distributed must start before any backend (device_count)
  validate_config(config)
  stage = stage or stages.get(config.stage)
  if stage.name != config.stage:
    raise ValueError(f"the stage passed ({stage.name!r}) is not config.stage ({config.stage!r})")
  with workdir_lib.open_run(config, workdir, restart):
    return _train(config, workdir, stage, inputs_fn or make_inputs)


def _train(config: ml_collections.ConfigDict, workdir: str, stage: stages.Stage,
           inputs_fn: Callable[[ml_collections.ConfigDict], Inputs]) -> TrainState:
  mesh = make_mesh()
  model = stage.build_model(config)
  tx = make_optimizer(config)
  loss_fn = stage.make_loss_fn(config)
  inputs = inputs_fn(config)
  train_iter = inputs.train

  # Parameters are initialised from the shapes of one batch; the iterator is rewound afterwards.
  iter_state = train_iter.get_state()
  example = select_batch(next(train_iter), stage)
  train_iter.set_state(iter_state)
  state = create_train_state(model, tx, jax.tree.map(jnp.asarray, example), config.seed)
  state = replicate(state, mesh)

  ckpt = checkpointing.Checkpointer(workdir, config.checkpoint_every, config.keep_checkpoints)
  resumed = ckpt.restore_latest(state)
  if resumed is not None:
    state, data_state = resumed
    if data_state:
      train_iter.set_state(data_state)
  elif stage.name == "finetune" and (config.init.sparse_checkpoint or config.init.dense_checkpoint):
    state = replicate(checkpointing.init_finetune_state(state, config.init.sparse_checkpoint,
                                                         config.init.dense_checkpoint), mesh)
  workdir_lib.record_config(config, workdir)  # only now: a refused restore leaves the old config.json
  start_step = int(jax.device_get(state.step))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("Stage %s: %d parameters, %d devices, global batch %d, steps %d -> %d", config.stage,
               num_params, jax.device_count(), config.batch_size, start_step, config.num_train_steps)

  train_fn, eval_fn = jit_steps(model, tx, loss_fn, mesh)
  guard = nonfinite.NonFiniteGuard(config.nonfinite_policy, checkpointing.leaf_names(state.params))
  writer = MetricWriter(workdir)
  pending, period_start, period_step = [], time.time(), start_step
  step = start_step
  try:
    while step < config.num_train_steps:
      batch = shard_batch(select_batch(next(train_iter), stage), mesh)
      state, metrics = train_fn(state, batch)
      step += 1
      pending.append((step, guard.observe(step, metrics)))  # raises on a non-finite step (policy 'stop')
      ckpt.check_for_errors()  # a failed background save stops the run now, not minutes later
      if step % config.log_every == 0 or step == config.num_train_steps:
        guard.flush()
        guard.check_period(period_step, step)
        scalars = _mean_metrics([m for s, m in pending if not guard.was_skipped(s)])
        if guard.skipped:
          scalars["skipped_steps"] = len(guard.skipped)
        elapsed = time.time() - period_start
        steps_per_sec = (step - period_step) / max(elapsed, 1e-9)
        scalars["steps_per_sec"] = steps_per_sec
        writer.write(step, "train", scalars)
        eta = (config.num_train_steps - step) / max(steps_per_sec, 1e-9)
        logging.info("[%s] step %d/%d | loss %.5g | cd %.5g | %.2f steps/s | ETA %s", config.stage, step,
                     config.num_train_steps, scalars["loss"], scalars.get("cd", float("nan")), steps_per_sec,
                     _format_duration(eta))
        pending, period_start, period_step = [], time.time(), step
      if config.eval_every > 0 and (step % config.eval_every == 0 or step == config.num_train_steps):
        eval_scalars = evaluate_loss(eval_fn, state, inputs.eval(), stage, mesh, config.eval_batches)
        writer.write(step, "eval", eval_scalars)
        logging.info("[%s] eval at step %d: %s", config.stage, step,
                     ", ".join(f"{k} {v:.5g}" for k, v in sorted(eval_scalars.items())))
        period_start = time.time()  # do not count evaluation time in steps/s
      if step % config.checkpoint_every == 0 or step == config.num_train_steps:
        guard.flush()  # never save after a non-finite step that has not been checked
        ckpt.save(step, state, train_iter.get_state(), force=True)
  finally:
    ckpt.close()
    writer.close()
  if jax.process_index() == 0 and os.path.exists(writer.jsonl_path):
    from dpcr_jax import visualize  # pylint: disable=g-import-not-at-top
    visualize.plot_training_curves(writer.jsonl_path, os.path.join(workdir, "curves.png"),
                                   title=f"{config.stage} stage")
  return state
