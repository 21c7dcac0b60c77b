// Earth mover's distance ops on CUDA: approx_match, match_cost, match_cost_grad and emd (approx_match +
// match_cost, value and gradient, without the match) (docs/original.md §5).
//
// approx_match runs the original GPU algorithm (10 rounds, level = -4^j for j = 7..-1, then 0), but instead
// of one block per batch item doing the three passes of a round with block barriers in between, each pass
// is its own kernel over all (batch item, point tile, slice of the other set) triples, followed by a small
// kernel that combines the slices' partial sums in slice order: within a pass every point is independent,
// so the launch boundaries are the only synchronisation needed, and the usual sizes fill the GPU. The
// original uses __expf, we use expf (full precision) to stay close to the CPU handler. The per-item state
// remainL / remainR / ratioL / ratioR and the partial sums live in a workspace output (not XLA scratch, so
// that XLA can capture the handlers in CUDA graphs). match is [m, n] (match[l, k], l in xyz2, k in xyz1).
// An item with a NaN/Inf coordinate gets an all-NaN match (MatchNonFiniteKernel), as on the CPU.
//
// match_cost and match_cost_grad have no atomics: match_cost reduces per-row costs (a workspace output) in
// a fixed order, grad1 is one thread per xyz1 point, grad2 one warp per xyz2 point, so all three are
// deterministic.
#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kMatchOp = "xla_ops_approx_match";
constexpr const char* kCostOp = "xla_ops_match_cost";
constexpr const char* kCostGradOp = "xla_ops_match_cost_grad";
constexpr const char* kEmdOp = "xla_ops_emd";
constexpr int kRounds = 10;  // j = 7, 6, ..., -2
constexpr int kThreads = 256;  // points per block (and tile size) of the per-point kernels

inline unsigned int TileBlocks(int64_t b, int64_t count) {
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min(b * CeilDiv(count, kThreads), kMaxGridX)));
}

