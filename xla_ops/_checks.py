"""Trace-time argument validation shared by every op (errors name the argument and what was expected), and
the dtype policy.

Dtypes: point sets, features and weights may be float32, float16 or bfloat16. Every op computes in float32
(half inputs are cast up inside); its floating outputs come back in the promoted input dtype
(``jnp.result_type`` of its floating operands, e.g. bfloat16 for bfloat16 inputs, float32 for a bfloat16 /
float16 mix), indices stay int32, and the gradient w.r.t. each input has that input's dtype. float64 is
rejected with an error (the kernels are float32; a silent downcast would hide the precision loss).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("ffi", "jnp")
FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def check_float_dtype(x, name: str) -> None:
  """Raises unless ``x`` is float32, float16 or bfloat16 (float64 gets an explicit cast hint)."""
  dtype = getattr(x, "dtype", None)
  if dtype is None:
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  if jnp.dtype(dtype) in FLOAT_DTYPES:
    return
  hint = " (the ops compute in float32: cast with .astype(jnp.float32))" if dtype == jnp.float64 else ""
  raise ValueError(f"{name} must be float32, float16 or bfloat16, got {dtype}{hint}")


def to_f32(*xs):
  """Casts floating arrays to float32 (no-op for float32) for the kernels."""
  return tuple(jnp.asarray(x).astype(jnp.float32) for x in xs)


def out_dtype(*xs):
  """The dtype of an op's floating outputs: the promoted dtype of its floating inputs."""
  return jnp.result_type(*(x.dtype for x in xs))


def check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_points(x, name: str, *, channels: int | None = 3, min_points: int = 1) -> None:
  """Checks that ``x`` is a float32/float16/bfloat16 array ``[..., N, C]`` with ``C == channels`` (any C if None)."""
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")
  want = f"[..., N, {channels if channels is not None else 'C'}]"
  if len(shape) < 2:
    raise ValueError(f"{name} must have shape {want}, got shape {tuple(shape)}")
  check_float_dtype(x, name)
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


def check_lengths(lengths, name: str, batch: tuple, num_points: int):
  """Per-example point counts: None, or an int32 array with the batch shape. Returns the valid-point mask
  ``[..., num_points]`` (``arange(num_points) < lengths``; values outside [0, num_points] act clipped), or None."""
  if lengths is None:
    return None
  check_per_example_int32(lengths, name, batch)
  return jnp.arange(num_points, dtype=jnp.int32) < jnp.asarray(lengths)[..., None]


def check_per_example_int32(x, name: str, batch: tuple) -> None:
  """Raises unless ``x`` is an int32 array with the batch shape (one value per example: lengths, start)."""
  if getattr(x, "dtype", None) != jnp.int32 or tuple(x.shape) != tuple(batch):
    raise ValueError(f"{name} must be int32 with the batch shape {tuple(batch)}, got "
                     f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")


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
