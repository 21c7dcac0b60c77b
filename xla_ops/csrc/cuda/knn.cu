// knn on CUDA: the k nearest ref points of every query, ascending by (squared distance, index), with the
// CPU handler's exact semantics: ties go to the lowest index, NaN distances count as +inf, and distances
// sum (ref_c - query_c)^2 over channels in order without FMA contraction, so they match the CPU bit for bit.
//
// One thread per query; the block stages tiles of the ref set in (dynamic) shared memory. Each thread keeps
// its sorted top-k list directly in its rows of the outputs (k is a runtime value, possibly large) and
// only touches them when a candidate beats the current k-th entry, which it keeps in registers: on random
// data that happens O(k log(N/k)) times per query, so the hot loop is the distance and one compare.
#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kOp = "xla_ops_knn";
constexpr int kThreads = 128;            // queries per block
constexpr int kMaxTilePoints = 256;      // ref points per shared-memory tile
constexpr int64_t kSharedFloats = 8192;  // 32 KiB tile budget; wider points are read from global memory

// query [b, m, c], ref [b, n, c] -> dist, idx [b, m, k]. kC > 0: compile-time channel count (c == kC).
// use_shared is uniform over the grid, so the barriers inside its branch are safe.
template <int kC>
__global__ void __launch_bounds__(kThreads)
    KnnKernel(int64_t b, int64_t m, int64_t n, int64_t c, int32_t k, int tile_points, bool use_shared,
              const float* __restrict__ query, const float* __restrict__ ref, float* __restrict__ dist,
              int32_t* __restrict__ idx) {
  extern __shared__ float tile[];
  constexpr int32_t kEmpty = 0x7fffffff;  // index of a slot not filled yet (sorts after every real index)
  const int64_t ch_count = kC > 0 ? kC : c;
  const int64_t tiles_per_item = CeilDiv(m, kThreads);
  for (int64_t blk = blockIdx.x; blk < b * tiles_per_item; blk += gridDim.x) {
    const int64_t bi = blk / tiles_per_item;
    const int64_t i = (blk - bi * tiles_per_item) * kThreads + threadIdx.x;
    const bool valid = i < m;
    const int64_t q = bi * m + i;
    const float* qp = query + q * ch_count;
    float qv[kC > 0 ? kC : 1];
    if constexpr (kC > 0) {
#pragma unroll
      for (int ch = 0; ch < kC; ++ch) qv[ch] = valid ? qp[ch] : 0.0f;
    }
    float* od = dist + q * k;
    int32_t* oi = idx + q * k;
    if (valid) {
      for (int32_t s = 0; s < k; ++s) {
        od[s] = INFINITY;
        oi[s] = kEmpty;
      }
    }
    float worst = INFINITY;
    int32_t worst_i = kEmpty;
    const float* r = ref + bi * n * ch_count;
    for (int64_t j0 = 0; j0 < n; j0 += tile_points) {
      const int count = static_cast<int>(min(static_cast<int64_t>(tile_points), n - j0));
      const float* cand = r + j0 * ch_count;
      if (use_shared) {
        __syncthreads();  // the previous tile is no longer read
        for (int64_t t = threadIdx.x; t < count * ch_count; t += kThreads) tile[t] = cand[t];
        __syncthreads();
        cand = tile;
      }
      if (!valid) continue;
      for (int t = 0; t < count; ++t, cand += ch_count) {
        float acc = 0.0f;
        if constexpr (kC > 0) {
#pragma unroll
          for (int ch = 0; ch < kC; ++ch) {
            const float diff = cand[ch] - qv[ch];
            acc = __fadd_rn(acc, __fmul_rn(diff, diff));
          }
        } else {
          for (int64_t ch = 0; ch < ch_count; ++ch) {
            const float diff = cand[ch] - qp[ch];
            acc = __fadd_rn(acc, __fmul_rn(diff, diff));
          }
        }
        if (acc != acc) acc = INFINITY;  // NaN
        const int32_t j = static_cast<int32_t>(j0 + t);
        if (acc > worst || (acc == worst && j > worst_i)) continue;
        int32_t pos = k - 1;
        while (pos > 0 && (od[pos - 1] > acc || (od[pos - 1] == acc && oi[pos - 1] > j))) {
          od[pos] = od[pos - 1];
          oi[pos] = oi[pos - 1];
          --pos;
        }
        od[pos] = acc;
        oi[pos] = j;
        worst = od[k - 1];
        worst_i = oi[k - 1];
      }
    }
  }
}

ffi::Error KnnImpl(cudaStream_t stream, ffi::AnyBuffer query, ffi::AnyBuffer ref, int32_t k,
                   ffi::Result<ffi::AnyBuffer> dist, ffi::Result<ffi::AnyBuffer> idx) {
  auto sq = PointsOf(kOp, "query", query, ffi::F32);
  if (sq.has_error()) return sq.error();
  auto sr = PointsOf(kOp, "ref", ref, ffi::F32);
  if (sr.has_error()) return sr.error();
  XLA_OPS_RETURN_IF_ERROR(CheckSameBatch(kOp, "query", *sq, "ref", *sr));
  if (sq->c != sr->c || sq->c < 1)
    return InvalidArgument(kOp, "query and ref must have the same channel count >= 1, got " +
                                    std::to_string(sq->c) + " and " + std::to_string(sr->c));
  if (k < 1 || k > sr->n)
    return InvalidArgument(kOp, "k must be in [1, N=" + std::to_string(sr->n) + "], got " + std::to_string(k));
  const int64_t rows = sq->b * sq->n;
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "dist", *dist, ffi::F32, rows * k));
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "idx", *idx, ffi::S32, rows * k));
  const int64_t blocks = sq->b * CeilDiv(sq->n, kThreads);
  if (blocks == 0) return ffi::Error::Success();

  const int64_t c = sq->c;
  const bool use_shared = c <= kSharedFloats;
  const int tile_points = use_shared ? static_cast<int>(std::min<int64_t>(kMaxTilePoints, kSharedFloats / c))
                                     : kMaxTilePoints;
  const size_t shared_bytes = use_shared ? static_cast<size_t>(tile_points) * c * sizeof(float) : 0;
  const unsigned int grid = static_cast<unsigned int>(std::min(blocks, kMaxGridX));
  const float* pq = query.typed_data<float>();
  const float* pr = ref.typed_data<float>();
  float* od = dist->typed_data<float>();
  int32_t* oi = idx->typed_data<int32_t>();
  if (c == 3) {
    KnnKernel<3><<<grid, kThreads, shared_bytes, stream>>>(sq->b, sq->n, sr->n, c, k, tile_points, use_shared, pq,
                                                          pr, od, oi);
  } else {
    KnnKernel<0><<<grid, kThreads, shared_bytes, stream>>>(sq->b, sq->n, sr->n, c, k, tile_points, use_shared, pq,
                                                          pr, od, oi);
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
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kOp, KnnCuda);

}  // namespace cuda
}  // namespace xla_ops