// Blocks of a (batch item, point tile, slice) grid.
inline unsigned int SlicedBlocks(int64_t b, int64_t count, int64_t slices) {
  return static_cast<unsigned int>(
      std::max<int64_t>(1, std::min(b * CeilDiv(count, kThreads) * slices, kMaxGridX)));
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
//
// Per batch item the workspace (an output of the custom call, so XLA can capture the op in a CUDA graph)
// holds remain_l [n], ratio_l [n], remain_r [m], ratio_r [m] and partial [slices][max(n, m)]; `slices`
// follows from its size (xla_ops/emd.py chooses it). Every sum over the other set is split into `slices`
// contiguous ranges computed by different blocks, then combined in slice order: B * tiles * slices blocks
// keep an H100/H200 (132 SMs) busy at the training sizes (B = 32, N = M = 1024: 8 slices, 1024 blocks)
// where one block per (item, 256-point tile) gave 128.

struct MatchWorkspace {
  float* base;
  int64_t stride;  // floats per batch item
  int64_t n, m, slices;
  __host__ __device__ float* remain_l(int64_t bi) const { return base + bi * stride; }
  __host__ __device__ float* ratio_l(int64_t bi) const { return base + bi * stride + n; }
  __host__ __device__ float* remain_r(int64_t bi) const { return base + bi * stride + 2 * n; }
  __host__ __device__ float* ratio_r(int64_t bi) const { return base + bi * stride + 2 * n + m; }
  __host__ __device__ float* partial(int64_t bi, int64_t s) const {
    return base + bi * stride + 2 * (n + m) + s * (n > m ? n : m);
  }
};

// Decodes block `blk` of a (batch item, point tile, slice) grid.
struct SlicedBlock {
  int64_t bi, tile, slice;
};
__device__ __forceinline__ SlicedBlock DecodeSliced(int64_t blk, int64_t tiles, int64_t slices) {
  const int64_t per_item = tiles * slices;
  const int64_t bi = blk / per_item, rest = blk - bi * per_item;
  return {bi, rest / slices, rest % slices};
}

// Item bi's real point counts n_i = lengths1[bi], m_i = lengths2[bi] (clamped to [0, n] / [0, m]).
__device__ __forceinline__ int64_t ItemLength(const int32_t* lengths, int64_t bi, int64_t count) {
  return min(count, max(int64_t{0}, static_cast<int64_t>(lengths[bi])));
}

// Masses (integer division, as in the original) from item bi's real counts: the larger set has mass 1 per
// point; padded points (ragged batches) have no mass, so they contribute exactly 0 everywhere (the Python
// wrapper zeroes their coordinates).
__global__ void MatchInitKernel(int64_t b, MatchWorkspace ws, const int32_t* __restrict__ lengths1,
                                const int32_t* __restrict__ lengths2) {
  XLA_OPS_GRID_STRIDE(t, b * ws.n) {
    const int64_t bi = t / ws.n, k = t % ws.n;
    const int64_t ni = ItemLength(lengths1, bi, ws.n), mi = ItemLength(lengths2, bi, ws.m);
    ws.remain_l(bi)[k] = k < ni ? (ni >= mi ? 1.0f : static_cast<float>(mi / max(ni, int64_t{1}))) : 0.0f;
  }
  XLA_OPS_GRID_STRIDE(t, b * ws.m) {
    const int64_t bi = t / ws.m, l = t % ws.m;
    const int64_t ni = ItemLength(lengths1, bi, ws.n), mi = ItemLength(lengths2, bi, ws.m);
    ws.remain_r(bi)[l] = l < mi ? (ni >= mi ? static_cast<float>(ni / max(mi, int64_t{1})) : 1.0f) : 0.0f;
  }
}

// The sliced sum of passes 1 and 2: for every point i of set A (count na) and slice s of set B (count nb),
// partial[s][i] = sum_{j in slice s} exp(level d2(a_i, b_j)) value[j], in index order.
// Pass 1: A = xyz1, B = xyz2, value = remain_r; pass 2: A = xyz2, B = xyz1, value = ratio_l.
__global__ void __launch_bounds__(kThreads)
    MatchSumKernel(int64_t b, int64_t na, int64_t nb, float level, const float* __restrict__ pa,
                   const float* __restrict__ pb, MatchWorkspace ws, bool pass1) {
  __shared__ float4 tile[kThreads];
  const int64_t tiles = CeilDiv(na, kThreads), slice_len = CeilDiv(nb, ws.slices);
  // Block-uniform loop over (batch item, point tile, slice); threads past the last point only stage tiles.
  for (int64_t blk = blockIdx.x; blk < b * tiles * ws.slices; blk += gridDim.x) {
    const SlicedBlock sb = DecodeSliced(blk, tiles, ws.slices);
    const int64_t i = sb.tile * kThreads + threadIdx.x;
    const bool valid = i < na;
    const float* a = pa + (sb.bi * na + (valid ? i : 0)) * 3;
    const float x = a[0], y = a[1], z = a[2];
    const float* value = pass1 ? ws.remain_r(sb.bi) : ws.ratio_l(sb.bi);
    const int64_t j_end = min(nb, (sb.slice + 1) * slice_len);
    float sum = 0.0f;
    for (int64_t j0 = sb.slice * slice_len; j0 < j_end; j0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), j_end - j0));
      LoadTile(tile, pb + sb.bi * nb * 3, value, j0, cnt);
      if (valid)
        for (int t = 0; t < cnt; ++t) sum += expf(level * Dist2(tile[t], x, y, z)) * tile[t].w;
    }
    if (valid) ws.partial(sb.bi, sb.slice)[i] = sum;
  }
}

// Sum of the slice partials of point i (slice order: deterministic).
__device__ __forceinline__ float SumPartials(const MatchWorkspace& ws, int64_t bi, int64_t i, float init) {
  float sum = init;
  for (int64_t s = 0; s < ws.slices; ++s) sum += ws.partial(bi, s)[i];
  return sum;
}

// After pass 1, per xyz1 point k: ratio_l[k] = remain_l[k] / (1e-9 + sum_l exp(level d2(k, l)) remain_r[l]).
__global__ void MatchRatioLKernel(int64_t b, MatchWorkspace ws) {
  XLA_OPS_GRID_STRIDE(t, b * ws.n) {
    const int64_t bi = t / ws.n, k = t % ws.n;
    ws.ratio_l(bi)[k] = ws.remain_l(bi)[k] / SumPartials(ws, bi, k, 1e-9f);
  }
}

