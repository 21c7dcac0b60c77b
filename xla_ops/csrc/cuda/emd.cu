// Earth mover's distance ops on CUDA: approx_match, match_cost, match_cost_grad (docs/original.md §5).
//
// approx_match runs the original GPU algorithm (10 rounds, level = -4^j for j = 7..-1, then 0), but instead
// of one block per batch item doing the three passes of a round with block barriers in between, each pass
// is its own kernel over all (batch item, point tile) pairs: within a pass every point is independent, so
// the launch boundary is the only synchronisation needed, and a single batch item fills the whole GPU.
// Per pass and point the summation runs over the other set in index order, as in the original; the original
// uses __expf, we use expf (full precision) to stay close to the CPU handler. The per-item state remainL /
// remainR / ratioL / ratioR lives in XLA scratch memory. match is [m, n] (match[l, k], l in xyz2, k in xyz1).
//
// match_cost and match_cost_grad have no atomics: match_cost reduces per-(item, row chunk) partial sums in
// a fixed order, grad1 is one thread per xyz1 point, grad2 one warp per xyz2 point, so all three are
// deterministic.
#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kMatchOp = "xla_ops_approx_match";
constexpr const char* kCostOp = "xla_ops_match_cost";
constexpr const char* kCostGradOp = "xla_ops_match_cost_grad";
constexpr int kThreads = 256;  // points per block (and tile size) of the per-point kernels

inline unsigned int TileBlocks(int64_t b, int64_t count) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(b * CeilDiv(count, kThreads), kMaxGridX)));
}

// Stages points [j0, j0 + cnt) of `pts` ([*, 3]) and one per-point value from `val` in `tile` (x, y, z, v).
__device__ __forceinline__ void LoadTile(float4* tile, const float* pts, const float* val, int64_t j0, int cnt) {
  __syncthreads();  // the previous tile is no longer read
  for (int t = threadIdx.x; t < cnt; t += blockDim.x) {
    const int64_t j = j0 + t;
    tile[t] = make_float4(pts[3 * j], pts[3 * j + 1], pts[3 * j + 2], val ? val[j] : 0.0f);
  }
  __syncthreads();
}

__device__ __forceinline__ float Dist2(float4 a, float x, float y, float z) {
  const float dx = a.x - x, dy = a.y - y, dz = a.z - z;
  return dx * dx + dy * dy + dz * dz;
}

// ---- approx_match ---------------------------------------------------------------------------------

__global__ void MatchInitKernel(int64_t b, int64_t n, int64_t m, float multi_l, float multi_r,
                                float* __restrict__ remain_l, float* __restrict__ remain_r) {
  XLA_OPS_GRID_STRIDE(t, b * n) remain_l[t] = multi_l;
  XLA_OPS_GRID_STRIDE(t, b * m) remain_r[t] = multi_r;
}

// Pass 1, per xyz1 point k: ratio_l[k] = remain_l[k] / (1e-9 + sum_l exp(level d2(k, l)) remain_r[l]).
__global__ void __launch_bounds__(kThreads)
    MatchRatioLKernel(int64_t b, int64_t n, int64_t m, float level, const float* __restrict__ xyz1,
                      const float* __restrict__ xyz2, const float* __restrict__ remain_l,
                      const float* __restrict__ remain_r, float* __restrict__ ratio_l) {
  __shared__ float4 tile[kThreads];
  const int64_t tiles = CeilDiv(n, kThreads);
  // Block-uniform loop over (batch item, point tile) pairs; threads past the last point only stage tiles.
  for (int64_t blk = blockIdx.x; blk < b * tiles; blk += gridDim.x) {
    const int64_t bi = blk / tiles, k = (blk - bi * tiles) * kThreads + threadIdx.x;
    const bool valid = k < n;
    const int64_t p = bi * n + k;
    const float x = valid ? xyz1[3 * p] : 0.0f, y = valid ? xyz1[3 * p + 1] : 0.0f, z = valid ? xyz1[3 * p + 2] : 0.0f;
    float sum = 1e-9f;
    for (int64_t l0 = 0; l0 < m; l0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), m - l0));
      LoadTile(tile, xyz2 + bi * m * 3, remain_r + bi * m, l0, cnt);
      if (valid)
        for (int t = 0; t < cnt; ++t) sum += expf(level * Dist2(tile[t], x, y, z)) * tile[t].w;
    }
    if (valid) ratio_l[p] = remain_l[p] / sum;
  }
}

