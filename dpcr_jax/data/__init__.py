"""Data: ShapeNet-like synthetic generation and loaders for the real on-disk formats (docs/data.md).

The pipeline names are imported lazily, so that generator worker processes (which import
dpcr_jax.data.synthetic) do not pay for grain/jax imports.
"""
import importlib

from dpcr_jax.data.categories import CATEGORIES

_LAZY = {
    "default_data_config": "dpcr_jax.data.pipeline",
    "make_dataset": "dpcr_jax.data.pipeline",
    "make_iterator": "dpcr_jax.data.pipeline",
    "make_source": "dpcr_jax.data.pipeline",
    "generate_synthetic": "dpcr_jax.data.synthetic",
}

__all__ = ["CATEGORIES", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'dpcr_jax.data' has no attribute {name!r}")