// After pass 2, per xyz2 point l: s = remain_r[l] * sum_k exp(level d2(k, l)) ratio_l[k];
// ratio_r[l] = min(remain_r[l] / (s + 1e-9), 1) * remain_r[l]; remain_r[l] = max(0, remain_r[l] - s).
__global__ void MatchRatioRKernel(int64_t b, MatchWorkspace ws) {
  XLA_OPS_GRID_STRIDE(t, b * ws.m) {
    const int64_t bi = t / ws.m, l = t % ws.m;
    const float remain = ws.remain_r(bi)[l];
    const float sum = SumPartials(ws, bi, l, 0.0f) * remain;
    ws.ratio_r(bi)[l] = fminf(remain / (sum + 1e-9f), 1.0f) * remain;
    ws.remain_r(bi)[l] = fmaxf(0.0f, remain - sum);
  }
}

// Pass 3, per xyz1 point k and slice s of xyz2: w = exp(level d2(k, l)) ratio_l[k] ratio_r[l];
// match[l, k] += w (unless match is nullptr); partial[s][k] = sum_{l in s} w. Thread k owns column k of its slice's rows of match: no
// races; the writes of a warp are to consecutive k, i.e. coalesced.
__global__ void __launch_bounds__(kThreads)
    MatchUpdateKernel(int64_t b, float level, const float* __restrict__ xyz1, const float* __restrict__ xyz2,
                      MatchWorkspace ws, float* __restrict__ match) {
  __shared__ float4 tile[kThreads];
  const int64_t n = ws.n, m = ws.m;
  const int64_t tiles = CeilDiv(n, kThreads), slice_len = CeilDiv(m, ws.slices);
  for (int64_t blk = blockIdx.x; blk < b * tiles * ws.slices; blk += gridDim.x) {
    const SlicedBlock sb = DecodeSliced(blk, tiles, ws.slices);
    const int64_t k = sb.tile * kThreads + threadIdx.x;
    const bool valid = k < n;
    const float* a = xyz1 + (sb.bi * n + (valid ? k : 0)) * 3;
    const float x = a[0], y = a[1], z = a[2];
    const float rl = valid ? ws.ratio_l(sb.bi)[k] : 0.0f;
    float* col = match != nullptr ? match + sb.bi * m * n + k : nullptr;  // match[bi, l, k] = col[l * n]
    const int64_t l_end = min(m, (sb.slice + 1) * slice_len);
    float sum = 0.0f;
    for (int64_t l0 = sb.slice * slice_len; l0 < l_end; l0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), l_end - l0));
      LoadTile(tile, xyz2 + sb.bi * m * 3, ws.ratio_r(sb.bi), l0, cnt);
      if (valid) {
        for (int t = 0; t < cnt; ++t) {
          const float w = expf(level * Dist2(tile[t], x, y, z)) * rl * tile[t].w;
          if (col != nullptr) col[(l0 + t) * n] += w;  // nullptr: xla_ops_emd keeps the factors instead
          sum += w;
        }
      }
    }
    if (valid) ws.partial(sb.bi, sb.slice)[k] = sum;
  }
}

// After pass 3, per xyz1 point k: remain_l[k] = max(0, remain_l[k] - sum_l w).
__global__ void MatchRemainLKernel(int64_t b, MatchWorkspace ws) {
  XLA_OPS_GRID_STRIDE(t, b * ws.n) {
    const int64_t bi = t / ws.n, k = t % ws.n;
    ws.remain_l(bi)[k] = fmaxf(0.0f, ws.remain_l(bi)[k] - SumPartials(ws, bi, k, 0.0f));
  }
}

// One block per batch item: if any coordinate of xyz1[bi] or xyz2[bi] is NaN or Inf, the item's whole match
// becomes NaN (the CPU handler's and the jnp version's rule; the rounds' fminf / fmaxf would otherwise drop
// NaN and leave finite garbage).
__global__ void MatchNonFiniteKernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1,
                                     const float* __restrict__ xyz2, float* __restrict__ match) {
  for (int64_t bi = blockIdx.x; bi < b; bi += gridDim.x) {
    int bad = 0;
    for (int64_t t = threadIdx.x; t < 3 * n; t += blockDim.x) bad |= !isfinite(xyz1[bi * n * 3 + t]);
    for (int64_t t = threadIdx.x; t < 3 * m; t += blockDim.x) bad |= !isfinite(xyz2[bi * m * 3 + t]);
    if (__syncthreads_or(bad)) {  // block-uniform
      float* out = match + bi * m * n;
      for (int64_t t = threadIdx.x; t < m * n; t += blockDim.x) out[t] = NAN;
    }
  }
}

