// knn on CUDA: the k nearest ref points of every query, ascending by (squared distance, index), with the
// CPU handler's exact semantics: ties go to the lowest index, NaN distances count as +inf, and distances are
// distance.h's SqDistC (8 partial sums over the channels, combined pairwise, no FMA), so they match the CPU
// bit for bit.
//
// One thread per query; the block stages tiles of the ref set in (dynamic) shared memory, which every thread
// then reads with broadcasts. Each query is read from global memory once: into registers for the channel
// counts the model uses (KnnRegisterKernel<3, 32, 64>, as PyTorch3D's KNearestNeighborKernelV1 does for
// D <= 32), otherwise into shared memory transposed to [channel][thread] with a row stride of kThreads + 1
// (consecutive threads read consecutive words, and the staging writes hit distinct banks: no bank conflicts) when C <= kMaxSharedQueryChannels, and only beyond that from global
// memory. Each thread keeps its sorted top-k list directly in its rows of the outputs (k is a runtime value,
// possibly large) and only touches them when a candidate beats the current k-th entry, which it keeps in
// registers: on random data that happens O(k log(N/k)) times per query, so the hot loop is the distance and
// one compare.
#include "cuda_common.cuh"
#include "distance.h"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kOp = "xla_ops_knn";
constexpr int kThreads = 128;                  // queries per block
constexpr int kMaxTilePoints = 256;            // ref points per shared-memory tile
constexpr int64_t kSharedFloats = 12288;       // 48 KiB of shared memory per block (no opt-in needed)
constexpr int64_t kMaxSharedQueryChannels = 64;  // generic kernel: queries in shared memory up to this C
constexpr int64_t kQueryStride = kThreads + 1;  // row stride of the transposed query tile
constexpr int32_t kEmpty = 0x7fffffff;  // index of a slot not filled yet (sorts after every real index)

// The sorted top-k row of one query (od, oi: its rows of the outputs) and its current k-th entry.
struct TopK {
  float* od;
  int32_t* oi;
  int32_t k;
  float worst = INFINITY;
  int32_t worst_i = kEmpty;

  __device__ void Reset() {
    for (int32_t s = 0; s < k; ++s) {
      od[s] = INFINITY;
      oi[s] = kEmpty;
    }
  }
  // Candidates arrive in increasing index order: (d, j) enters iff it is below the k-th entry.
  __device__ __forceinline__ void Push(float d, int32_t j) {
    if (d != d) d = INFINITY;  // NaN
    if (d > worst || (d == worst && j > worst_i)) return;
    int32_t pos = k - 1;
    while (pos > 0 && (od[pos - 1] > d || (od[pos - 1] == d && oi[pos - 1] > j))) {
      od[pos] = od[pos - 1];
      oi[pos] = oi[pos - 1];
      --pos;
    }
    od[pos] = d;
    oi[pos] = j;
    worst = od[k - 1];
    worst_i = oi[k - 1];
  }
};

// Copies `count` ref points ([count, c] floats from global memory) into the shared tile.
__device__ __forceinline__ void StageRefs(float* tile, const float* src, int64_t floats) {
  __syncthreads();  // the previous tile is no longer read
  for (int64_t t = threadIdx.x; t < floats; t += blockDim.x) tile[t] = src[t];
  __syncthreads();
}