// Pass 2, per xyz2 point l: s = remain_r[l] * sum_k exp(level d2(k, l)) ratio_l[k];
// ratio_r[l] = min(remain_r[l] / (s + 1e-9), 1) * remain_r[l]; remain_r[l] = max(0, remain_r[l] - s).
__global__ void __launch_bounds__(kThreads)
    MatchRatioRKernel(int64_t b, int64_t n, int64_t m, float level, const float* __restrict__ xyz1,
                      const float* __restrict__ xyz2, const float* __restrict__ ratio_l,
                      float* __restrict__ remain_r, float* __restrict__ ratio_r) {
  __shared__ float4 tile[kThreads];
  const int64_t tiles = CeilDiv(m, kThreads);
  // Block-uniform loop over (batch item, point tile) pairs; threads past the last point only stage tiles.
  for (int64_t blk = blockIdx.x; blk < b * tiles; blk += gridDim.x) {
    const int64_t bi = blk / tiles, l = (blk - bi * tiles) * kThreads + threadIdx.x;
    const bool valid = l < m;
    const int64_t q = bi * m + l;
    const float x = valid ? xyz2[3 * q] : 0.0f, y = valid ? xyz2[3 * q + 1] : 0.0f, z = valid ? xyz2[3 * q + 2] : 0.0f;
    float sum = 0.0f;
    for (int64_t k0 = 0; k0 < n; k0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), n - k0));
      LoadTile(tile, xyz1 + bi * n * 3, ratio_l + bi * n, k0, cnt);
      if (valid)
        for (int t = 0; t < cnt; ++t) sum += expf(level * Dist2(tile[t], x, y, z)) * tile[t].w;
    }
    if (valid) {
      const float remain = remain_r[q];
      sum *= remain;
      const float consumption = fminf(remain / (sum + 1e-9f), 1.0f);
      ratio_r[q] = consumption * remain;
      remain_r[q] = fmaxf(0.0f, remain - sum);
    }
  }
}

// Pass 3, per xyz1 point k: w = exp(level d2(k, l)) ratio_l[k] ratio_r[l]; match[l, k] += w;
// remain_l[k] = max(0, remain_l[k] - sum_l w). Thread k owns column k of match: no races; the writes of a
// warp are to consecutive k, i.e. coalesced.
__global__ void __launch_bounds__(kThreads)
    MatchUpdateKernel(int64_t b, int64_t n, int64_t m, float level, const float* __restrict__ xyz1,
                      const float* __restrict__ xyz2, const float* __restrict__ ratio_l,
                      const float* __restrict__ ratio_r, float* __restrict__ remain_l, float* __restrict__ match) {
  __shared__ float4 tile[kThreads];
  const int64_t tiles = CeilDiv(n, kThreads);
  // Block-uniform loop over (batch item, point tile) pairs; threads past the last point only stage tiles.
  for (int64_t blk = blockIdx.x; blk < b * tiles; blk += gridDim.x) {
    const int64_t bi = blk / tiles, k = (blk - bi * tiles) * kThreads + threadIdx.x;
    const bool valid = k < n;
    const int64_t p = bi * n + k;
    const float x = valid ? xyz1[3 * p] : 0.0f, y = valid ? xyz1[3 * p + 1] : 0.0f, z = valid ? xyz1[3 * p + 2] : 0.0f;
    const float rl = valid ? ratio_l[p] : 0.0f;
    float* col = match + bi * m * n + k;  // match[bi, l, k] = col[l * n]
    float sum = 0.0f;
    for (int64_t l0 = 0; l0 < m; l0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), m - l0));
      LoadTile(tile, xyz2 + bi * m * 3, ratio_r + bi * m, l0, cnt);
      if (valid) {
        for (int t = 0; t < cnt; ++t) {
          const float w = expf(level * Dist2(tile[t], x, y, z)) * rl * tile[t].w;
          col[(l0 + t) * n] += w;
          sum += w;
        }
      }
    }
    if (valid) remain_l[p] = fmaxf(0.0f, remain_l[p] - sum);
  }
}