// Level of round r: -4^(7 - r), exact, and 0 in the last round.
inline float Level(int r) { return r == kRounds - 1 ? 0.0f : -std::ldexp(1.0f, 2 * (7 - r)); }

// Keeps round r's ratio_l [n] and ratio_r [m] of every item (xla_ops_emd rebuilds the match from them).
__global__ void SaveRatiosKernel(int64_t b, MatchWorkspace ws, float* __restrict__ ratio_l_r,
                                 float* __restrict__ ratio_r_r, int64_t rounds_stride) {
  XLA_OPS_GRID_STRIDE(t, b * ws.n) ratio_l_r[(t / ws.n) * rounds_stride + t % ws.n] = ws.ratio_l(t / ws.n)[t % ws.n];
  XLA_OPS_GRID_STRIDE(t, b * ws.m) ratio_r_r[(t / ws.m) * rounds_stride + t % ws.m] = ws.ratio_r(t / ws.m)[t % ws.m];
}

// The rounds of approx_match. match: [b, m, n] (zeroed first) or nullptr; rounds: nullptr, or per item
// kRounds x (n + m) floats at stride `rounds_stride` (round r's ratio_l at r * n, ratio_r at kRounds * n + r * m).
ffi::Error RunRounds(const char* op, cudaStream_t stream, int64_t b, int64_t n, int64_t m, const float* p1,
                     const float* p2, const int32_t* lengths1, const int32_t* lengths2, const MatchWorkspace& ws,
                     float* match, float* rounds, int64_t rounds_stride) {
  const int64_t slices = ws.slices;
  MatchInitKernel<<<StrideBlocks(b * std::max(n, m), kThreads), kThreads, 0, stream>>>(b, ws, lengths1, lengths2);
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(op));
  const unsigned int blocks1 = SlicedBlocks(b, n, slices), blocks2 = SlicedBlocks(b, m, slices);
  for (int r = 0; r < kRounds; ++r) {
    const float level = Level(r);
    MatchSumKernel<<<blocks1, kThreads, 0, stream>>>(b, n, m, level, p1, p2, ws, /*pass1=*/true);
    MatchRatioLKernel<<<StrideBlocks(b * n, kThreads), kThreads, 0, stream>>>(b, ws);
    MatchSumKernel<<<blocks2, kThreads, 0, stream>>>(b, m, n, level, p2, p1, ws, /*pass1=*/false);
    MatchRatioRKernel<<<StrideBlocks(b * m, kThreads), kThreads, 0, stream>>>(b, ws);
    if (rounds != nullptr)
      SaveRatiosKernel<<<StrideBlocks(b * std::max(n, m), kThreads), kThreads, 0, stream>>>(
          b, ws, rounds + r * n, rounds + kRounds * n + r * m, rounds_stride);
    MatchUpdateKernel<<<blocks1, kThreads, 0, stream>>>(b, level, p1, p2, ws, match);
    MatchRemainLKernel<<<StrideBlocks(b * n, kThreads), kThreads, 0, stream>>>(b, ws);
    XLA_OPS_RETURN_IF_ERROR(CheckLaunch(op));
  }
  return ffi::Error::Success();
}

