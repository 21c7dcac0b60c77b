r"""Medoid baselines: computed vs read from the cache (dpcr_jax/baseline_cache.py), in one process.

  python -m experiments.bench_medoids --checkpoint runs/quickstart/finetune [--repeats 3]

Uses the run's data config, batch size, seed and ops; the cache goes to a fresh temporary folder. Prints the
time without a cache, of the first cached call (computes and stores), the median of the cache hits, and the
ratio; checks that the cached medoids equal the recomputed ones.
"""
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from dpcr_jax import baseline_cache, predict, train

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A run directory (its config.json names the data).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Cache hits to time.")
flags.mark_flags_as_required(["checkpoint"])


def main(argv):
  del argv
  train.quiet_library_logs()
  config = predict.load_run_config(_CHECKPOINT.value)
  kw = dict(batch_size=config.eval_batch_size, seed=config.seed, impl=config.model.ops_impl)

  def timed(cache_dir):
    start = time.perf_counter()
    medoids = baseline_cache.medoid_baselines(config.data, cache_dir=cache_dir, **kw)
    return time.perf_counter() - start, medoids

  with tempfile.TemporaryDirectory() as cache:
    t_off, ref = timed("")
    t_store, _ = timed(cache)
    hits = [timed(cache) for _ in range(_REPEATS.value)]
  for _, m in hits:
    assert all(np.array_equal(ref.blind[v], m.blind[v]) for v in ref.blind)
    assert all(np.array_equal(ref.oracle[k], m.oracle[k]) for k in ref.oracle)
  t_hit = statistics.median(t for t, _ in hits)
  print(f"{ref.num_clouds} training clouds; load {os.getloadavg()[0]:.1f}")
  print(f"no cache {t_off:.2f} s | first cached call (stores) {t_store:.2f} s | hit median {t_hit:.3f} s "
        f"({_REPEATS.value} runs) | ratio {t_off / t_hit:.0f}x | cached medoids identical")


if __name__ == "__main__":
  app.run(main)
