"""Orbax checkpoints of a training run: save, keep-N, verified resume, stage init and inference loading.

A checkpoint step directory ``<workdir>/checkpoints/<step>/`` holds four items:
  - ``variables``: {'params', 'batch_stats'} (all that inference needs);
  - ``train``: {'step', 'opt_state', 'rng'};
  - ``data``: the input iterator's ``get_state()`` as JSON (the iterators of all processes advance in lockstep,
    so the primary process's state is the state of every process);
  - ``checksums``: a 32-bit fingerprint of every array of ``variables`` and ``train``, computed from the
    values that were saved (``tree_fingerprints``).

What a step guarantees (docs/guarantees.md):
  - Orbax writes a step into a temporary directory and renames it when complete, so a run killed mid-save
    leaves no half step behind; keep-N deletes old steps only after a newer one is complete.
  - ``save`` refuses state with a NaN or Inf in it (``NonFiniteStateError``), so no such step is written.
  - On restore, a step is *damaged* when its files cannot be read, when the restored arrays do not match the
    saved fingerprints, or when they hold a non-finite value. A damaged step is skipped with a warning and the
    next older one is tried; during training it is also moved to ``<workdir>/damaged_checkpoints/`` (never
    deleted) so that keep-N does not count it and a later save of that step number is not skipped.
  - A readable step whose arrays have other names or shapes than the model being trained is not damage but
    a different run: ``CheckpointMismatchError``, nothing is skipped, moved or deleted.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from dpcr_jax.errors import RunError

_ITEMS = ("variables", "train", "data", "checksums")
_CHECKSUM_FORMAT = 1
DAMAGED_DIR = "damaged_checkpoints"


class CheckpointMismatchError(RunError, ValueError):
  """A checkpoint is readable but its arrays do not fit the model being trained (another config or stage)."""


class CheckpointSaveError(RunError):
  """Writing a checkpoint failed (full or read-only disk, another process in the folder, ...)."""


class NonFiniteStateError(RunError):
  """The state to be saved holds NaN or Inf values."""


class _DamagedCheckpoint(Exception):
  """A step's files are unreadable, do not match their checksums, or restore to non-finite values."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def _resolve(path: str) -> str:
  """A run's workdir or its checkpoints/ folder -> the checkpoints folder."""
  path = os.path.abspath(path)
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def _handlers() -> dict:
  return {"variables": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
          "data": ocp.JsonCheckpointHandler(), "checksums": ocp.JsonCheckpointHandler()}


# ----------------------------------------------------------------------------------------------------------
# Fingerprints, finiteness and structure of pytrees.