ffi::Error ApproxMatchImpl(cudaStream_t stream, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer lengths1,
                           ffi::AnyBuffer lengths2, ffi::Result<ffi::AnyBuffer> match,
                           ffi::Result<ffi::AnyBuffer> workspace) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckApproxMatch(kMatchOp, xyz1, xyz2, lengths1, lengths2, *match, &s1, &s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  if (workspace->element_type() != ffi::F32) return InvalidArgument(kMatchOp, "workspace must be float32");
  if (b == 0) return ffi::Error::Success();
  const int64_t stride = static_cast<int64_t>(workspace->element_count()) / b;
  const int64_t slices = (stride - 2 * (n + m)) / std::max(n, m);
  if (static_cast<int64_t>(workspace->element_count()) != b * stride || slices < 1 ||
      stride != 2 * (n + m) + slices * std::max(n, m))
    return InvalidArgument(kMatchOp, "workspace must be float32 [..., 2 * (n + m) + slices * max(n, m)], got " +
                                         std::to_string(workspace->element_count()) + " elements");
  const MatchWorkspace ws{workspace->typed_data<float>(), stride, n, m, slices};
  float* out = match->typed_data<float>();
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(ZeroAsync(kMatchOp, out, match->size_bytes(), stream));
  XLA_OPS_RETURN_IF_ERROR(RunRounds(kMatchOp, stream, b, n, m, p1, p2, lengths1.typed_data<int32_t>(),
                                    lengths2.typed_data<int32_t>(), ws, out, nullptr, 0));
  MatchNonFiniteKernel<<<static_cast<unsigned int>(std::min(b, kMaxGridX)), kThreads, 0, stream>>>(b, n, m, p1, p2,
                                                                                                  out);
  return CheckLaunch(kMatchOp);
}

// ---- earth_mover_distance (xla_ops_emd): value and gradient without the match ------------------------
//
// The rounds run as in approx_match with match = nullptr, keeping every round's ratio_l / ratio_r (SaveRatios).
// Then match[l, k] = sum_r exp(level_r d2(k, l)) ratio_l_r[k] ratio_r_r[l] is recomputed where needed: by
// EmdGrad1Kernel (one thread per xyz1 point k, like MatchCostGrad1Kernel) and EmdRowKernel (one warp per xyz2
// point l: its cost and grad2, like MatchCostRowKernel / MatchCostGrad2Kernel). 10 exponentials per pair and
// pass, O(B (n + m)) memory. Same sums as approx_match + match_cost + match_cost_grad up to rounding.

struct Levels {
  float v[kRounds];
};

// match[l, k] from the factors; rl / rr point at round 0's ratio_l[k] / ratio_r[l] (rounds `rl_step` /
// `rr_step` apart). Rounds in which row l had no mass are skipped (most of them after a few rounds).
__device__ __forceinline__ float MatchEntry(const Levels& levels, float d2, const float* rl, int64_t rl_step,
                                            const float* rr, int64_t rr_step) {
  float w = 0.0f;
  for (int r = 0; r < kRounds; ++r) {
    const float ratio_r = rr[r * rr_step];
    if (ratio_r != 0.0f) w += expf(levels.v[r] * d2) * rl[r * rl_step] * ratio_r;
  }
  return w;
}

// Per item the workspace holds approx_match's (stride 2 (n + m) + slices * max(n, m)), then the rounds'
// ratio_l [kRounds, n] and ratio_r [kRounds, m], then the row costs [m].
struct EmdLayout {
  int64_t stride, match_part, n, m;
  __host__ __device__ int64_t rounds(int64_t bi) const { return bi * stride + match_part; }
  __host__ __device__ int64_t row_cost(int64_t bi) const { return rounds(bi) + kRounds * (n + m); }
};

