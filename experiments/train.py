r"""Trains one stage: a thin launcher over dpcr_jax.train.train_and_evaluate.

  python -m experiments.train --config configs/paper.py:sparse --workdir runs/sparse \
      --config.data.root=/path/to/attdpcr --config.batch_size=8

Rerunning with the same --workdir resumes from its newest checkpoint; a config that changes what is trained
is refused there unless --restart is given (the old run is then moved to <workdir>/previous_runs/). See
docs/training.md and docs/guarantees.md.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dpcr_jax import train
from dpcr_jax.errors import RunError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, curves).")
_CACHE = flags.DEFINE_string("compilation_cache", "", "Persistent XLA compilation cache folder ('' = off).")
_RESTART = flags.DEFINE_bool("restart", False, "Start over in a --workdir that holds a run: move that run's "
                              "files to <workdir>/previous_runs/<time>/ (nothing is deleted) and train from step 0.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  train.quiet_library_logs()
  if _CACHE.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
  logging.info("Config:\n%s", _CONFIG.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, restart=_RESTART.value)
  except RunError as e:  # a refusal or a deliberate stop: the message says what to do, no traceback needed
    logging.error("%s", e)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
