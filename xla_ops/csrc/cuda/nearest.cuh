// Brute-force K nearest neighbours in 3-D for small compile-time K (nn_distance: K=1, three_nn: K=3).
// One thread per query; the block stages tiles of the reference set in shared memory, and every thread
// keeps its K best (distance, index) pairs sorted in registers. References are visited in increasing index
// order and a candidate must be strictly closer to enter or to move ahead, so ties go to the lowest index
// (same result as the CPU handlers, whose distances SqDist3 reproduces bit for bit). Slots never filled
// (fewer than K references) keep distance +inf and index 0.
#pragma once

#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {

constexpr int kNearestThreads = 256;  // queries per block
constexpr int kNearestTile = 512;     // reference points staged in shared memory at a time

template <int K>
__device__ __forceinline__ void InsertSorted(float (&best)[K], int (&best_i)[K], float d, int j) {
  if (!(d < best[K - 1])) return;
  best[K - 1] = d;
  best_i[K - 1] = j;
#pragma unroll
  for (int s = K - 1; s > 0; --s) {
    if (best[s] < best[s - 1]) {  // strict: an equal, earlier (lower-index) entry stays ahead
      const float td = best[s];
      best[s] = best[s - 1];
      best[s - 1] = td;
      const int ti = best_i[s];
      best_i[s] = best_i[s - 1];
      best_i[s - 1] = ti;
    }
  }
}

// query [b, n, 3], ref [b, m, 3] -> dist [b, n, K], idx [b, n, K]. blockDim.x == kNearestThreads.
template <int K>
__global__ void __launch_bounds__(kNearestThreads)
    NearestKKernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ query, const float* __restrict__ ref,
                   float* __restrict__ dist, int32_t* __restrict__ idx) {
  __shared__ float tile[kNearestTile * 3];
  const int64_t tiles_per_item = CeilDiv(n, kNearestThreads);
  // Block-uniform loop (so the barriers are safe) over (batch item, query tile) pairs.
  for (int64_t blk = blockIdx.x; blk < b * tiles_per_item; blk += gridDim.x) {
    const int64_t bi = blk / tiles_per_item;
    const int64_t i = (blk - bi * tiles_per_item) * kNearestThreads + threadIdx.x;
    const bool valid = i < n;
    const int64_t q = bi * n + i;
    const float qx = valid ? query[3 * q] : 0.0f, qy = valid ? query[3 * q + 1] : 0.0f,
                qz = valid ? query[3 * q + 2] : 0.0f;
    float best[K];
    int best_i[K];
#pragma unroll
    for (int s = 0; s < K; ++s) {
      best[s] = INFINITY;
      best_i[s] = 0;
    }
    const float* r = ref + bi * m * 3;
    for (int64_t j0 = 0; j0 < m; j0 += kNearestTile) {
      const int count = static_cast<int>(min(static_cast<int64_t>(kNearestTile), m - j0));
      __syncthreads();  // the previous tile is no longer read
      for (int t = threadIdx.x; t < 3 * count; t += kNearestThreads) tile[t] = r[3 * j0 + t];
      __syncthreads();
      if (valid) {
        for (int t = 0; t < count; ++t) {
          const float d = SqDist3(tile[3 * t], tile[3 * t + 1], tile[3 * t + 2], qx, qy, qz);
          InsertSorted<K>(best, best_i, d, static_cast<int>(j0 + t));
        }
      }
    }
    if (valid) {
#pragma unroll
      for (int s = 0; s < K; ++s) {
        dist[q * K + s] = best[s];
        idx[q * K + s] = best_i[s];
      }
    }
  }
}

// Launches NearestKKernel<K> on `stream` (no-op for an empty query set).
template <int K>
inline ffi::Error LaunchNearestK(const char* op, cudaStream_t stream, int64_t b, int64_t n, int64_t m,
                                 const float* query, const float* ref, float* dist, int32_t* idx) {
  const int64_t blocks = b * CeilDiv(n, kNearestThreads);
  if (blocks == 0) return ffi::Error::Success();
  NearestKKernel<K><<<static_cast<unsigned int>(std::min(blocks, kMaxGridX)), kNearestThreads, 0, stream>>>(
      b, n, m, query, ref, dist, idx);
  return CheckLaunch(op);
}

}  // namespace cuda
}  // namespace xla_ops
