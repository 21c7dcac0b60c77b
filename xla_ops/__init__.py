"""xla_ops: point-cloud operations as XLA custom calls (CPU and CUDA) for JAX."""
from xla_ops.chamfer import chamfer_distance, nn_distance

__all__ = ["nn_distance", "chamfer_distance"]