def leaf_names(tree: Any) -> list[str]:
  """'/'-joined key paths of the leaves, in ``jax.tree.leaves`` order ('params/Dense_0/kernel',
  'opt_state/0/mu/...'); dict keys, attribute names and sequence indices are spelled the same way, so a
  NamedTuple optimizer state and its dict form in a checkpoint's metadata get the same names."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return ["/".join(name(k) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _leaf_bits(x: np.ndarray) -> np.ndarray:
  """Any array -> its raw bits as uint32 [n] (16- and 8-bit types widened, 64-bit split in two words)."""
  x = np.ascontiguousarray(x)
  if x.dtype == np.bool_:
    x = x.astype(np.uint8)
  unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize]
  return x.reshape(-1).view(unsigned).astype(np.uint32, copy=False)


def _leaf_fingerprint(x: np.ndarray) -> int:
  """Position-weighted sum (mod 2^32) of the array's mixed bits: any changed, swapped or lost word changes it
  with probability ~1 - 2^-32."""
  bits = _leaf_bits(x)
  weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(0x9E3779B1) + np.uint32(0x7F4A7C15)
  mixed = (bits ^ (bits >> np.uint32(15))) * (weights | np.uint32(1))
  return int(np.sum(mixed, dtype=np.uint32)) ^ (bits.size & 0xFFFFFFFF)


def tree_fingerprints(tree: Any) -> tuple[dict[str, int], list[str]]:
  """-> ({leaf name: fingerprint}, names of the leaves that hold NaN or Inf).

  Computed on the host (numpy, no compilation) from a copy of the arrays; Orbax copies them to the host for
  writing anyway, and this runs only at save and restore.
  """
  names = leaf_names(tree)
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
            for x in jax.tree.leaves(tree)]
  leaves = [np.asarray(x) for x in jax.device_get(leaves)]
  fingerprints = {n: _leaf_fingerprint(x) for n, x in zip(names, leaves)}
  nonfinite = [n for n, x in zip(names, leaves) if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all()]
  return fingerprints, nonfinite


def _shapes(tree: Any) -> dict[str, tuple]:
  return dict(zip(leaf_names(tree), (tuple(x.shape) for x in jax.tree.leaves(tree))))


def describe_mismatch(saved: dict[str, tuple], expected: dict[str, tuple], limit: int = 6) -> str:
  """'' when the two {name: shape} maps agree, else a short list of the differences."""
  lines = []
  for name in sorted(set(saved) | set(expected), key=lambda n: (not n.startswith("variables/"), n)):
    if name not in expected:
      lines.append(f"{name}: {saved[name]} in the checkpoint, absent in the model")
    elif name not in saved:
      lines.append(f"{name}: absent in the checkpoint, {expected[name]} in the model")
    elif saved[name] != expected[name]:
      lines.append(f"{name}: {saved[name]} in the checkpoint, {expected[name]} in the model")
  more = f" (and {len(lines) - limit} more)" if len(lines) > limit else ""
  return "; ".join(lines[:limit]) + more


def _short(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


# ----------------------------------------------------------------------------------------------------------
# Reading one step.


def _saved_shapes(manager: ocp.CheckpointManager, step: int, items: tuple[str, ...]) -> dict[str, tuple]:
  """{'<item>/<leaf name>': shape} from a step's metadata; damage if it cannot be read."""
  try:
    metadata = manager.item_metadata(step)
    shapes = {}
    for item in items:
      tree = metadata[item].tree
      shapes.update({f"{item}/{k}": v for k, v in _shapes(tree).items()})
    return shapes
  except Exception as e:  # pylint: disable=broad-except  (unreadable or missing metadata files)
    raise _DamagedCheckpoint(f"metadata unreadable ({_short(e)})") from e


