"""The paper's evaluation protocol (spec §7) plus clearly labelled extras and baselines.

Protocol (original test.py): every cloud, prediction and ground truth alike, is normalised to the unit cube on
its own (bbox centre to the origin, longest bbox side = 1); then, at the dense point count,
  - CD  = (mean_gt d(gt->pred) + mean_pred d(pred->gt)) x 1000, with SQUARED nearest-neighbour distances;
  - EMD = match_cost(gt, pred, approx_match(gt, pred)) / 1000, the SUM of matched Euclidean distances (not
    divided by the point count, so it scales with it);
each averaged per category, and the reported mean is the unweighted mean of the category means.
Extras (not in the paper, labelled as such): 'cd_l1' = the same with Euclidean (non-squared) distances x 100;
'fscore' = F-score at threshold 0.01 (1% of the unit cube side) in percent; exact EMD on small random subsets
of the clouds (scipy's linear_sum_assignment) next to the approximate EMD of the same subsets, to show the
approximation's error.

Baselines (all at the dense point count, scored with the same protocol):
  - 'medoid': image-blind; for each view, the training cloud with the lowest mean CD to all training clouds
    of that view (clouds are in the camera frame, so the view matters);
  - 'oracle_medoid': the same per (category, view): knows the category, ignores the image;
  - 'sparse_x16': the model's own sparse (stage-1) points, each repeated n_dense / n_sparse times; the gap to
    the model row is what the dense stage adds.
"""
from __future__ import annotations

import csv
import functools
import os
from typing import Iterable, Iterator

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from dpcr_jax import baseline_cache
from xla_ops.chamfer import chamfer_distance, nn_distance
from xla_ops.emd import earth_mover_distance

FSCORE_THRESHOLD = 0.01
METRICS = {  # name -> (column label, lower is better)
    "cd": ("CD x1000 (squared)", True),
    "emd": ("EMD /1000 (approx. match, sum)", True),
    "cd_l1": ("CD-L1 x100 (Euclidean) [extra]", True),
    "fscore": ("F-score@1% (%) [extra]", False),
}


def normalize_unit_cube(points: jax.Array) -> jax.Array:
  """[..., N, 3] -> each cloud centred on its bbox centre and divided by its longest bbox side."""
  lo, hi = jnp.min(points, axis=-2, keepdims=True), jnp.max(points, axis=-2, keepdims=True)
  side = jnp.max(hi - lo, axis=-1, keepdims=True)
  return (points - (lo + hi) / 2) / jnp.maximum(side, 1e-12)


@functools.partial(jax.jit, static_argnames=("with_emd", "impl"))
def cloud_metrics(pred: jax.Array, gt: jax.Array, with_emd: bool = True, impl: str = "ffi") -> dict:
  """Per-example protocol metrics of pred [B,N,3] vs gt [B,M,3] -> dict of [B] arrays (see module doc)."""
  d_gt, _, d_pred, _ = nn_distance(normalize_unit_cube(gt), normalize_unit_cube(pred), impl=impl)
  out = {"cd": (jnp.mean(d_gt, -1) + jnp.mean(d_pred, -1)) * 1000.0}
  e_gt, e_pred = jnp.sqrt(d_gt), jnp.sqrt(d_pred)
  out["cd_l1"] = (jnp.mean(e_gt, -1) + jnp.mean(e_pred, -1)) * 100.0
  precision = jnp.mean(e_pred < FSCORE_THRESHOLD, -1)
  recall = jnp.mean(e_gt < FSCORE_THRESHOLD, -1)
  out["fscore"] = 100.0 * jnp.where(precision + recall > 0, 2 * precision * recall
                                    / jnp.maximum(precision + recall, 1e-12), 0.0)
  if with_emd:
    out["emd"] = protocol_emd(pred, gt, impl=impl)
  return out


@functools.partial(jax.jit, static_argnames="impl")
def protocol_emd(pred: jax.Array, gt: jax.Array, impl: str = "ffi") -> jax.Array:
  """The protocol's EMD of pred [B,N,3] vs gt [B,N,3] -> [B]: approximate-match cost of the unit-cube
  normalised clouds (sum over points) / 1000."""
  return earth_mover_distance(normalize_unit_cube(gt), normalize_unit_cube(pred), impl=impl) / 1000.0