// Checks xyz1 [..., n, 3] and xyz2 [..., m, 3] (same batch, n, m >= 1).
ffi::Error CheckPair(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2, PointShape& s1,
                     PointShape& s2) {
  auto a = PointsOf(op, "xyz1", xyz1, ffi::F32);
  if (a.has_error()) return a.error();
  auto b = PointsOf(op, "xyz2", xyz2, ffi::F32);
  if (b.has_error()) return b.error();
  if (a->c != 3 || b->c != 3)
    return InvalidArgument(op, "xyz1 and xyz2 must have 3 channels, got " + std::to_string(a->c) + " and " +
                                   std::to_string(b->c));
  XLA_OPS_RETURN_IF_ERROR(CheckSameBatch(op, "xyz1", *a, "xyz2", *b));
  if (a->n < 1 || b->n < 1) return InvalidArgument(op, "xyz1 and xyz2 need at least one point");
  s1 = *a;
  s2 = *b;
  return ffi::Error::Success();
}

ffi::Error ApproxMatchImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer xyz1,
                           ffi::AnyBuffer xyz2, ffi::Result<ffi::AnyBuffer> match) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckPair(kMatchOp, xyz1, xyz2, s1, s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kMatchOp, "match", *match, ffi::F32, b * m * n));
  if (b == 0) return ffi::Error::Success();

  // remain_l [b, n], ratio_l [b, n], remain_r [b, m], ratio_r [b, m].
  auto state = AllocateScratch<float>(kMatchOp, scratch, 2 * b * (n + m));
  if (state.has_error()) return state.error();
  float* remain_l = *state;
  float* ratio_l = remain_l + b * n;
  float* remain_r = ratio_l + b * n;
  float* ratio_r = remain_r + b * m;
  float* out = match->typed_data<float>();
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();

  // Masses (integer division, as in the original): the larger set has mass 1 per point.
  const float multi_l = n >= m ? 1.0f : static_cast<float>(m / n);
  const float multi_r = n >= m ? static_cast<float>(n / m) : 1.0f;
  XLA_OPS_RETURN_IF_ERROR(ZeroAsync(kMatchOp, out, match->size_bytes(), stream));
  MatchInitKernel<<<StrideBlocks(b * std::max(n, m), kThreads), kThreads, 0, stream>>>(b, n, m, multi_l, multi_r,
                                                                                        remain_l, remain_r);
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kMatchOp));
  for (int j = 7; j >= -2; --j) {
    const float level = j == -2 ? 0.0f : -std::ldexp(1.0f, 2 * j);  // -4^j, exact
    MatchRatioLKernel<<<TileBlocks(b, n), kThreads, 0, stream>>>(b, n, m, level, p1, p2, remain_l, remain_r,
                                                                 ratio_l);
    MatchRatioRKernel<<<TileBlocks(b, m), kThreads, 0, stream>>>(b, n, m, level, p1, p2, ratio_l, remain_r,
                                                                 ratio_r);
    MatchUpdateKernel<<<TileBlocks(b, n), kThreads, 0, stream>>>(b, n, m, level, p1, p2, ratio_l, ratio_r,
                                                                 remain_l, out);
    XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kMatchOp));
  }
  return ffi::Error::Success();
}

// ---- match_cost -----------------------------------------------------------------------------------

constexpr int kCostRows = 32;  // xyz2 rows of match per block