def _read_checksums(manager: ocp.CheckpointManager, step: int) -> dict[str, int] | None:
  """The step's saved fingerprints; None for a step written before checksums existed."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), "checksums")):
    return None
  try:
    saved = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore()))["checksums"]
    if saved.get("format") != _CHECKSUM_FORMAT:
      raise ValueError(f"unknown checksum format {saved.get('format')!r}")
    return {k: int(v) for k, v in saved["fingerprints"].items()}
  except Exception as e:  # pylint: disable=broad-except
    raise _DamagedCheckpoint(f"checksums unreadable ({_short(e)})") from e


def _verify(step: int, restored: dict[str, Any], checksums: dict[str, int] | None) -> None:
  """Raises _DamagedCheckpoint unless every restored array matches its checksum and is finite."""
  fingerprints, nonfinite = tree_fingerprints(restored)
  if nonfinite:
    raise _DamagedCheckpoint(f"non-finite values in {', '.join(nonfinite[:4])}"
                             + (f" (and {len(nonfinite) - 4} more arrays)" if len(nonfinite) > 4 else ""))
  if checksums is None:
    logging.warning("Checkpoint step %d has no checksums (written by an older version): verified finiteness only.",
                    step)
    return
  wrong = [name for name, value in fingerprints.items() if checksums.get(name) != value]
  if wrong:
    raise _DamagedCheckpoint(f"checksum mismatch in {', '.join(wrong[:4])}"
                             + (f" (and {len(wrong) - 4} more arrays)" if len(wrong) > 4 else ""))


def _restore_verified(manager: ocp.CheckpointManager, step: int, targets: dict[str, Any],
                      with_data: bool) -> dict:
  """Restores ``targets`` ({item: pytree or None}) of ``step`` and verifies them.

  Raises CheckpointMismatchError when a target has other names or shapes than the saved arrays (only for
  targets given as pytrees), _DamagedCheckpoint for unreadable, corrupted or non-finite data.
  """
  expected = {f"{item}/{k}": v for item, tree in targets.items() if tree is not None
              for k, v in _shapes(tree).items()}
  saved = _saved_shapes(manager, step, tuple(targets))
  if expected:
    difference = describe_mismatch(saved, expected)
    if difference:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {manager.directory} was saved by a run with another model or stage: "
          f"{difference}. Nothing was changed. Use another --workdir, or restart the run explicitly "
          f"(experiments/train.py --restart moves the old run aside).")
  checksums = _read_checksums(manager, step)
  args = {item: ocp.args.StandardRestore(tree) for item, tree in targets.items()}
  if with_data:
    args["data"] = ocp.args.JsonRestore()
  try:
    restored = dict(manager.restore(step, args=ocp.args.Composite(**args)))
  except Exception as e:  # pylint: disable=broad-except  (missing files, bad bytes, bad JSON)
    raise _DamagedCheckpoint(f"unreadable ({_short(e)})") from e
  if checksums is not None:
    checksums = {k: v for k, v in checksums.items() if k.split("/", 1)[0] in targets}
  _verify(step, {item: restored[item] for item in targets}, checksums)
  return restored


# ----------------------------------------------------------------------------------------------------------
# Training: save and resume.


class Checkpointer:
  """Periodic verified saves with keep-N, and resume with fallback to older steps on damage.

  Args:
    workdir: the run's directory; checkpoints go to ``<workdir>/checkpoints``.
    save_every: save when ``step % save_every == 0`` (and always when ``force=True``).
    keep: how many most recent steps to keep.
  """

  def __init__(self, workdir: str, save_every: int, keep: int):
    if save_every <= 0 or keep <= 0:
      raise ValueError(f"checkpoint_every and keep_checkpoints must be > 0, got {save_every}, {keep}")
    self.save_every = save_every
    self.workdir = os.path.abspath(workdir)
    self._failed = False
    # Directories are created inside save(), not in a background thread: a folder that cannot be written
    # then fails that save() at once, instead of leaving Orbax's other threads waiting 5 minutes for it.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    self.manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=_handlers())

  def _fail(self, step: int | None, e: BaseException) -> CheckpointSaveError:
    self._failed = True
    where = f"step {step}" if step is not None else "an earlier step"
    return CheckpointSaveError(f"saving checkpoint {where} to {self.manager.directory} failed ({_short(e)}). "
                               "Training stopped; the checkpoints already there are unchanged. Check that "
                               "the folder is writable, has free space and is not used by another run.")

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError if a background (asynchronous) save has failed."""
    try:
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(None, e) from e

  def save(self, step: int, state: Any, data_state: dict | None, force: bool = False) -> bool:
    """Saves (asynchronously) at multiples of ``save_every`` or when forced; returns whether it saved.

    Raises NonFiniteStateError (nothing written) if the state holds NaN or Inf, CheckpointSaveError if this
    or an earlier asynchronous save failed.
    """
    if not force and step % self.save_every:
      return False
    self.check_for_errors()
    if step in self.manager.all_steps():
      return False
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    fingerprints, nonfinite = tree_fingerprints({"variables": variables, "train": train})
    if nonfinite:
      raise NonFiniteStateError(f"refusing to save step {step}: non-finite values in {', '.join(nonfinite[:4])}; "
                                "the checkpoints already there are unchanged")
    args = ocp.args.Composite(
        variables=ocp.args.StandardSave(variables), train=ocp.args.StandardSave(train),
        data=ocp.args.JsonSave(data_state or {}),
        checksums=ocp.args.JsonSave({"format": _CHECKSUM_FORMAT, "fingerprints": fingerprints}))
    try:
      return self.manager.save(step, args=args, force=True)
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(step, e) from e

  def _move_aside(self, step: int) -> None:
    """Moves a damaged step out of the checkpoints folder (kept for inspection, never deleted)."""
    if jax.process_index() != 0:
      return
    source = os.path.join(str(self.manager.directory), str(step))
    target_dir = os.path.join(self.workdir, DAMAGED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    target, n = os.path.join(target_dir, str(step)), 1
    while os.path.exists(target):
      target, n = os.path.join(target_dir, f"{step}.{n}"), n + 1
    shutil.move(source, target)
    logging.warning("Moved damaged checkpoint step %d to %s", step, target)

  def restore_latest(self, state: Any) -> tuple[Any, dict] | None:
    """Restores the newest verified step into ``state``'s structure and shardings.

    Returns (state, data_state), or None when there is no usable checkpoint. A damaged step is moved to
    ``<workdir>/damaged_checkpoints/`` with a warning and the next older one is tried. Raises
    CheckpointMismatchError (changing nothing) when a step does not fit ``state``.
    """
    self.manager.reload()
    targets = {"variables": {"params": state.params, "batch_stats": state.batch_stats},
               "train": {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}}
    moved = False
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = _restore_verified(self.manager, step, targets, with_data=True)
      except _DamagedCheckpoint as e:
        logging.warning("Checkpoint step %d in %s is damaged (%s); trying the previous one.", step,
                        self.manager.directory, e)
        self._move_aside(step)
        moved = True
        continue
      if moved:
        self.manager.reload()
      variables, train = restored["variables"], restored["train"]
      state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                            step=train["step"], opt_state=train["opt_state"], rng=train["rng"])
      logging.info("Resumed from step %d in %s", step, self.manager.directory)
      return state, restored["data"]
    if moved:
      self.manager.reload()
    return None

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(None, e) from e

  def close(self):
    """Waits for the last save and closes; after a failed save, returns at once (the error was raised)."""
    if self._failed:
      return
    self.wait()
    self.manager.close()


