"""How the approximate EMD (xla_ops.earth_mover_distance) depends on the clouds' scale, against the exact EMD.

For random pairs of clouds (uniform in a cube of side `scale`, N points each) it prints the mean ratio
approximate / exact EMD for the plain op and for ``normalize_scale=True``; the exact EMD is the optimal
one-to-one assignment (scipy's linear_sum_assignment, dpcr_jax.metrics.exact_emd). docs/ops.md ("EMD") quotes
its output.

  python -m experiments.emd_scale --num_points=512 --pairs=4
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

_POINTS = flags.DEFINE_integer("num_points", 512, "Points per cloud.")
_PAIRS = flags.DEFINE_integer("pairs", 4, "Cloud pairs per scale.")
_SCALES = flags.DEFINE_list("scales", ["0.01", "1", "1000"], "Cube sides.")


def main(argv):
  del argv
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dpcr_jax.metrics import exact_emd  # pylint: disable=g-import-not-at-top
  from xla_ops import earth_mover_distance  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  base = rng.random((2, _PAIRS.value, _POINTS.value, 3), np.float32)  # the same shapes at every scale
  print(f"N = M = {_POINTS.value}, {_PAIRS.value} pairs of uniform random clouds per scale")
  print("| cube side | exact EMD (mean) | approx / exact | approx (normalize_scale) / exact |")
  print("|---|---|---|---|")
  for scale in map(float, _SCALES.value):
    a, b = base[0] * scale, base[1] * scale
    exact = np.array([exact_emd(x, y) for x, y in zip(a, b)])
    plain = np.asarray(earth_mover_distance(jnp.asarray(a), jnp.asarray(b)), np.float64)
    normed = np.asarray(earth_mover_distance(jnp.asarray(a), jnp.asarray(b), normalize_scale=True), np.float64)
    print(f"| {scale:g} | {exact.mean():.4g} | {np.mean(plain / exact):.3f} | {np.mean(normed / exact):.3f} |")


if __name__ == "__main__":
  app.run(main)
