"""Smoke test of experiments/bench_ops.py: the --quick run completes and writes a table with the ops."""
import os
import subprocess
import sys

import xla_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ops_quick(tmp_path):
  out = tmp_path / "benchmarks.md"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user would run it
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_ops", "--quick", f"--out={out}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  table = out.read_text()
  assert "| op | sizes | implementation | median |" in table
  for op in ("nn_distance", "farthest_point_sample", "knn", "ball_query"):
    if op in xla_ops.__all__:
      assert f"| {op} | " in table and " | ffi | " in table, op
  if "approx_match" in xla_ops.__all__:
    assert "| approx_match+match_cost | " in table and "approx EMD / exact - 1" in table