// grad1[k] = sum_l match[l, k] (p_k - q_l) / max(|p_k - q_l|, 1e-10): one thread per xyz1 point k, xyz2 and
// its round ratios staged in shared memory tiles.
__global__ void __launch_bounds__(kThreads)
    EmdGrad1Kernel(int64_t b, int64_t n, int64_t m, Levels levels, const float* __restrict__ xyz1,
                   const float* __restrict__ xyz2, const float* __restrict__ ws, EmdLayout layout,
                   float* __restrict__ grad1) {
  __shared__ float4 tile[kThreads];
  __shared__ float tile_rr[kRounds][kThreads];
  const int64_t tiles = CeilDiv(n, kThreads);
  for (int64_t blk = blockIdx.x; blk < b * tiles; blk += gridDim.x) {
    const int64_t bi = blk / tiles, k = (blk - bi * tiles) * kThreads + threadIdx.x;
    const bool valid = k < n;
    const int64_t p = bi * n + k;
    const float x = valid ? xyz1[3 * p] : 0.0f, y = valid ? xyz1[3 * p + 1] : 0.0f, z = valid ? xyz1[3 * p + 2] : 0.0f;
    const float* rounds = ws + layout.rounds(bi);
    float rl[kRounds];
    for (int r = 0; r < kRounds; ++r) rl[r] = valid ? rounds[r * n + k] : 0.0f;
    float gx = 0.0f, gy = 0.0f, gz = 0.0f;
    for (int64_t l0 = 0; l0 < m; l0 += kThreads) {
      const int cnt = static_cast<int>(min(static_cast<int64_t>(kThreads), m - l0));
      LoadTile(tile, xyz2 + bi * m * 3, nullptr, l0, cnt);  // synchronises before and after
      for (int t = threadIdx.x; t < cnt; t += blockDim.x)
        for (int r = 0; r < kRounds; ++r) tile_rr[r][t] = rounds[kRounds * n + r * m + l0 + t];
      __syncthreads();
      if (valid) {
        for (int t = 0; t < cnt; ++t) {
          const float dx = x - tile[t].x, dy = y - tile[t].y, dz = z - tile[t].z;
          const float d2 = dx * dx + dy * dy + dz * dz;
          const float w = MatchEntry(levels, d2, rl, 1, &tile_rr[0][t], kThreads);
          const float s = w / fmaxf(sqrtf(d2), 1e-10f);
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

// Row l of item bi (q = bi * m + l): row_cost[q] = sum_k match[l, k] |p_k - q_l| and grad2[l] = sum_k match[l, k]
// (q_l - p_k) / max(|q_l - p_k|, 1e-10); one warp per row, reduced with shuffles in a fixed order.
__global__ void EmdRowKernel(int64_t b, int64_t n, int64_t m, Levels levels, const float* __restrict__ xyz1,
                             const float* __restrict__ xyz2, float* __restrict__ ws, EmdLayout layout,
                             float* __restrict__ grad2) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  // Warp-uniform loop: every lane of a warp runs the same iterations, so the full-mask shuffles are safe.
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); q < b * m;
       q += warps) {
    const int64_t bi = q / m, l = q - bi * m;
    const float x = xyz2[3 * q], y = xyz2[3 * q + 1], z = xyz2[3 * q + 2];
    const float* p1 = xyz1 + bi * n * 3;
    const float* rounds = ws + layout.rounds(bi);
    float rr[kRounds];
    bool any = false;
    for (int r = 0; r < kRounds; ++r) rr[r] = rounds[kRounds * n + r * m + l], any |= rr[r] != 0.0f;
    float cost = 0.0f, gx = 0.0f, gy = 0.0f, gz = 0.0f;
    if (any) {  // warp-uniform
      for (int64_t k = lane; k < n; k += 32) {
        const float dx = x - p1[3 * k], dy = y - p1[3 * k + 1], dz = z - p1[3 * k + 2];
        const float d2 = dx * dx + dy * dy + dz * dz;
        const float w = MatchEntry(levels, d2, rounds + k, n, rr, 1);
        const float dist = sqrtf(d2);
        cost += w * dist;
        const float s = w / fmaxf(dist, 1e-10f);
        gx += s * dx;
        gy += s * dy;
        gz += s * dz;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      cost += __shfl_down_sync(0xffffffffu, cost, off);
      gx += __shfl_down_sync(0xffffffffu, gx, off);
      gy += __shfl_down_sync(0xffffffffu, gy, off);
      gz += __shfl_down_sync(0xffffffffu, gz, off);
    }
    if (lane == 0) {
      ws[layout.row_cost(bi) + l] = cost;
      grad2[3 * q] = gx;
      grad2[3 * q + 1] = gy;
      grad2[3 * q + 2] = gz;
    }
  }
}

// cost[bi] = sum of item bi's row costs (fixed order, BlockSum); an item with a NaN/Inf coordinate gets NaN
// cost and gradients (approx_match's rule: its match is all NaN).
__global__ void __launch_bounds__(kThreads)
    EmdFinishKernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1, const float* __restrict__ xyz2,
                    const float* __restrict__ ws, EmdLayout layout, float* __restrict__ cost,
                    float* __restrict__ grad1, float* __restrict__ grad2) {
  __shared__ float reduce[32];
  for (int64_t bi = blockIdx.x; bi < b; bi += gridDim.x) {
    float acc = 0.0f;
    for (int64_t l = threadIdx.x; l < m; l += blockDim.x) acc += ws[layout.row_cost(bi) + l];
    acc = BlockSum(acc, reduce);
    int bad = 0;
    for (int64_t t = threadIdx.x; t < 3 * n; t += blockDim.x) bad |= !isfinite(xyz1[bi * n * 3 + t]);
    for (int64_t t = threadIdx.x; t < 3 * m; t += blockDim.x) bad |= !isfinite(xyz2[bi * m * 3 + t]);
    if (__syncthreads_or(bad)) {  // block-uniform
      for (int64_t t = threadIdx.x; t < 3 * n; t += blockDim.x) grad1[bi * n * 3 + t] = NAN;
      for (int64_t t = threadIdx.x; t < 3 * m; t += blockDim.x) grad2[bi * m * 3 + t] = NAN;
      acc = NAN;
    }
    if (threadIdx.x == 0) cost[bi] = acc;
  }
}

// with_grad = 0: the cost only (grad1 is zeroed instead of computed; EmdRowKernel's grad2 comes for free).
ffi::Error EmdImpl(cudaStream_t stream, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer lengths1,
                   ffi::AnyBuffer lengths2, int32_t with_grad, ffi::Result<ffi::AnyBuffer> cost,
                   ffi::Result<ffi::AnyBuffer> grad1, ffi::Result<ffi::AnyBuffer> grad2,
                   ffi::Result<ffi::AnyBuffer> workspace) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckEmd(kEmdOp, xyz1, xyz2, lengths1, lengths2, *cost, *grad1, *grad2, &s1, &s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  if (workspace->element_type() != ffi::F32) return InvalidArgument(kEmdOp, "workspace must be float32");
  if (b == 0) return ffi::Error::Success();
  const int64_t stride = static_cast<int64_t>(workspace->element_count()) / b;
  const int64_t extra = kRounds * (n + m) + m;
  const int64_t slices = (stride - extra - 2 * (n + m)) / std::max(n, m);
  if (static_cast<int64_t>(workspace->element_count()) != b * stride || slices < 1 ||
      stride != 2 * (n + m) + slices * std::max(n, m) + extra)
    return InvalidArgument(kEmdOp, "workspace must be float32 [..., 2 * (n + m) + slices * max(n, m) + " +
                                       std::to_string(kRounds) + " * (n + m) + m], got " +
                                       std::to_string(workspace->element_count()) + " elements");
  float* base = workspace->typed_data<float>();
  const MatchWorkspace ws{base, stride, n, m, slices};
  const EmdLayout layout{stride, stride - extra, n, m};
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(RunRounds(kEmdOp, stream, b, n, m, p1, p2, lengths1.typed_data<int32_t>(),
                                    lengths2.typed_data<int32_t>(), ws, nullptr, base + layout.rounds(0), stride));
  Levels levels;
  for (int r = 0; r < kRounds; ++r) levels.v[r] = Level(r);
  if (with_grad != 0) {
    EmdGrad1Kernel<<<TileBlocks(b, n), kThreads, 0, stream>>>(b, n, m, levels, p1, p2, base, layout,
                                                               grad1->typed_data<float>());
    XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kEmdOp));
  } else {
    XLA_OPS_RETURN_IF_ERROR(ZeroAsync(kEmdOp, grad1->typed_data<float>(), grad1->size_bytes(), stream));
  }
  constexpr int kWarpsPerBlock = kThreads / 32;
  EmdRowKernel<<<StrideBlocks(b * m, kWarpsPerBlock), kThreads, 0, stream>>>(b, n, m, levels, p1, p2, base, layout,
                                                                            grad2->typed_data<float>());
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kEmdOp));
  EmdFinishKernel<<<static_cast<unsigned int>(std::min(b, kMaxGridX)), kThreads, 0, stream>>>(
      b, n, m, p1, p2, base, layout, cost->typed_data<float>(), grad1->typed_data<float>(), grad2->typed_data<float>());
  return CheckLaunch(kEmdOp);
}

