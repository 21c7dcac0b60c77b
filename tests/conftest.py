"""Test session setup: 8 fake CPU devices for the sharding tests (must run before jax is imported), and the
rules that let the whole suite pass on a machine with a GPU.

On a GPU machine JAX's default device is the GPU, so every test runs there unless it says otherwise. Two
kinds of tests need the CPU instead:

* ``@pytest.mark.cpu`` (or ``pytestmark`` in a module): the test checks the CPU handlers' own semantics
  (INVALID_ARGUMENT for out-of-range indices, EMD tolerances calibrated on the CPU). It runs with the CPU as
  the default device; tests/test_cuda.py checks the GPU's documented behaviour for the same inputs.
* the tests in CPU_MESH_TESTS build meshes of the 8 fake CPU devices (one GPU cannot form them). On a GPU
  machine they run with ``jax.devices()``, ``jax.device_count()``, ``jax.local_devices()`` and
  ``jax.make_mesh`` answering for the CPU backend, the CPU as default device and ``JAX_PLATFORMS=cpu`` for
  the processes they start. On a CPU-only machine nothing changes.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

# Node-id prefixes of the tests that need the 8 fake CPU devices.
CPU_MESH_TESTS = (
    "tests/test_train.py::test_sharded_step_matches_single_device",
    "tests/test_jax_transforms.py::test_shard_map_",
    "tests/test_jax_transforms.py::test_plain_jit_on_sharded_inputs_runs_per_shard",
    "tests/test_ops_ragged.py::test_shard_map_",
    "tests/test_multihost.py::",
)


def pytest_configure(config):
  config.addinivalue_line("markers", "cpu: run with the CPU as JAX's default device (CPU-handler semantics)")
  config.addinivalue_line("markers", "cpu_mesh: needs the 8 fake CPU devices (set for CPU_MESH_TESTS)")


def _on_accelerator() -> bool:
  return jax.default_backend() != "cpu"


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.nodeid.startswith(CPU_MESH_TESTS):
      item.add_marker("cpu_mesh")


@pytest.fixture(autouse=True)
def _cpu_when_required(request, monkeypatch):
  marks = {m.name for m in request.node.iter_markers()}
  if not ({"cpu", "cpu_mesh"} & marks) or not _on_accelerator():
    yield
    return
  cpu_devices = jax.devices("cpu")
  if "cpu_mesh" in marks:
    devices, make_mesh = jax.devices, jax.make_mesh
    monkeypatch.setattr(jax, "devices", lambda backend=None: devices(backend or "cpu"))
    monkeypatch.setattr(jax, "local_devices", lambda process_index=None, backend=None: [
        d for d in devices(backend or "cpu") if process_index is None or d.process_index == process_index])
    monkeypatch.setattr(jax, "device_count", lambda backend=None: len(devices(backend or "cpu")))
    monkeypatch.setattr(jax, "make_mesh", lambda *a, devices=None, **k: make_mesh(
        *a, devices=cpu_devices if devices is None else devices, **k))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with jax.default_device(cpu_devices[0]):
    yield