// query [b, m, kC], ref [b, n, kC] -> dist, idx [b, m, k]; the query lives in registers. Dynamic shared
// memory: tile_points * kC floats.
template <int kC>
__global__ void __launch_bounds__(kThreads)
    KnnRegisterKernel(int64_t b, int64_t m, int64_t n, int32_t k, int tile_points, const float* __restrict__ query,
                      const float* __restrict__ ref, float* __restrict__ dist, int32_t* __restrict__ idx) {
  extern __shared__ float4 tile4[];  // float4: 16-byte aligned, so a point (kC % 4 == 0) reads as float4s
  float* tile = reinterpret_cast<float*>(tile4);
  const int64_t tiles_per_item = CeilDiv(m, kThreads);
  // Block-uniform loop over (batch item, query tile) pairs, so the barriers in StageRefs are safe.
  for (int64_t blk = blockIdx.x; blk < b * tiles_per_item; blk += gridDim.x) {
    const int64_t bi = blk / tiles_per_item;
    const int64_t i = (blk - bi * tiles_per_item) * kThreads + threadIdx.x;
    const bool valid = i < m;
    const int64_t q = bi * m + i;
    float qv[kC];
#pragma unroll
    for (int ch = 0; ch < kC; ++ch) qv[ch] = valid ? query[q * kC + ch] : 0.0f;
    TopK top{dist + q * k, idx + q * k, k};
    if (valid) top.Reset();
    const float* r = ref + bi * n * kC;
    for (int64_t j0 = 0; j0 < n; j0 += tile_points) {
      const int count = static_cast<int>(min(static_cast<int64_t>(tile_points), n - j0));
      StageRefs(tile, r + j0 * kC, static_cast<int64_t>(count) * kC);
      if (!valid) continue;
      for (int t = 0; t < count; ++t) {
        const float* cand = tile + t * kC;
        float s[kDistPartials] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        if constexpr (kC % 4 == 0) {  // 128-bit shared-memory loads: a quarter of the load instructions
          const float4* c4 = reinterpret_cast<const float4*>(cand);
#pragma unroll
          for (int v = 0; v < kC / 4; ++v) {
            const float4 r4 = c4[v];
            AddSquare(s[(4 * v) % kDistPartials], qv[4 * v], r4.x);
            AddSquare(s[(4 * v + 1) % kDistPartials], qv[4 * v + 1], r4.y);
            AddSquare(s[(4 * v + 2) % kDistPartials], qv[4 * v + 2], r4.z);
            AddSquare(s[(4 * v + 3) % kDistPartials], qv[4 * v + 3], r4.w);
          }
        } else {
#pragma unroll
          for (int ch = 0; ch < kC; ++ch) AddSquare(s[ch % kDistPartials], qv[ch], cand[ch]);
        }
        top.Push(CombinePartials(s), static_cast<int32_t>(j0 + t));
      }
    }
  }
}

// Any channel count. Dynamic shared memory: [ref tile: tile_points * c floats if refs_in_shared]
// [queries: c * kQueryStride floats, transposed, if queries_in_shared]. Both flags are uniform over the grid.
__global__ void __launch_bounds__(kThreads)
    KnnGenericKernel(int64_t b, int64_t m, int64_t n, int64_t c, int32_t k, int tile_points, bool refs_in_shared,
                     bool queries_in_shared, const float* __restrict__ query, const float* __restrict__ ref,
                     float* __restrict__ dist, int32_t* __restrict__ idx) {
  extern __shared__ float shared[];
  float* tile = shared;
  float* qs = shared + (refs_in_shared ? static_cast<int64_t>(tile_points) * c : 0);
  const int64_t tiles_per_item = CeilDiv(m, kThreads);
  for (int64_t blk = blockIdx.x; blk < b * tiles_per_item; blk += gridDim.x) {
    const int64_t bi = blk / tiles_per_item;
    const int64_t i0 = (blk - bi * tiles_per_item) * kThreads;
    const int64_t i = i0 + threadIdx.x;
    const bool valid = i < m;
    const int64_t q = bi * m + i;
    // This thread's query channel ch is at qp[ch * q_stride].
    const float* qp = query + q * c;
    int64_t q_stride = 1;
    if (queries_in_shared) {
      __syncthreads();  // the previous block tile's queries are no longer read
      // Coalesced read of the block's [rows, c] queries, written transposed: qs[ch * kQueryStride + row].
      const int64_t rows = min(static_cast<int64_t>(kThreads), m - i0);
      const float* src = query + (bi * m + i0) * c;
      for (int64_t t = threadIdx.x; t < rows * c; t += kThreads) qs[(t % c) * kQueryStride + t / c] = src[t];
      __syncthreads();
      qp = qs + threadIdx.x;
      q_stride = kQueryStride;
    }
    TopK top{dist + q * k, idx + q * k, k};
    if (valid) top.Reset();
    const float* r = ref + bi * n * c;
    for (int64_t j0 = 0; j0 < n; j0 += tile_points) {
      const int count = static_cast<int>(min(static_cast<int64_t>(tile_points), n - j0));
      const float* cand = r + j0 * c;
      if (refs_in_shared) {
        StageRefs(tile, cand, static_cast<int64_t>(count) * c);
        cand = tile;
      }
      if (!valid) continue;
      for (int t = 0; t < count; ++t, cand += c) {
        float s[kDistPartials] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        int64_t ch = 0;
        for (; ch + kDistPartials <= c; ch += kDistPartials) {
#pragma unroll
          for (int l = 0; l < kDistPartials; ++l) AddSquare(s[l], qp[(ch + l) * q_stride], cand[ch + l]);
        }
#pragma unroll
        for (int l = 0; l < kDistPartials; ++l) {
          if (ch + l < c) AddSquare(s[l], qp[(ch + l) * q_stride], cand[ch + l]);
        }
        top.Push(CombinePartials(s), static_cast<int32_t>(j0 + t));
      }
    }
  }
}

