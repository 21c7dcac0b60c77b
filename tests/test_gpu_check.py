"""experiments/gpu_check.py --cpu-smoke: every step of the GPU check runs at tiny sizes on the CPU and the
report has every section, so the script is known to work before a GPU sees it."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_cpu_smoke(tmp_path):
  docs = os.path.join(ROOT, "docs", "gpu.md")
  before = open(docs).read() if os.path.exists(docs) else None
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--out", str(tmp_path), "--cpu-smoke"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = (tmp_path / "gpu.md").read_text()
  assert "CPU smoke run (tiny sizes, not a GPU result)" in report
  for step in ("extension", "pytest", "bench_ops", "bench_step", "train_smoke"):
    assert f"| {step} | ok |" in report, step
  assert "| build | skipped (--cpu-smoke)" in report
  assert "| nn_distance | B=2 N=512 M=512 | ffi |" in report and "| knn |" in report
  assert "ffi speed-up (jnp step time / ffi step time)" in report
  train = json.loads((tmp_path / "train_smoke.json").read_text())
  assert list(train["stages"]) == ["sparse", "dense", "finetune"]
  assert all(s["finite"] and s["steps"] == 3 for s in train["stages"].values())
  assert train["stages"]["finetune"]["from_trained_stages"]
  assert "pip install --no-build-isolation --no-index --find-links shared/wheels" in report
  # A smoke run never touches the GPU report in docs/.
  assert (open(docs).read() if os.path.exists(docs) else None) == before