// Partial cost of rows [chunk * kCostRows, ...) of match[bi]: partial[bi * chunks + chunk].
__global__ void __launch_bounds__(kThreads)
    MatchCostPartialKernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1,
                           const float* __restrict__ xyz2, const float* __restrict__ match,
                           float* __restrict__ partial) {
  __shared__ float rows[kCostRows * 3];
  __shared__ float reduce[32];
  const int64_t chunks = CeilDiv(m, kCostRows);
  for (int64_t blk = blockIdx.x; blk < b * chunks; blk += gridDim.x) {
    const int64_t bi = blk / chunks, l0 = (blk - bi * chunks) * kCostRows;
    const int cnt = static_cast<int>(min(static_cast<int64_t>(kCostRows), m - l0));
    __syncthreads();  // `rows` of the previous chunk is no longer read
    for (int t = threadIdx.x; t < 3 * cnt; t += blockDim.x) rows[t] = xyz2[(bi * m + l0) * 3 + t];
    __syncthreads();
    const float* mrow = match + (bi * m + l0) * n;
    float acc = 0.0f;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
      const float* p = xyz1 + (bi * n + k) * 3;
      const float x = p[0], y = p[1], z = p[2];
      for (int r = 0; r < cnt; ++r) {
        const float dx = x - rows[3 * r], dy = y - rows[3 * r + 1], dz = z - rows[3 * r + 2];
        acc += mrow[r * n + k] * sqrtf(dx * dx + dy * dy + dz * dz);
      }
    }
    acc = BlockSum(acc, reduce);
    if (threadIdx.x == 0) partial[blk] = acc;
  }
}

// cost[bi] = sum of the partials of item bi, in order.
__global__ void MatchCostFinishKernel(int64_t b, int64_t chunks, const float* __restrict__ partial,
                                      float* __restrict__ cost) {
  XLA_OPS_GRID_STRIDE(bi, b) {
    float acc = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) acc += partial[bi * chunks + c];
    cost[bi] = acc;
  }
}

// Checks xyz1, xyz2 and match [..., m, n].
ffi::Error CheckMatchArgs(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                          const ffi::AnyBuffer& match, PointShape& s1, PointShape& s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckPair(op, xyz1, xyz2, s1, s2));
  auto sm = PointsOf(op, "match", match, ffi::F32);
  if (sm.has_error()) return sm.error();
  if (sm->b != s1.b || sm->n != s2.n || sm->c != s1.n)
    return InvalidArgument(op, "match must be [..., m=" + std::to_string(s2.n) + ", n=" + std::to_string(s1.n) +
                                   "] with the batch of xyz1, got " + DimsString(match.dimensions()));
  return ffi::Error::Success();
}

ffi::Error MatchCostImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer xyz1,
                         ffi::AnyBuffer xyz2, ffi::AnyBuffer match, ffi::Result<ffi::AnyBuffer> cost) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckMatchArgs(kCostOp, xyz1, xyz2, match, s1, s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kCostOp, "cost", *cost, ffi::F32, b));
  if (b == 0) return ffi::Error::Success();
  const int64_t chunks = CeilDiv(m, kCostRows);
  auto partial = AllocateScratch<float>(kCostOp, scratch, b * chunks);
  if (partial.has_error()) return partial.error();
  MatchCostPartialKernel<<<static_cast<unsigned int>(std::min(b * chunks, kMaxGridX)), kThreads, 0, stream>>>(
      b, n, m, xyz1.typed_data<float>(), xyz2.typed_data<float>(), match.typed_data<float>(), *partial);
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kCostOp));
  MatchCostFinishKernel<<<StrideBlocks(b, kThreads), kThreads, 0, stream>>>(b, chunks, *partial,
                                                                             cost->typed_data<float>());
  return CheckLaunch(kCostOp);
}

// ---- match_cost_grad ------------------------------------------------------------------------------

