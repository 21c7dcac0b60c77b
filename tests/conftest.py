"""Test session setup: 8 fake CPU devices for the sharding tests (must run before jax is imported)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
