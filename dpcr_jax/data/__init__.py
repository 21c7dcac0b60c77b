"""Training and evaluation data: loaders for the real on-disk formats and the grain input pipeline (docs/data.md).

The offline synthetic generator that writes those formats is a separate package, dpcr_jax/synth/.
"""
from dpcr_jax.data.categories import CATEGORIES
from dpcr_jax.data.pipeline import default_data_config, make_dataset, make_iterator, make_source

__all__ = ["CATEGORIES", "default_data_config", "make_dataset", "make_iterator", "make_source"]