// grad1[k] = sum_l match[l, k] (p_k - q_l) / max(|p_k - q_l|, 1e-10): one thread per xyz1 point k.
__global__ void __launch_bounds__(kThreads)
    MatchCostGrad1Kernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1,
                         const float* __restrict__ xyz2, const float* __restrict__ match, float* __restrict__ grad1) {
  __shared__ float4 tile[kThreads];
  const int64_t tiles = CeilDiv(n, kThreads);
  // Block-uniform loop over (batch item, point tile) pairs; threads past the last point only stage tiles.
  for (int64_t blk = blockIdx.x; blk < b * tiles; blk += gridDim.x) {
    const int64_t bi = blk / tiles, k = (blk - bi * tiles) * kThreads + threadIdx.x;
    const bool valid = k < n;
    const int64_t p = bi * n + k;
    const float x = valid ? xyz1[3 * p] : 0.0f, y = valid ? xyz1[3 * p + 1] : 0.0f, z = valid ? xyz1[3 * p + 2] : 0.0f;
    const float* col = match + bi * m * n + k;
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t l0 = 0; l0 < m; l0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), m - l0));
      LoadTile(tile, xyz2 + bi * m * 3, nullptr, l0, cnt);
      if (valid) {
        for (int t = 0; t < cnt; ++t) {
          const float dx = x - tile[t].x, dy = y - tile[t].y, dz = z - tile[t].z;
          const float s = col[(l0 + t) * n] / fmaxf(sqrtf(dx * dx + dy * dy + dz * dz), 1e-10f);
          gx += s * dx;
          gy += s * dy;
          gz += s * dz;
        }
      }
    }
    if (valid) {
      grad1[3 * p] = gx;
      grad1[3 * p + 1] = gy;
      grad1[3 * p + 2] = gz;
    }
  }
}

// grad2[l] = sum_k match[l, k] (q_l - p_k) / max(|q_l - p_k|, 1e-10): one warp per xyz2 point l, reading
// row l of match contiguously, reduced with shuffles in a fixed order.
__global__ void MatchCostGrad2Kernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1,
                                     const float* __restrict__ xyz2, const float* __restrict__ match,
                                     float* __restrict__ grad2) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  // Warp-uniform loop: every lane of a warp runs the same iterations, so the full-mask shuffles are safe.
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); q < b * m;
       q += warps) {
    const int64_t bi = q / m;
    const float x = xyz2[3 * q], y = xyz2[3 * q + 1], z = xyz2[3 * q + 2];
    const float* row = match + q * n;  // match[bi, l, :] with q = bi * m + l
    const float* p1 = xyz1 + bi * n * 3;
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t k = lane; k < n; k += 32) {
      const float dx = x - p1[3 * k], dy = y - p1[3 * k + 1], dz = z - p1[3 * k + 2];
      const float s = row[k] / fmaxf(sqrtf(dx * dx + dy * dy + dz * dz), 1e-10f);
      gx += s * dx;
      gy += s * dy;
      gz += s * dz;
    }
    for (int off = 16; off > 0; off >>= 1) {
      gx += __shfl_down_sync(0xffffffffu, gx, off);
      gy += __shfl_down_sync(0xffffffffu, gy, off);
      gz += __shfl_down_sync(0xffffffffu, gz, off);
    }
    if (lane == 0) {
      grad2[3 * q] = gx;
      grad2[3 * q + 1] = gy;
      grad2[3 * q + 2] = gz;
    }
  }
}

ffi::Error MatchCostGradImpl(cudaStream_t stream, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer match,
                             ffi::Result<ffi::AnyBuffer> grad1, ffi::Result<ffi::AnyBuffer> grad2) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckMatchArgs(kCostGradOp, xyz1, xyz2, match, s1, s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kCostGradOp, "grad1", *grad1, ffi::F32, b * n * 3));
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kCostGradOp, "grad2", *grad2, ffi::F32, b * m * 3));
  if (b == 0) return ffi::Error::Success();
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();
  const float* pm = match.typed_data<float>();
  MatchCostGrad1Kernel<<<TileBlocks(b, n), kThreads, 0, stream>>>(b, n, m, p1, p2, pm, grad1->typed_data<float>());
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kCostGradOp));
  constexpr int kWarpsPerBlock = kThreads / 32;
  MatchCostGrad2Kernel<<<StrideBlocks(b * m, kWarpsPerBlock), kThreads, 0, stream>>>(b, n, m, p1, p2, pm,
                                                                                    grad2->typed_data<float>());
  return CheckLaunch(kCostGradOp);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxMatchCuda, ApproxMatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kMatchOp, ApproxMatchCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostCuda, MatchCostImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kCostOp, MatchCostCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostGradCuda, MatchCostGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kCostGradOp, MatchCostGradCuda);

}  // namespace cuda
}  // namespace xla_ops
