"""Per-category aggregation of per-example metrics and the CSV / markdown report tables."""
from __future__ import annotations

import csv
import os
from typing import Iterable

import numpy as np

METRICS = {  # name -> (column label, lower is better)
    "cd": ("CD x1000 (squared)", True),
    "emd": ("EMD /1000 (approx. match, sum)", True),
    "cd_l1": ("CD-L1 x100 (Euclidean) [extra]", True),
    "fscore": ("F-score@1% (%) [extra]", False),
}


def aggregate(records: dict[str, np.ndarray], categories: np.ndarray, names: list[str]) -> dict[str, dict]:
  """Per-category means of per-example metrics and their unweighted mean over the categories present.

  Args:
    records: metric -> [K] per-example values (NaN = not computed for that example, e.g. EMD on a subset;
      +-Inf is an error: a computed value must be finite, evaluation.evaluate_predictions checks that).
    categories: [K] int category index; names: index -> category name.
  Returns:
    {category name: {metric: mean, 'count': n, 'n_<metric>': how many values the mean is over}, ...,
     'mean': {metric: mean of category means}}.
  """
  for metric, values in records.items():
    if np.isinf(values).any():
      raise ValueError(f"aggregate: {metric} has {int(np.isinf(values).sum())} infinite values")
  table = {}
  for c in sorted(set(int(c) for c in categories)):
    sel = categories == c
    row = {"count": int(sel.sum())}
    for metric, values in records.items():
      vals = values[sel][~np.isnan(values[sel])]
      row[metric] = float(vals.mean()) if len(vals) else float("nan")
      row[f"n_{metric}"] = int(len(vals))
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
