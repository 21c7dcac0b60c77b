"""xla_ops: point-cloud operations as XLA custom calls (CPU and CUDA) for JAX."""
from xla_ops.chamfer import chamfer_distance, nn_distance
from xla_ops.emd import approx_match, earth_mover_distance, match_cost
from xla_ops.grouping import ball_query, group_points, knn
from xla_ops.interpolation import inverse_distance_weights, three_interpolate, three_nn
from xla_ops.sampling import farthest_point_sample

__all__ = ["nn_distance", "chamfer_distance", "approx_match", "match_cost", "earth_mover_distance",
           "three_nn", "three_interpolate", "inverse_distance_weights", "farthest_point_sample", "ball_query",
           "group_points", "knn"]