// ---- match_cost -----------------------------------------------------------------------------------

// row_cost[q] = sum_k match[l, k] ||p_k - q_l|| for xyz2 point l (q = bi * m + l): one warp per row, reading
// it contiguously, reduced with shuffles in a fixed order.
__global__ void MatchCostRowKernel(int64_t b, int64_t n, int64_t m, const float* __restrict__ xyz1,
                                   const float* __restrict__ xyz2, const float* __restrict__ match,
                                   float* __restrict__ row_cost) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  // Warp-uniform loop: every lane of a warp runs the same iterations, so the full-mask shuffles are safe.
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); q < b * m;
       q += warps) {
    const int64_t bi = q / m;
    const float x = xyz2[3 * q], y = xyz2[3 * q + 1], z = xyz2[3 * q + 2];
    const float* row = match + q * n;
    const float* p1 = xyz1 + bi * n * 3;
    float acc = 0.0f;
    for (int64_t k = lane; k < n; k += 32) {
      const float dx = p1[3 * k] - x, dy = p1[3 * k + 1] - y, dz = p1[3 * k + 2] - z;
      acc += row[k] * sqrtf(dx * dx + dy * dy + dz * dz);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) row_cost[q] = acc;
  }
}

// cost[bi] = sum of the m row costs of item bi: one block per item, fixed summation order (BlockSum).
__global__ void __launch_bounds__(kThreads)
    MatchCostFinishKernel(int64_t b, int64_t m, const float* __restrict__ row_cost, float* __restrict__ cost) {
  __shared__ float reduce[32];
  for (int64_t bi = blockIdx.x; bi < b; bi += gridDim.x) {
    float acc = 0.0f;
    for (int64_t l = threadIdx.x; l < m; l += blockDim.x) acc += row_cost[bi * m + l];
    acc = BlockSum(acc, reduce);
    if (threadIdx.x == 0) cost[bi] = acc;
  }
}

