"""Data: ShapeNet-like synthetic generation and loaders for the real on-disk formats (docs/data.md)."""
from dpcr_jax.data.categories import CATEGORIES
from dpcr_jax.data.pipeline import default_data_config
from dpcr_jax.data.pipeline import make_dataset
from dpcr_jax.data.pipeline import make_iterator
from dpcr_jax.data.pipeline import make_source
from dpcr_jax.data.synthetic import generate_synthetic

__all__ = ["CATEGORIES", "default_data_config", "make_dataset", "make_iterator", "make_source",
           "generate_synthetic"]
