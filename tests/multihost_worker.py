"""One process of the multi-host test (tests/test_multihost.py): the stand-in sparse model trained by
``train.train_and_evaluate`` (each process reading its rows of every global batch) with ``config.distributed`` enabled, 2 CPU devices per process, gloo collectives.

  python tests/multihost_worker.py WORKDIR PROCESS_ID NUM_PROCESSES PORT NUM_STEPS

Writes ``<WORKDIR>/params_<PROCESS_ID>.npz``: this process's copy of the final parameters (flattened leaves).
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

import standins  # pylint: disable=g-import-not-at-top

DEVICES_PER_PROCESS = 2


def main(workdir: str, process_id: int, num_processes: int, port: int, num_steps: int) -> None:
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  config = standins.tiny_config("sparse", os.path.dirname(os.path.abspath(__file__)))
  config.num_train_steps, config.checkpoint_every, config.eval_every = num_steps, 2, 1000
  config.distributed.update(enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                            process_id=process_id)
  state = standins.run_training(config, workdir)
  assert jax.process_count() == num_processes and jax.device_count() == DEVICES_PER_PROCESS * num_processes
  # Replicated arrays span devices of every process: read this process's own copy.
  leaves = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
  np.savez(os.path.join(workdir, f"params_{process_id}.npz"), *leaves)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
