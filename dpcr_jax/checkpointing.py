"""Orbax checkpoints of a training run: save, keep-N, resume, stage init and inference loading.

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds three items:
  - ``variables``: {'params', 'batch_stats'} (all that inference needs);
  - ``train``: {'step', 'opt_state', 'rng'};
  - ``data``: the input iterator's ``get_state()`` as JSON (the iterators of all processes advance in lockstep,
    so the primary process's state is the state of every process).

Orbax writes a step into a temporary directory and renames it when complete, so a run killed mid-save
leaves no half step behind. A step whose files were damaged afterwards fails to restore; ``restore_latest``
then falls back to the next older step and says so.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

_ITEMS = ("variables", "train", "data")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _resolve(path: str) -> str:
  """A run's workdir or its checkpoints/ folder -> the checkpoints folder."""
  path = os.path.abspath(path)
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


class Checkpointer:
  """Periodic saves with keep-N and resume with fallback to older steps.

  Args:
    workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints``.
    save_every: save when ``step % save_every == 0`` (and always when ``force=True``).
    keep: how many most recent steps to keep.
  """

  def __init__(self, workdir: str, save_every: int, keep: int):
    if save_every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint_every and keep_checkpoints must be > 0, got {save_every}, {keep}")
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=_ITEMS)

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves (asynchronously) at multiples of ``save_every`` or when forced; returns whether it saved."""
    if not force and step % self.save_every:
      return False
    if step in self.manager.all_steps():
      return False
    args = ocp.args.Composite(
        variables=ocp.args.StandardSave({"params": state.params, "batch_stats": state.batch_stats}),
        train=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
        data=ocp.args.JsonSave(data_state or {}))
    return self.manager.save(step, args=args, force=True)

  def restore_latest(self, state: Any) -> tuple[Any, dict] | None:
    """Restores the newest readable step into ``state``'s structure and shardings.

    Returns (state, data_state), or None when there is no readable checkpoint. A step that fails to restore
    (damaged or partially deleted files) is skipped with a warning and the next older one is tried.
    """
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      args = ocp.args.Composite(
          variables=ocp.args.StandardRestore({"params": state.params, "batch_stats": state.batch_stats}),
          train=ocp.args.StandardRestore({"step": state.step, "opt_state": state.opt_state, "rng": state.rng}),
          data=ocp.args.JsonRestore())
      try:
        restored = self.manager.restore(step, args=args)
      except Exception as e:  # pylint: disable=broad-except  (any damage: missing files, bad bytes, bad JSON)
        logging.warning("Checkpoint step %d in %s is unreadable (%s: %s); trying the previous one.",
                        step, self.manager.directory, type(e).__name__, str(e)[:200])
        continue
      variables, train = restored["variables"], restored["train"]
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                            step=train["step"], opt_state=train["opt_state"], rng=train["rng"])
      logging.info("Resumed from step %d in %s", step, self.manager.directory)
      return state, restored["data"]
    return None

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def load_variables(path: str, step: int | None = None) -> dict:
  """Params and batch stats only, for inference or stage initialisation.

  Args:
    path: a run's workdir or its ``checkpoints`` folder.
    step: which step; default the newest readable one (older ones are tried if it is damaged).
  Returns:
    {'params': ..., 'batch_stats': ...} as host/default-device arrays.
  """
  directory = _resolve(path)
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint path {path!r} does not exist")
  manager = ocp.CheckpointManager(directory, item_names=_ITEMS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise ValueError(f"no checkpoint found under {directory!r}")
  errors = []
  for s in steps:
    try:
      restored = manager.restore(s, args=ocp.args.Composite(variables=ocp.args.StandardRestore()))
      return jax.tree.map(lambda x: x, dict(restored["variables"]))
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Checkpoint step %d in %s is unreadable (%s); trying the previous one.", s, directory, e)
      errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
  raise ValueError(f"no readable checkpoint under {directory!r}: " + "; ".join(errors))


def _check_same_structure(name: str, loaded: Any, expected: Any) -> None:
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  if jax.tree.structure(loaded) != jax.tree.structure(expected) or shapes(loaded) != shapes(expected):
    raise ValueError(f"{name}: the stage checkpoint's variables do not match the finetune model's "
                     f"'{name.split('_')[0]}' submodule (different model config?)")


def init_finetune_state(state: Any, sparse_checkpoint: str | None, dense_checkpoint: str | None) -> Any:
  """Puts the sparse and dense stage weights into a fresh finetune state's ``sparse`` / ``dense`` submodules.

  Unlike the original (docs/original.md §3, §9 quirk 7), this happens only when the finetune run has no checkpoint of its own,
  so an interrupted finetune resumes its own weights instead of restarting from random ones. Only params and
  batch stats are loaded; Adam's moments start at zero (the original also restored the m/v slots).
  """
  params = dict(state.params)
  batch_stats = dict(state.batch_stats)
  for name, path in (("sparse", sparse_checkpoint), ("dense", dense_checkpoint)):
    if not path:
      continue
    loaded = load_variables(path)
    _check_same_structure(f"{name}_checkpoint params", loaded["params"], params[name])
    params[name] = loaded["params"]
    if name in batch_stats:
      _check_same_structure(f"{name}_checkpoint batch_stats", loaded.get("batch_stats", {}), batch_stats[name])
      batch_stats[name] = loaded["batch_stats"]
    logging.info("Initialised the finetune '%s' submodule from %s", name, path)
  return state.replace(params=params, batch_stats=batch_stats)
