"""xla_ops stands alone: a wheel of ./xla_ops alone, in a fresh venv without flax or dpcr_jax, passes the
xla_ops tests.

Slow (about 2 minutes: the C++ build ~45 s, the venv from pip's cache ~15 s, the tests ~80 s). Needs a C++
compiler; pip fetches the build requirements (scikit-build-core, pybind11, jaxlib, cmake when missing) and
jax/numpy/pytest from its cache or PyPI. The CUDA extension is not built here (XLA_OPS_CUDA=OFF).
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
# The tests of the xla_ops API: they import xla_ops, jax, numpy and pytest only.
XLA_OPS_TESTS = sorted(
    str(p) for p in TESTS.glob("test_*.py")
    if p.name.split(".")[0] in {"test_sampling", "test_chamfer", "test_grouping", "test_interpolation", "test_emd",
                                "test_jax_transforms"} or p.name.startswith("test_ops_"))


def _run(cmd, **kwargs):
  proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
  assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-6000:]}"
  return proc.stdout


@pytest.mark.slow
def test_xla_ops_wheel_alone_passes_its_tests(tmp_path):
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
  if not compiler:
    pytest.skip("no C++ compiler (c++/g++/clang++ or $CXX): cannot build the xla_ops extension")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env["XLA_OPS_CUDA"] = "OFF"
  env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

  wheels = tmp_path / "wheels"
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT / "xla_ops"), "-w", str(wheels),
        f"--config-settings=build-dir={tmp_path / 'build'}"], env=env, cwd=tmp_path)
  (wheel,) = wheels.glob("xla_ops-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert any(n.startswith("xla_ops/_xla_ops_cpu") for n in names), names
  assert not any(n.startswith(("dpcr_jax/", "xla_ops/csrc/")) for n in names), names

  venv = tmp_path / "venv"
  _run([sys.executable, "-m", "venv", str(venv)], env=env)
  python = str(venv / "bin" / "python")
  _run([python, "-m", "pip", "install", "-q", f"{wheel}[test]"], env=env, cwd=tmp_path)

  probe = ("import importlib.util, xla_ops; print(xla_ops.__file__); "
           "print([m for m in ('flax', 'dpcr_jax', 'optax', 'grain') if importlib.util.find_spec(m)])")
  where, missing = _run([python, "-c", probe], env=env, cwd=tmp_path).strip().splitlines()[-2:]
  assert where.startswith(str(venv)), where  # the installed wheel, not the checkout
  assert missing == "[]", f"the fresh venv has dpcr-jax dependencies: {missing}"

  # From tmp_path, so that the checkout is not on sys.path (tests/ has no __init__.py: pytest adds tests/ only).
  # The thread-count test (two subprocesses) is left to the main suite: it checks the same .so, not packaging.
  out = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not thread_count", *XLA_OPS_TESTS],
             env=env, cwd=tmp_path)
  assert " passed" in out and " failed" not in out, out[-3000:]
