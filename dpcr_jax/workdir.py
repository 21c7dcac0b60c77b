"""A training run's directory: one run at a time, writable, and never resumed with another config.

``open_run(config, workdir, restart)`` is called before anything is built. It
  1. takes ``<workdir>/run.lock`` (``RunLock``): a second launcher on the same workdir is refused at once with
     the holder's host and pid; the lock is released on exit and taken over from a holder that died (the
     kernel drops an ``flock`` with its process, so a SIGKILLed run leaves nothing to clean up by hand);
  2. checks that the workdir and its checkpoints folder are writable (``check_writable``);
  3. compares ``config`` with the run's saved ``config.json`` (``config_differences``): a field that changes
     what is trained (model, stage, loss, optimizer, data content, seed, ...) refuses the start with
     ``ConfigMismatchError`` naming each field, unless ``restart`` is set, in which case the old run's files
     are moved to ``<workdir>/previous_runs/<UTC time>/`` (never deleted) and training starts from step 0.
     Fields in ``RESUMABLE_FIELDS`` (how long, how often to log/evaluate/save, where the data lives, ...)
     may change on resume; the changes are logged;
``record_config(config, workdir)`` then writes ``config.json`` (atomically: a temporary file renamed over the
old one), called by the training loop once the checkpoints have been restored, so a refused start (a config
or checkpoint mismatch) leaves the old file as it was.
Only the primary process (``jax.process_index() == 0``) does any of this; the others share its files.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import fnmatch
import json
import os
import socket
from typing import Any

from absl import logging
import jax
import ml_collections

from dpcr_jax.errors import RunError

LOCK_NAME = "run.lock"
CONFIG_NAME = "config.json"
PREVIOUS_RUNS = "previous_runs"
# Files and folders of a run that --restart moves aside (the lock, damaged_checkpoints/ and previous_runs/
# stay where they are).
RUN_OUTPUTS = (CONFIG_NAME, "checkpoints", "metrics.jsonl", "tensorboard", "curves.png")
# Config fields (dotted, fnmatch patterns) that may differ between a run's saved config.json and the config
# that resumes it: they say how long and how observably to train, not what is trained.
RESUMABLE_FIELDS = (
    "num_train_steps", "log_every", "eval_every", "eval_batches", "eval_batch_size", "eval_split",
    "checkpoint_every", "keep_checkpoints", "nonfinite_policy", "init.*", "distributed.*",
    "data.root", "data.num_workers", "data.prefetch", "data.skip_missing", "data.psgn_split_dir",
    "data.r2n2_split_file", "ops_impl",
)


class WorkdirLockedError(RunError):
  """Another live process holds the workdir's lock."""


class WorkdirNotWritableError(RunError):
  """The workdir (or its checkpoints folder) cannot be written."""


class ConfigMismatchError(RunError, ValueError):
  """The config differs from the saved run's config.json in fields that change what is trained."""


# ----------------------------------------------------------------------------------------------------------
# The lock.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class RunLock:
  """An exclusive ``flock`` on ``<workdir>/run.lock``, whose content names the holder (host, pid, start).

  ``acquire()`` raises WorkdirLockedError at once when another live process holds it. The kernel releases an
  flock when its holder exits in any way (crash, SIGKILL), so a stale file is simply taken over; its content
  is logged. ``release()`` removes the file. On network filesystems flock may not be honoured across hosts
  (docs/guarantees.md).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd: int | None = None

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        info = json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return "an unknown process"
    host, pid = info.get("host", "?"), info.get("pid", -1)
    alive = ""
    if host == socket.gethostname() and isinstance(pid, int) and pid > 0:
      alive = " (running)" if _pid_alive(pid) else " (not running: the lock is held by a process it started)"
    return f"pid {pid} on host {host}{alive}, started {info.get('started', '?')}"

  def acquire(self) -> "RunLock":
    while True:
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      except OSError as e:
        raise WorkdirNotWritableError(f"cannot create the lock file {self.path} ({e.strerror or e})") from e
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise
        raise WorkdirLockedError(f"{os.path.dirname(self.path)} is in use by another training run: "
                                 f"{self._holder()}. Wait for it to finish or stop it, or use another "
                                 f"--workdir.") from None
      # The file may have been removed (released) between open and flock: then our lock is on a dead inode.
      try:
        if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)
    previous = os.read(fd, 4096).decode(errors="replace").strip()
    if previous:
      logging.warning("Taking over %s from a run that is no longer running: %s", self.path, previous)
    info = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # while still holding the lock: a waiting process then retries on a new file
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


# ----------------------------------------------------------------------------------------------------------
# Writability.


def check_writable(*folders: str) -> None:
  """Creates each folder if needed and writes, syncs and removes a small file in it; raises
  WorkdirNotWritableError naming the folder and the OS error."""
  for folder in folders:
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
      os.makedirs(folder, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"ok")
        f.flush()
        os.fsync(f.fileno())
      os.remove(probe)
    except OSError as e:
      raise WorkdirNotWritableError(f"cannot write to {folder} ({e.strerror or e}); choose a writable "
                                    "--workdir or fix its permissions / free space") from e


# ----------------------------------------------------------------------------------------------------------
# Config comparison.


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out if out or not prefix else {prefix[:-1]: {}}
  return {prefix[:-1]: tree}


def as_plain(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json stores it (JSON round trip: tuples become lists, ...)."""
  return json.loads(config.to_json_best_effort())