template <int kC>
void LaunchRegister(unsigned int grid, cudaStream_t stream, int64_t b, int64_t m, int64_t n, int32_t k,
                    const float* pq, const float* pr, float* od, int32_t* oi) {
  constexpr int tile_points = static_cast<int>(std::min<int64_t>(kMaxTilePoints, kSharedFloats / kC));
  KnnRegisterKernel<kC><<<grid, kThreads, tile_points * kC * sizeof(float), stream>>>(b, m, n, k, tile_points, pq,
                                                                                    pr, od, oi);
}

ffi::Error KnnImpl(cudaStream_t stream, ffi::AnyBuffer query, ffi::AnyBuffer ref, int32_t k,
                   ffi::Result<ffi::AnyBuffer> dist, ffi::Result<ffi::AnyBuffer> idx) {
  PointShape sq, sr;
  XLA_OPS_RETURN_IF_ERROR(CheckKnn(kOp, query, ref, k, *dist, *idx, &sq, &sr));
  const int64_t blocks = sq.b * CeilDiv(sq.n, kThreads);
  if (blocks == 0) return ffi::Error::Success();

  const int64_t c = sq.c;
  const unsigned int grid = static_cast<unsigned int>(std::min(blocks, kMaxGridX));
  const float* pq = query.typed_data<float>();
  const float* pr = ref.typed_data<float>();
  float* od = dist->typed_data<float>();
  int32_t* oi = idx->typed_data<int32_t>();
  const int64_t b = sq.b, m = sq.n, n = sr.n;
  if (c == 3) {
    LaunchRegister<3>(grid, stream, b, m, n, k, pq, pr, od, oi);
  } else if (c == 32) {
    LaunchRegister<32>(grid, stream, b, m, n, k, pq, pr, od, oi);
  } else if (c == 64) {
    LaunchRegister<64>(grid, stream, b, m, n, k, pq, pr, od, oi);
  } else {
    const bool queries_in_shared = c <= kMaxSharedQueryChannels;
    const int64_t budget = kSharedFloats - (queries_in_shared ? c * kQueryStride : 0);  // floats left for refs
    const bool refs_in_shared = budget >= c;
    const int tile_points = refs_in_shared ? static_cast<int>(std::min<int64_t>(kMaxTilePoints, budget / c))
                                           : kMaxTilePoints;
    const size_t shared_bytes =
        static_cast<size_t>((refs_in_shared ? tile_points * c : 0) + (queries_in_shared ? c * kQueryStride : 0)) *
        sizeof(float);
    KnnGenericKernel<<<grid, kThreads, shared_bytes, stream>>>(b, m, n, c, k, tile_points, refs_in_shared,
                                                               queries_in_shared, pq, pr, od, oi);
  }
  return CheckLaunch(kOp);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KnnCuda, KnnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("k")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kOp, KnnCuda);

}  // namespace cuda
}  // namespace xla_ops
