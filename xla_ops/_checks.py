"""Trace-time argument validation shared by every op (errors name the argument and what was expected)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("ffi", "jnp")


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_points(x, name: str, *, channels: int | None = 3, min_points: int = 1) -> None:
  """Checks that ``x`` is a float32 array ``[..., N, C]`` with ``C == channels`` (any C if None)."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  want = f"[..., N, {channels if channels is not None else 'C'}]"
  if len(shape) < 2:
    raise ValueError(f"{name} must have shape {want}, got shape {tuple(shape)}")
  if dtype != jnp.float32:
    raise ValueError(f"{name} must be float32, got {dtype}")
  if channels is not None and shape[-1] != channels:
    raise ValueError(f"{name} must have shape {want}, got shape {tuple(shape)}")
  if shape[-1] < 1:
    raise ValueError(f"{name} must have at least one channel, got shape {tuple(shape)}")
  if shape[-2] < min_points:
    raise ValueError(f"{name} must have at least {min_points} point(s), got shape {tuple(shape)}")


def check_indices(idx, name: str, *, ndim_min: int = 1) -> None:
  shape = getattr(idx, "shape", None)
  if shape is None or len(shape) < ndim_min:
    raise ValueError(f"{name} must be an int32 array of rank >= {ndim_min}, got {getattr(idx, 'shape', type(idx))}")
  if idx.dtype != jnp.int32:
    raise ValueError(f"{name} must be int32, got {idx.dtype}")


def check_same_batch(name_a: str, batch_a: tuple, name_b: str, batch_b: tuple) -> None:
  if tuple(batch_a) != tuple(batch_b):
    raise ValueError(f"{name_a} and {name_b} must have the same batch shape, got {tuple(batch_a)} and {tuple(batch_b)}")


def check_positive_int(value, name: str, *, upper: int | None = None, upper_name: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, int) or isinstance(value, jax.Array):
    raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
  if value < 1:
    raise ValueError(f"{name} must be >= 1, got {value}")
  if upper is not None and value > upper:
    raise ValueError(f"{name} must be <= {upper_name} ({upper}), got {value}")
  return value
