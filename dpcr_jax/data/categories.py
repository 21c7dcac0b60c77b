"""The 13 ShapeNet categories of 3D-R2N2 / AttentionDPCR, and the ShapeNet split rule."""
from typing import Sequence

# (synset, name), in synset order. The index into this list is the 'category' label of every example.
CATEGORIES: list[tuple[str, str]] = [
    ("02691156", "airplane"),
    ("02828884", "bench"),
    ("02933112", "cabinet"),
    ("02958343", "car"),
    ("03001627", "chair"),
    ("03211117", "monitor"),
    ("03636649", "lamp"),
    ("03691459", "speaker"),
    ("04090263", "rifle"),
    ("04256520", "sofa"),
    ("04379243", "table"),
    ("04401088", "telephone"),
    ("04530566", "vessel"),
]
SYNSETS = [s for s, _ in CATEGORIES]
NAMES = [n for _, n in CATEGORIES]
SYNSET_TO_INDEX = {s: i for i, s in enumerate(SYNSETS)}
NAME_TO_SYNSET = {n: s for s, n in CATEGORIES}


def resolve_categories(categories: Sequence[str] | None) -> list[str]:
  """Synsets for a list of synsets and/or names (None = all 13, in CATEGORIES order)."""
  if categories is None:
    return list(SYNSETS)
  out = []
  for c in categories:
    syn = NAME_TO_SYNSET.get(c, c)
    if syn not in SYNSET_TO_INDEX:
      raise ValueError(f"categories: unknown category {c!r}; expected one of {NAMES} or their synsets {SYNSETS}")
    out.append(syn)
  return out


def split_models(model_ids: Sequence[str], train_fraction: float = 0.8) -> tuple[list[str], list[str]]:
  """The 3D-R2N2 split rule: sort the ids, the first int(0.8 n) are train, the rest test/val."""
  ids = sorted(model_ids)
  n_train = int(train_fraction * len(ids))
  return ids[:n_train], ids[n_train:]
