"""Offline synthetic ShapeNet-like dataset: procedural meshes (shapes.py), renderers (render.py) and the
generator that writes the real on-disk formats (generate.py), which dpcr_jax/data's loaders then read."""
from dpcr_jax.synth.generate import generate_synthetic

__all__ = ["generate_synthetic"]