def config_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """Compares a saved config.json with the current config (both plain dicts).

  Returns (blocking, allowed): lines 'field: saved -> current' for fields that differ, split by whether the
  field is in RESUMABLE_FIELDS. A field missing on one side (a config field added or removed since the run
  was made) is allowed: it is reported, not refused.
  """
  a, b = _flatten(saved), _flatten(current)
  blocking, allowed = [], []
  for key in sorted(set(a) | set(b)):
    if key in a and key in b and a[key] == b[key]:
      continue
    line = f"{key}: {json.dumps(a.get(key, '<absent>'))} -> {json.dumps(b.get(key, '<absent>'))}"
    resumable = key not in a or key not in b or any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE_FIELDS)
    (allowed if resumable else blocking).append(line)
  return blocking, allowed


def _move_run_aside(workdir: str) -> str | None:
  """Moves the run's outputs into previous_runs/<UTC time>/; returns that folder (None if nothing to move)."""
  present = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(workdir, name))]
  if not present:
    return None
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  target = os.path.join(workdir, PREVIOUS_RUNS, stamp)
  n = 1
  while os.path.exists(target):
    target, n = os.path.join(workdir, PREVIOUS_RUNS, f"{stamp}.{n}"), n + 1
  os.makedirs(target)
  for name in present:
    os.rename(os.path.join(workdir, name), os.path.join(target, name))
  return target


def record_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the run's config.json (primary process; atomic rename)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(config.to_json_best_effort(indent=2))
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def prepare(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> None:
  """Steps 2-3 of the module doc (the caller holds the lock)."""
  from dpcr_jax import checkpointing  # pylint: disable=g-import-not-at-top
  saved_path = os.path.join(workdir, CONFIG_NAME)
  if restart:
    moved = _move_run_aside(workdir)
    if moved:
      logging.warning("--restart: moved the previous run's files to %s; training starts from step 0", moved)
  elif os.path.exists(saved_path):
    try:
      with open(saved_path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigMismatchError(f"{saved_path} is unreadable ({e}); cannot tell whether this config continues "
                                "that run. Restart explicitly (--restart) or use another --workdir.") from e
    blocking, allowed = config_differences(saved, as_plain(config))
    if blocking:
      raise ConfigMismatchError(
          f"{workdir} holds a run made with another config; resuming it would mix two runs. Differing "
          f"fields (saved -> now): {'; '.join(blocking)}. Nothing was changed. Use another --workdir, run "
          f"with the saved config, or pass --restart to move the old run to {PREVIOUS_RUNS}/ and start over.")
    for line in allowed:
      logging.info("Resuming with a changed setting: %s", line)
  check_writable(workdir, checkpointing.checkpoint_dir(workdir))


class open_run:  # pylint: disable=invalid-name  (used as a context manager, like open())
  """``with open_run(config, workdir, restart):`` holds the workdir for one run (module doc)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, restart: bool = False):
    self.config, self.workdir, self.restart = config, os.path.abspath(workdir), restart
    self.lock = RunLock(self.workdir) if jax.process_index() == 0 else None

  def __enter__(self):
    if self.lock is None:
      return self
    try:
      os.makedirs(self.workdir, exist_ok=True)
    except OSError as e:
      raise WorkdirNotWritableError(f"cannot create the workdir {self.workdir} ({e.strerror or e})") from e
    self.lock.acquire()
    try:
      prepare(self.config, self.workdir, self.restart)
    except BaseException:
      self.lock.release()
      raise
    return self

  def __exit__(self, *exc):
    if self.lock is not None:
      self.lock.release()