# ----------------------------------------------------------------------------------------------------------
# Inference and stage initialisation.


def load_variables(path: str, step: int | None = None) -> dict:
  """Params and batch stats only (verified against their checksums and for finiteness), for inference or
  stage initialisation.

  Args:
    path: a run's workdir or its ``checkpoints`` folder.
    step: which step; default the newest usable one (older ones are tried, with a warning, when it is
      damaged). Nothing in the run is moved or changed.
  Returns:
    {'params': ..., 'batch_stats': ...} as host/default-device arrays.
  Raises:
    ValueError naming every step tried and why it was rejected, when none is usable.
  """
  directory = _resolve(path)
  if not os.path.isdir(directory):
    raise ValueError(f"checkpoint path {path!r} does not exist")
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise ValueError(f"no checkpoint found under {directory!r}")
  errors = []
  for s in steps:
    try:
      restored = _restore_verified(manager, s, {"variables": None}, with_data=False)
      if errors:
        logging.warning("Using checkpoint step %d of %s (newer steps rejected: %s)", s, directory,
                        "; ".join(errors))
      return jax.tree.map(lambda x: x, dict(restored["variables"]))
    except _DamagedCheckpoint as e:
      logging.warning("Checkpoint step %d in %s is damaged (%s); trying the previous one.", s, directory, e)
      errors.append(f"step {s}: {e}")
  raise ValueError(f"no usable checkpoint under {directory!r}: " + "; ".join(errors))


def _check_same_structure(name: str, loaded: Any, expected: Any) -> None:
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  if jax.tree.structure(loaded) != jax.tree.structure(expected) or shapes(loaded) != shapes(expected):
    raise ValueError(f"{name}: the stage checkpoint's variables do not match the finetune model's "
                     f"'{name.split('_')[0]}' submodule (different model config?)")


def init_finetune_state(state: Any, sparse_checkpoint: str | None, dense_checkpoint: str | None) -> Any:
  """Puts the sparse and dense stage weights into a fresh finetune state's ``sparse`` / ``dense`` submodules.

  Unlike the original (docs/original.md §3, §9 quirk 7), this happens only when the finetune run has no
  checkpoint of its own, so an interrupted finetune resumes its own weights instead of restarting from random
  ones. Only params and
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
