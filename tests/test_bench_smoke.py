"""Smoke tests of the benchmark scripts: experiments/bench_ops.py's --quick run completes and writes a table
with the ops (keeping the hand-written sections of the file); experiments/profile_step.py's trace mapping."""
import os
import subprocess
import sys

import xla_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_ops_quick(tmp_path):
  from experiments.bench_ops import KEEP_MARKER  # pylint: disable=g-import-not-at-top
  out = tmp_path / "benchmarks.md"
  out.write_text(f"an old generated table\n\n{KEEP_MARKER}\n## Training step (quickstart)\nhand-written\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user would run it
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_ops", "--quick", f"--out={out}"], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  table = out.read_text()
  assert "| op | sizes | implementation | median |" in table
  assert "an old generated table" not in table
  assert table.endswith(f"{KEEP_MARKER}\n## Training step (quickstart)\nhand-written\n")
  for op in ("nn_distance", "farthest_point_sample", "knn", "ball_query"):
    if op in xla_ops.__all__:
      assert f"| {op} | " in table and " | ffi | " in table, op
  if "approx_match" in xla_ops.__all__:
    assert "| approx_match+match_cost | " in table and "approx EMD / exact - 1" in table


def test_profile_step_maps_hlo_ops_to_parts():
  from experiments import profile_step  # pylint: disable=g-import-not-at-top
  hlo = ("ENTRY %main {\n"
         '  %conv.1 = f32[8,64,64,16]{3,2,1,0} convolution(%a, %b), metadata={op_name="jit(train_step)/jvp(SparseNet)'
         '/SparseNet.reconstruct/encoder/stem_1/conv_general_dilated"}\n'
         "  %copy.7 = f32[16]{0} copy(%state_opt_state)\n}")
  names = profile_step.hlo_op_names(hlo)
  assert names["conv.1"][0] == "convolution" and names["copy.7"] == ("copy", "")
  assert profile_step.classify(*names["conv.1"], "conv.1") == "forward: encoder / conv"
  assert profile_step.classify(*names["copy.7"], "copy.7").startswith("other: copies")
  backward = "jit(train_step)/transpose(jvp(SparseNet))/SparseNet.reconstruct/decoder/deconv_2/conv_general_dilated"
  assert profile_step.classify("fusion", backward, "ynn_fusion.3") == "backward: decoder / transposed conv"
  bn = "jit(train_step)/jvp(SparseNet)/SparseNet.reconstruct/encoder/residual_1/bn1/reduce_sum"
  assert profile_step.classify("fusion", bn, "fusion.9") == "forward: encoder / batch norm"
  dense = "jit(train_step)/transpose(jvp(DenseNet))/DenseNet/level_2/local/dgcnn1/conv/dot_general"
  assert profile_step.classify("fusion", dense, "fusion.4") == "backward: level_2 / matmul (Dense, 1x1 conv)"
  peak, note = profile_step.cpu_peak()
  assert peak > 0 and "GFLOP/s" in note
