"""The non-finite guard of the training step: a NaN or Inf loss or gradient never reaches the saved state.

Inside the jitted step (``step_health`` + ``keep_if_finite``): the squared norms of the gradient leaves,
which the step needs anyway for ``grad_norm``, double as the finiteness check (NaN and Inf survive the sum
of squares), so the check adds no pass over the gradients and no host sync. When the loss or a gradient is
non-finite, the step keeps the previous params, batch statistics and optimizer state (a select that XLA
fuses into the update) and only advances the step counter.

On the host (``NonFiniteGuard``): the step's ``finite`` flag is read one step late, once the next step is
queued, so the device never waits for the host. Policies (``config.nonfinite_policy``):
  - 'stop' (default): the first non-finite step raises NonFiniteError naming the step, the loss terms and the
    first non-finite gradient; the loop saves nothing after it, so the newest checkpoint is the last good one;
  - 'skip': the step's update is dropped (as above), the step is logged and counted (``skipped_steps`` in
    the metrics), and training goes on; a whole logging period of skipped steps still stops the run.
"""
from __future__ import annotations

from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dpcr_jax.errors import RunError

POLICIES = ("stop", "skip")
FINITE = "finite"  # metrics key of the step's flag (bool [])
FIRST_BAD_GRAD = "first_nonfinite_grad"  # metrics key: index of the first non-finite gradient leaf, or -1
HEALTH_KEYS = (FINITE, FIRST_BAD_GRAD)


class NonFiniteError(RunError):
  """A training step produced a non-finite loss or gradient (policy 'stop')."""


def step_health(loss: jax.Array, grads: Any) -> tuple[jax.Array, dict]:
  """(grad_norm [], health {FINITE: bool [], FIRST_BAD_GRAD: int32 []}) of one step; jit-side."""
  squares = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)])
  bad = ~jnp.isfinite(squares)  # a NaN/Inf gradient entry (or a square overflowing float32) makes its sum non-finite
  first_bad = jnp.where(jnp.any(bad), jnp.argmax(bad), -1).astype(jnp.int32)
  finite = jnp.isfinite(loss) & (first_bad < 0)
  return jnp.sqrt(jnp.sum(squares)), {FINITE: finite, FIRST_BAD_GRAD: first_bad}


def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite`` else ``old``, leaf by leaf (same structures); jit-side."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


class NonFiniteGuard:
  """Reads the steps' ``finite`` flags one step late and applies the policy (module doc).

  Args:
    policy: 'stop' or 'skip'.
    grad_names: names of the gradient leaves (``checkpointing.leaf_names(params)``), for the messages.
  """

  def __init__(self, policy: str, grad_names: list[str]):
    if policy not in POLICIES:
      raise ValueError(f"config.nonfinite_policy must be one of {POLICIES}, got {policy!r}")
    self.policy, self.grad_names = policy, grad_names
    self.skipped: set[int] = set()
    self._queue: list[tuple[int, dict]] = []

  def observe(self, step: int, metrics: dict) -> dict:
    """Queues step ``step``'s metrics, checks the ones before it; returns the metrics without the flags."""
    self._queue.append((step, metrics))
    while len(self._queue) > 1:
      self._check(*self._queue.pop(0))
    return {k: v for k, v in metrics.items() if k not in HEALTH_KEYS}

  def flush(self) -> None:
    """Checks every queued step (call before saving, logging or returning)."""
    while self._queue:
      self._check(*self._queue.pop(0))

  def describe(self, step: int, metrics: dict) -> str:
    host = jax.device_get(metrics)
    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(host.items())
                      if k not in HEALTH_KEYS and np.ndim(v) == 0)
    nonfinite = [k for k, v in sorted(host.items())
                 if k not in HEALTH_KEYS + ("grad_norm",) and not np.isfinite(v).all()]
    first = int(host[FIRST_BAD_GRAD])
    grad = (f"; first non-finite gradient: {self.grad_names[first] if first < len(self.grad_names) else first}"
            if first >= 0 else "; gradients finite")
    return f"step {step}: non-finite {', '.join(nonfinite) or 'values'} ({terms}){grad}"

  def _check(self, step: int, metrics: dict) -> None:
    if bool(metrics[FINITE]):
      return
    message = self.describe(step, metrics)
    if self.policy == "stop":
      raise NonFiniteError(
          f"Training stopped at {message}. The update was not applied and nothing was saved after it (the "
          "checkpoints already written hold finite, verified state). Lower config.learning_rate or check the data for "
          "NaN/Inf; config.nonfinite_policy='skip' drops such steps instead.")
    self.skipped.add(step)
    logging.warning("Skipped %s (config.nonfinite_policy='skip'; %d skipped so far)", message, len(self.skipped))

  def was_skipped(self, step: int) -> bool:
    return step in self.skipped

  def check_period(self, first_step: int, last_step: int) -> None:
    """In 'skip' mode, stops the run when every step of (first_step, last_step] was skipped."""
    period = range(first_step + 1, last_step + 1)
    if period and all(s in self.skipped for s in period):
      raise NonFiniteError(f"every step from {period.start} to {period.stop - 1} was non-finite and skipped "
                           f"({len(self.skipped)} skipped in total); the run is not learning. Lower "
                           "config.learning_rate or check the data.")
