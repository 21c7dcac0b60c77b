"""Evaluating a trained run with the paper's protocol: predictions and baselines over a split, per-category
tables and reports. The pieces: dpcr_jax/metrics.py (protocol metrics and extras), baselines.py (training-set
medoids), reports.py (aggregation, CSV and markdown).

Rows of the report: 'model'; 'sparse_x16', the model's own sparse (stage-1) points each repeated
n_dense / n_sparse times (the gap to the model row is what the dense stage adds); 'medoid' and
'oracle_medoid' (baselines.py). All at the dense point count; the mean row is the unweighted mean of the
category means.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dpcr_jax.baselines import MedoidBaselines
from dpcr_jax.metrics import cloud_metrics, emd_approximation_error, protocol_emd
from dpcr_jax.reports import aggregate, write_reports


def _padded_batches(batches: Iterable[dict], batch_size: int) -> Iterator[tuple[dict, int]]:
  """Pads a short final batch to ``batch_size`` (repeating its last example) so that shapes stay fixed;
  yields (batch, number of real examples)."""
  for batch in batches:
    n = len(batch["category"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in batch.items()}
    yield batch, n


class NonFiniteOutputError(ValueError):
  """A prediction or a metric of the evaluation is NaN or Inf (it would otherwise vanish from the means)."""


def _check_finite_predictions(methods: dict, n: int, offset: int, model_ids=None) -> None:
  """Raises NonFiniteOutputError naming the method and the examples whose predicted cloud is not finite."""
  for name, pred in methods.items():
    bad = np.flatnonzero(~np.isfinite(np.asarray(pred[:n])).all(axis=(1, 2)))
    if len(bad):
      which = [f"{offset + i}" + (f" ({model_ids[i]})" if model_ids is not None else "") for i in bad[:5]]
      raise NonFiniteOutputError(f"{name}: non-finite predicted points for {len(bad)} example(s) of this batch, "
                                 f"e.g. example {', '.join(which)}; refusing to average around them (a run "
                                 "with non-finite parameters, or a diverged model)")


def _check_finite_metrics(name: str, values: dict, emd_rows: np.ndarray, offset: int) -> None:
  """Raises NonFiniteOutputError when a computed metric value (EMD: rows ``emd_rows`` only) is not finite."""
  for metric, v in values.items():
    computed = np.zeros(len(v), bool)
    computed[emd_rows if metric == "emd" else slice(None)] = True
    bad = np.flatnonzero(computed & ~np.isfinite(v))
    if len(bad):
      raise NonFiniteOutputError(f"{name}: non-finite {metric} for {len(bad)} example(s), e.g. example "
                                 f"{offset + int(bad[0])}")


def evaluate_predictions(predict_fn, batches: Iterable[dict], batch_size: int, category_names: list[str],
                         baselines: MedoidBaselines | None = None, emd_examples_per_category: int = -1,
                         exact_emd_clouds: int = 0, impl: str = "ffi", max_batches: int = -1) -> dict:
  """Scores a model (and the baselines) on ``batches`` with the protocol.

  Args:
    predict_fn: numpy batch -> {'dense': [B,N,3], optionally 'sparse': [B,P,3]} (host or device arrays).
    batches: numpy batches with 'points_dense', 'category' (and 'view' for the medoids).
    emd_examples_per_category: approximate EMD only for the first k examples of each category (-1: all);
      EMD at the dense point count is the slow part of the protocol on a CPU.
    exact_emd_clouds: how many (model prediction, GT) pairs also get exact-vs-approximate EMD on subsets.
  Returns:
    {'tables': {method: aggregate()}, 'emd_check': dict or None, 'examples': {...} a few examples for
    pictures}.
  """
  per_method: dict[str, dict[str, list]] = {}
  categories, emd_count = [], {}
  kept_pred, kept_gt, examples = [], [], None
  for b, (batch, n) in enumerate(_padded_batches(batches, batch_size)):
    if 0 <= max_batches <= b:
      break
    outputs = jax.device_get(predict_fn(batch))
    gt = batch["points_dense"]
    methods = {"model": outputs["dense"]}
    if "sparse" in outputs:
      reps = gt.shape[1] // outputs["sparse"].shape[1]
      methods["sparse_x16" if reps == 16 else f"sparse_x{reps}"] = np.repeat(outputs["sparse"], reps, axis=1)
    if baselines is not None:
      methods.update(baselines.predict(batch["category"], batch.get("view", np.zeros(batch_size, np.int32))))
    cats = np.asarray(batch["category"][:n])
    want_emd = np.zeros(n, bool)
    for i, c in enumerate(cats):
      emd_count[int(c)] = emd_count.get(int(c), 0) + 1
      want_emd[i] = emd_examples_per_category < 0 or emd_count[int(c)] <= emd_examples_per_category
    emd_rows = np.flatnonzero(want_emd)  # EMD is the slow metric: only for the examples that want it
    _check_finite_predictions(methods, n, b * batch_size, batch.get("model_id"))
    for name, pred in methods.items():
      values = jax.device_get(cloud_metrics(jnp.asarray(pred), jnp.asarray(gt), with_emd=False, impl=impl))
      values = {k: np.asarray(v[:n], np.float64) for k, v in values.items()}
      values["emd"] = np.full(n, np.nan)  # NaN = not computed for that example (aggregate() counts them)
      if len(emd_rows):
        values["emd"][emd_rows] = np.asarray(protocol_emd(jnp.asarray(pred[emd_rows]), jnp.asarray(gt[emd_rows]),
                                                          impl=impl))
      _check_finite_metrics(name, values, emd_rows, b * batch_size)
      for k, v in values.items():
        per_method.setdefault(name, {}).setdefault(k, []).append(v)
    categories.append(cats)
    if sum(len(p) for p in kept_pred) < exact_emd_clouds:
      kept_pred.append(np.asarray(outputs["dense"][:n]))
      kept_gt.append(np.asarray(gt[:n]))
    if examples is None:
      examples = {"image": batch.get("image"), "gt": gt, "category": batch["category"], **outputs}
  if not categories:
    raise ValueError("no evaluation batches")
  categories = np.concatenate(categories)
  tables = {name: aggregate({k: np.concatenate(v) for k, v in metrics.items()}, categories, category_names)
            for name, metrics in per_method.items()}
  emd_check = None
  if exact_emd_clouds > 0:
    emd_check = emd_approximation_error(np.concatenate(kept_pred)[:exact_emd_clouds],
                                        np.concatenate(kept_gt)[:exact_emd_clouds], impl=impl)
  logging.info("Evaluated %d examples", len(categories))
  return {"tables": tables, "emd_check": emd_check, "examples": examples}


def evaluate_run(checkpoint: str, output_prefix: str, split: str = "test", data_root: str | None = None,
                 baselines: bool = True, emd_examples_per_category: int = -1, exact_emd_clouds: int = 16,
                 max_batches: int = -1, medoid_max_per_group: int = 32, predictor=None) -> dict:
  """Evaluates a finetune (or sparse) run on ``split`` of its data and writes ``<output_prefix>.{csv,md}``.

  Args:
    checkpoint: the run's workdir.
    data_root: overrides the run's config.data.root.
    baselines: also score the medoid baselines (built from the training split).
    predictor: a ``predict.Predictor`` of this run to reuse (its forward pass is already compiled).
  Returns:
    evaluate_predictions()'s result plus 'paths' (csv, md).
  """
  from dpcr_jax import predict  # pylint: disable=g-import-not-at-top
  from dpcr_jax.data import CATEGORIES, make_iterator  # pylint: disable=g-import-not-at-top
  predictor = predictor or predict.Predictor(checkpoint)
  config = predictor.config
  if data_root:
    config.data.root = data_root
  impl = config.ops_impl
  batch_size = config.eval_batch_size

  def predict_fn(batch):
    outputs = predictor(batch["image"])
    if "dense" not in outputs:  # a sparse-stage run: its points, repeated to the dense count
      reps = batch["points_dense"].shape[1] // outputs["sparse"].shape[1]
      outputs = {"dense": np.repeat(outputs["sparse"], reps, axis=1)}
    return outputs

  medoids = None
  if baselines:
    medoids = MedoidBaselines(make_iterator(config.data, "train", batch_size, seed=config.seed, shuffle=True,
                                            num_epochs=1, drop_remainder=False),
                              max_per_group=medoid_max_per_group, impl=impl)
  batches = make_iterator(config.data, split, batch_size, seed=0, shuffle=False, num_epochs=1,
                          drop_remainder=False)
  names = [name for _, name in CATEGORIES]
  result = evaluate_predictions(predict_fn, batches, batch_size, names, medoids, emd_examples_per_category,
                                exact_emd_clouds, impl=impl, max_batches=max_batches)
  n_dense = config.data.n_dense
  notes = [f"run {os.path.abspath(checkpoint)}, split '{split}' of {config.data.source} at {config.data.root}, "
           f"{n_dense} points per cloud (the paper evaluates at 16384; CD/EMD values depend on the count).",
           "Protocol (docs/original.md): each cloud normalised to the unit cube on its own; mean row = unweighted mean "
           "of the category means. [extra] columns are not in the paper."]
  if emd_examples_per_category >= 0:
    notes.append(f"EMD computed on the first {emd_examples_per_category} examples of each category only.")
  if medoids is not None:
    notes.append(f"medoid / oracle_medoid: training-set medoids per view / per (category, view), from "
                 f"{medoids.num_clouds} training clouds; they ignore the image.")
  if result["emd_check"]:
    c = result["emd_check"]
    notes.append(f"EMD approximation check on {c['num_clouds']} model predictions, random {c['num_points']}-point "
                 f"subsets: exact (Hungarian) {c['exact_mean']:.4f}, approx-match {c['approx_mean']:.4f}, mean "
                 f"relative error {100 * c['mean_relative_error']:.2f}%.")
  result["paths"] = write_reports(result["tables"], output_prefix, notes)
  return result