ffi::Error MatchCostImpl(cudaStream_t stream, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer match,
                         ffi::Result<ffi::AnyBuffer> cost, ffi::Result<ffi::AnyBuffer> row_cost) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckMatchCost(kCostOp, xyz1, xyz2, match, *cost, *row_cost, &s1, &s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
  if (b == 0) return ffi::Error::Success();
  constexpr int kWarpsPerBlock = kThreads / 32;
  MatchCostRowKernel<<<StrideBlocks(b * m, kWarpsPerBlock), kThreads, 0, stream>>>(
      b, n, m, xyz1.typed_data<float>(), xyz2.typed_data<float>(), match.typed_data<float>(),
      row_cost->typed_data<float>());
  XLA_OPS_RETURN_IF_ERROR(CheckLaunch(kCostOp));
  MatchCostFinishKernel<<<static_cast<unsigned int>(std::min(b, kMaxGridX)), kThreads, 0, stream>>>(
      b, m, row_cost->typed_data<float>(), cost->typed_data<float>());
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
  XLA_OPS_RETURN_IF_ERROR(CheckMatchCostGrad(kCostGradOp, xyz1, xyz2, match, *grad1, *grad2, &s1, &s2));
  const int64_t b = s1.b, n = s1.n, m = s2.n;
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

// All of them only enqueue kernels on XLA's stream, with launch parameters that depend on shapes alone and
// no host synchronisation or allocation: XLA may capture them into CUDA graphs (command buffers).
XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxMatchCuda, ApproxMatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()   // xyz1
                                  .Arg<ffi::AnyBuffer>()   // xyz2
                                  .Arg<ffi::AnyBuffer>()   // lengths1 (int32 [...])
                                  .Arg<ffi::AnyBuffer>()   // lengths2
                                  .Ret<ffi::AnyBuffer>()   // match
                                  .Ret<ffi::AnyBuffer>(),  // workspace
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kMatchOp, ApproxMatchCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostCuda, MatchCostImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()   // cost
                                  .Ret<ffi::AnyBuffer>(),  // workspace: row costs
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kCostOp, MatchCostCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostGradCuda, MatchCostGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kCostGradOp, MatchCostGradCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmdCuda, EmdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()   // xyz1
                                  .Arg<ffi::AnyBuffer>()   // xyz2
                                  .Arg<ffi::AnyBuffer>()   // lengths1 (int32 [...])
                                  .Arg<ffi::AnyBuffer>()   // lengths2
                                  .Attr<int32_t>("with_grad")
                                  .Ret<ffi::AnyBuffer>()   // cost
                                  .Ret<ffi::AnyBuffer>()   // grad1
                                  .Ret<ffi::AnyBuffer>()   // grad2
                                  .Ret<ffi::AnyBuffer>(),  // workspace
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kEmdOp, EmdCuda);

}  // namespace cuda
}  // namespace xla_ops