def exact_emd(a: np.ndarray, b: np.ndarray) -> float:
  """Exact EMD (sum of matched Euclidean distances, one-to-one) of two clouds [N,3] with the same N."""
  cost = np.sqrt(((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1))
  rows, cols = linear_sum_assignment(cost)
  return float(cost[rows, cols].sum())


def emd_approximation_error(preds: np.ndarray, gts: np.ndarray, num_points: int = 256, seed: int = 0,
                            impl: str = "ffi") -> dict:
  """Approximate vs exact EMD on random ``num_points`` subsets of normalised clouds [K,N,3] / [K,M,3].

  Returns {'num_clouds', 'num_points', 'exact_mean', 'approx_mean', 'mean_relative_error'} where the relative
  error is mean((approx - exact) / exact) (approx >= exact up to rounding: it is a feasible transport).
  """
  rng = np.random.default_rng(seed)
  num_points = min(num_points, preds.shape[1], gts.shape[1])
  preds = np.asarray(normalize_unit_cube(jnp.asarray(preds)))
  gts = np.asarray(normalize_unit_cube(jnp.asarray(gts)))
  sub_p = np.stack([p[rng.choice(len(p), num_points, replace=False)] for p in preds])
  sub_g = np.stack([g[rng.choice(len(g), num_points, replace=False)] for g in gts])
  approx = np.asarray(earth_mover_distance(jnp.asarray(sub_g), jnp.asarray(sub_p), impl=impl), np.float64)
  exact = np.array([exact_emd(g, p) for g, p in zip(sub_g, sub_p)])
  return {"num_clouds": len(preds), "num_points": num_points, "exact_mean": float(exact.mean()),
          "approx_mean": float(approx.mean()),
          "mean_relative_error": float(np.mean((approx - exact) / np.maximum(exact, 1e-12)))}


# ----------------------------------------------------------------------------------------------------------
# Aggregation and reports.


def aggregate(records: dict[str, np.ndarray], categories: np.ndarray, names: list[str]) -> dict[str, dict]:
  """Per-category means of per-example metrics and their unweighted mean over the categories present.

  Args:
    records: metric -> [K] per-example values (NaN = not computed for that example).
    categories: [K] int category index; names: index -> category name.
  Returns:
    {category name: {metric: mean, 'count': n}, ..., 'mean': {metric: mean of category means}}.
  """
  table = {}
  for c in sorted(set(int(c) for c in categories)):
    sel = categories == c
    row = {"count": int(sel.sum())}
    for metric, values in records.items():
      vals = values[sel][~np.isnan(values[sel])]
      row[metric] = float(vals.mean()) if len(vals) else float("nan")
    table[names[c] if 0 <= c < len(names) else "other"] = row  # PSGN labels models outside the 13 as -1
  table["mean"] = {"count": int(len(categories))}
  for metric in records:
    vals = [row[metric] for row in table.values() if metric in row and not np.isnan(row[metric])]
    table["mean"][metric] = float(np.mean(vals)) if vals else float("nan")
  return table


def write_reports(tables: dict[str, dict], path_prefix: str, notes: Iterable[str] = ()) -> tuple[str, str]:
  """Writes ``<prefix>.csv`` (method, category, count, metrics...) and ``<prefix>.md`` (one table per metric,
  methods as columns). ``tables``: method -> aggregate() output. Returns the two paths."""
  methods = list(tables)
  categories = [c for c in next(iter(tables.values())) if c != "mean"] + ["mean"]
  metrics = [m for m in METRICS if any(m in row for t in tables.values() for row in t.values())]
  os.makedirs(os.path.dirname(os.path.abspath(path_prefix)), exist_ok=True)
  csv_path, md_path = path_prefix + ".csv", path_prefix + ".md"
  with open(csv_path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["method", "category", "count", *metrics])
    for method in methods:
      for cat in categories:
        row = tables[method].get(cat, {})
        writer.writerow([method, cat, row.get("count", 0), *[f"{row.get(m, float('nan')):.6g}" for m in metrics]])
  lines = []
  for metric in metrics:
    label, lower = METRICS[metric]
    lines += [f"### {label}, {'lower' if lower else 'higher'} is better", "",
              "| category | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for cat in categories:
      values = [tables[m].get(cat, {}).get(metric, float("nan")) for m in methods]
      finite = [v for v in values if not np.isnan(v)]
      best = (min(finite) if lower else max(finite)) if finite else None
      cells = [("**%.3f**" if v == best else "%.3f") % v if not np.isnan(v) else "n/a" for v in values]
      name = f"**{cat}**" if cat == "mean" else cat
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += [f"- {n}" for n in notes]
  with open(md_path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return csv_path, md_path


# ----------------------------------------------------------------------------------------------------------
# Baselines.


@functools.partial(jax.jit, static_argnames="impl")
def _per_pair_cd(a: jax.Array, b: jax.Array, impl: str) -> jax.Array:
  """[K,P,3] x [K,P,3] -> [K] CD; module level so that every medoid search reuses one compiled program."""
  return chamfer_distance(a, b, reduction="none", impl=impl)


def _pairwise_cd(clouds: jax.Array, impl: str, chunk: int = 256) -> np.ndarray:
  """[K,P,3] normalised clouds -> [K,K] symmetric CD matrix."""
  k = clouds.shape[0]
  ii, jj = np.triu_indices(k, 1)
  fn = functools.partial(_per_pair_cd, impl=impl)
  values = np.zeros(len(ii), np.float32)
  for s in range(0, len(ii), chunk):
    a, b = ii[s:s + chunk], jj[s:s + chunk]
    pad = chunk - len(a)
    a_p, b_p = np.pad(a, (0, pad)), np.pad(b, (0, pad))  # fixed shapes: one compile
    values[s:s + len(a)] = np.asarray(fn(clouds[a_p], clouds[b_p]))[:len(a)]
  matrix = np.zeros((k, k), np.float32)
  matrix[ii, jj] = values
  return matrix + matrix.T


def medoid_index(clouds: np.ndarray, num_points: int = 512, impl: str = "ffi", seed: int = 0) -> int:
  """Index of the cloud [K,N,3] with the lowest mean CD (normalised, on ``num_points`` random points) to
  the others."""
  if len(clouds) == 1:
    return 0
  rng = np.random.default_rng(seed)
  sub = rng.choice(clouds.shape[1], min(num_points, clouds.shape[1]), replace=False)
  normed = normalize_unit_cube(jnp.asarray(clouds[:, sub]))
  return int(np.argmin(_pairwise_cd(normed, impl).mean(axis=1)))


class MedoidBaselines:
  """Training-set medoids per view ('medoid') and per (category, view) ('oracle_medoid').

  Built from up to ``max_per_group`` training clouds per (category, view), read from a training iterator.
  """

  def __init__(self, train_batches: Iterator[dict], max_per_group: int = 32, max_examples: int = 5000,
               num_points: int = 512, impl: str = "ffi"):
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    seen = 0
    for batch in train_batches:
      views = batch.get("view", np.zeros(len(batch["category"]), np.int32))
      for cloud, cat, view in zip(batch["points_dense"], batch["category"], views):
        bucket = groups.setdefault((int(cat), int(view)), [])
        if len(bucket) < max_per_group:
          bucket.append(np.asarray(cloud))
      seen += len(batch["category"])
      if seen >= max_examples:
        break
    if not groups:
      raise ValueError("no training clouds to build the medoid baselines from")
    self.oracle = {key: clouds[medoid_index(np.stack(clouds), num_points, impl)]
                   for key, clouds in groups.items()}
    by_view: dict[int, list[np.ndarray]] = {}
    for (_, view), clouds in groups.items():
      by_view.setdefault(view, []).extend(clouds)
    self.blind = {view: clouds[medoid_index(np.stack(clouds), num_points, impl)]
                  for view, clouds in by_view.items()}
    self.num_clouds = sum(len(c) for c in groups.values())

  @classmethod
  def from_medoids(cls, blind: dict, oracle: dict, num_clouds: int) -> "MedoidBaselines":
    """Rebuilds the baselines from stored medoids (view -> [N,3], (category, view) -> [N,3]; baseline_cache)."""
    self = cls.__new__(cls)
    self.blind, self.oracle, self.num_clouds = dict(blind), dict(oracle), int(num_clouds)
    return self

  def predict(self, categories: np.ndarray, views: np.ndarray) -> dict[str, np.ndarray]:
    """[B] category and view -> {'medoid': [B,N,3], 'oracle_medoid': [B,N,3]}."""
    blind = np.stack([self.blind.get(int(v), next(iter(self.blind.values()))) for v in views])
    oracle = np.stack([self.oracle.get((int(c), int(v)), self.blind.get(int(v), blind[0]))
                       for c, v in zip(categories, views)])
    return {"medoid": blind, "oracle_medoid": oracle}


# ----------------------------------------------------------------------------------------------------------
# Evaluating a model.


def _padded_batches(batches: Iterable[dict], batch_size: int) -> Iterator[tuple[dict, int]]:
  """Pads a short final batch to ``batch_size`` (repeating its last example) so that shapes stay fixed;
  yields (batch, number of real examples)."""
  for batch in batches:
    n = len(batch["category"])
    if n < batch_size:
      batch = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - n, axis=0)]) for k, v in batch.items()}
    yield batch, n


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
    for name, pred in methods.items():
      values = jax.device_get(cloud_metrics(jnp.asarray(pred), jnp.asarray(gt), with_emd=False, impl=impl))
      values = {k: np.asarray(v[:n], np.float64) for k, v in values.items()}
      values["emd"] = np.full(n, np.nan)
      if len(emd_rows):
        values["emd"][emd_rows] = np.asarray(protocol_emd(jnp.asarray(pred[emd_rows]), jnp.asarray(gt[emd_rows]),
                                                          impl=impl))
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
                 max_batches: int = -1, medoid_max_per_group: int = 32, predictor=None,
                 medoid_cache_dir: str = "") -> dict:
  """Evaluates a finetune (or sparse) run on ``split`` of its data and writes ``<output_prefix>.{csv,md}``.

  Args:
    checkpoint: the run's workdir.
    data_root: overrides the run's config.data.root.
    baselines: also score the medoid baselines (built from the training split).
    predictor: a ``predict.Predictor`` of this run to reuse (its forward pass is already compiled).
    medoid_cache_dir: folder caching the medoid baselines per dataset ('' = no cache; the scripts pass
      baseline_cache.default_cache_dir()).
  Returns:
    evaluate_predictions()'s result plus 'paths' (csv, md).
  """
  from dpcr_jax import predict  # pylint: disable=g-import-not-at-top
  from dpcr_jax.data import CATEGORIES, make_iterator  # pylint: disable=g-import-not-at-top
  predictor = predictor or predict.Predictor(checkpoint)
  config = predictor.config
  if data_root:
    config.data.root = data_root
  impl = config.model.ops_impl
  batch_size = config.eval_batch_size

  def predict_fn(batch):
    outputs = predictor(batch["image"])
    if "dense" not in outputs:  # a sparse-stage run: its points, repeated to the dense count
      reps = batch["points_dense"].shape[1] // outputs["sparse"].shape[1]
      outputs = {"dense": np.repeat(outputs["sparse"], reps, axis=1)}
    return outputs

  medoids = None
  if baselines:  # computed once per dataset and settings, then read back (dpcr_jax/baseline_cache.py)
    medoids = baseline_cache.medoid_baselines(config.data, batch_size, config.seed, medoid_max_per_group,
                                              impl=impl, cache_dir=medoid_cache_dir)
  batches = make_iterator(config.data, split, batch_size, seed=0, shuffle=False, num_epochs=1,
                          drop_remainder=False)
  names = [name for _, name in CATEGORIES]
  result = evaluate_predictions(predict_fn, batches, batch_size, names, medoids, emd_examples_per_category,
                                exact_emd_clouds, impl=impl, max_batches=max_batches)
  n_dense = config.data.n_dense
  notes = [f"run {os.path.abspath(checkpoint)}, split '{split}' of {config.data.source} at {config.data.root}, "
           f"{n_dense} points per cloud (the paper evaluates at 16384; CD/EMD values depend on the count).",
           "Protocol (spec §7): each cloud normalised to the unit cube on its own; mean row = unweighted mean "
           "of the category means. [extra] columns are not in the paper."]
  if emd_examples_per_category >= 0:
    notes.append(f"EMD computed on the first {emd_examples_per_category} examples of each category only.")
  if medoids is not None:
    notes.append(f"medoid / oracle_medoid: training-set medoids per view / per (category, view), from "
                 f"{medoids.num_clouds} training clouds; they ignore the image (cache: {medoids.cache}).")
  if result["emd_check"]:
    c = result["emd_check"]
    notes.append(f"EMD approximation check on {c['num_clouds']} model predictions, random {c['num_points']}-point "
                 f"subsets: exact (Hungarian) {c['exact_mean']:.4f}, approx-match {c['approx_mean']:.4f}, mean "
                 f"relative error {100 * c['mean_relative_error']:.2f}%.")
  result["paths"] = write_reports(result["tables"], output_prefix, notes)
  return result
