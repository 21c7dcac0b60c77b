// Shared helpers for the xla_ops CUDA handlers: launch-error reporting, grid sizing and the block reductions
// the kernels share. Argument checks are the ones the CPU handlers use (checks.h), run before anything is
// launched.
//
// Conventions on top of common.h:
//  * Every handler runs on XLA's stream (.Ctx<ffi::PlatformStream<cudaStream_t>>()) and never synchronises or
//    allocates (temporary device memory is an extra "workspace" output), so every handler declares
//    ffi::Traits::kCmdBufferCompatible and XLA can capture it into a CUDA graph.
//  * Every launch is followed by CheckLaunch(), which turns cudaGetLastError() into ffi::Error::Internal.
//  * Offsets into [B, N, ...] arrays are int64 (B*N*M overflows int32 for dense point sets).
//  * Grids are one-dimensional (gridDim.x allows 2^31-1 blocks; y and z stop at 65535), either grid-stride
//    loops or one block per (batch item, tile) with the pair decoded from blockIdx.x.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "checks.h"
#include "common.h"
#include "distance.h"  // SqDist3, SqDistC: the distances shared with the CPU handlers

namespace xla_ops {
namespace cuda {

// Turns the sticky launch error (bad configuration, no kernel image for this GPU, ...) into an ffi::Error.
inline ffi::Error CheckLaunch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

inline ffi::Error CheckCuda(const char* op, cudaError_t err) {
  if (err != cudaSuccess) return ffi::Error::Internal(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

// Zero-fills a device buffer on `stream` (the *_grad handlers scatter-add into their outputs).
inline ffi::Error ZeroAsync(const char* op, void* data, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return ffi::Error::Success();
  return CheckCuda(op, cudaMemsetAsync(data, 0, bytes, stream));
}

constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

// Blocks for a grid-stride loop over `work` items (capped; the loop covers the rest).
inline unsigned int StrideBlocks(int64_t work, int threads) {
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(blocks, 1 << 20)));
}

__host__ __device__ inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride loop over [0, n) with int64 indices.
#define XLA_OPS_GRID_STRIDE(i, n)                                                                        \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n);                 \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// ---- device helpers -------------------------------------------------------------------------------

// Block-wide sum of `v` (blockDim.x a multiple of 32, at most 1024). Every thread gets the total. The order
// of the additions is fixed, so the result is deterministic for a given block size. `shared` holds 32 floats.
__device__ __forceinline__ float BlockSum(float v, float* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  __syncthreads();  // `shared` may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? shared[lane] : 0.0f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// (value, index) argmax step: the larger value wins, equal values go to the lower index.
__device__ __forceinline__ void ArgmaxMerge(float& best, int& best_i, float other, int other_i) {
  if (other > best || (other == best && other_i < best_i)) {
    best = other;
    best_i = other_i;
  }
}

}  // namespace cuda
}  // namespace xla_ops
