// farthest_point_sample on CUDA: one block per batch item. Every point keeps its running minimum squared
// distance to the selected set (in the workspace output, each thread owning a strided subset of the points); each
// step updates it against the last pick and a block-wide (value, index) argmax picks the next point.
// The argmax prefers the lower index on equal values both inside a thread (strict > over increasing
// indices) and in the reduction, so ties go to the lowest global index, like the CPU handler (the original
// kernel only tie-broke within threads). As on CPU the running distance starts at +inf (1e38 in the
// original), and a NaN distance never replaces it. A picked point's distance is set to -1, so it is never
// picked again whatever its coordinates (NaN, or identical points). Distances are bit-identical to the CPU handler's
// (SqDist3), so near-ties resolve the same way.
#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kFpsOp = "xla_ops_farthest_point_sample";

// blockDim.x: a multiple of 32, at most 1024. mind: [b, n] workspace.
__global__ void FpsKernel(int64_t b, int64_t n, int32_t npoint, const float* __restrict__ xyz,
                          float* __restrict__ mind, int32_t* __restrict__ idx) {
  __shared__ float warp_best[32];
  __shared__ int warp_best_i[32];
  __shared__ int picked;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t bi = blockIdx.x; bi < b; bi += gridDim.x) {
    const float* p = xyz + bi * n * 3;
    float* d = mind + bi * n;
    int32_t* out = idx + bi * static_cast<int64_t>(npoint);
    // Each thread initialises and later updates only its own points, so no barrier is needed here.
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = INFINITY;
    if (threadIdx.x == 0) out[0] = 0;
    int64_t last = 0;
    for (int32_t j = 1; j < npoint; ++j) {
      const float lx = p[3 * last], ly = p[3 * last + 1], lz = p[3 * last + 2];
      float best = -INFINITY;
      int best_i = 0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float di = SqDist3(p[3 * i], p[3 * i + 1], p[3 * i + 2], lx, ly, lz);
        float m = d[i];
        if (i == last) {  // retire the pick (owned by this thread): never the max again
          m = -1.0f;
          d[i] = m;
        } else if (di < m) {
          m = di;
          d[i] = m;
        }
        if (m > best) {  // strict: the lowest index of this thread's subset wins a tie
          best = m;
          best_i = static_cast<int>(i);
        }
      }
      for (int off = 16; off > 0; off >>= 1) {
        const float other = __shfl_down_sync(0xffffffffu, best, off);
        const int other_i = __shfl_down_sync(0xffffffffu, best_i, off);
        ArgmaxMerge(best, best_i, other, other_i);
      }
      if (lane == 0) {
        warp_best[warp] = best;
        warp_best_i[warp] = best_i;
      }
      __syncthreads();
      if (warp == 0) {
        best = lane < warps ? warp_best[lane] : -INFINITY;
        best_i = lane < warps ? warp_best_i[lane] : 0;
        for (int off = 16; off > 0; off >>= 1) {
          const float other = __shfl_down_sync(0xffffffffu, best, off);
          const int other_i = __shfl_down_sync(0xffffffffu, best_i, off);
          ArgmaxMerge(best, best_i, other, other_i);
        }
        if (lane == 0) {
          picked = best_i;
          out[j] = best_i;
        }
      }
      __syncthreads();  // `picked` is visible; warp_best may be rewritten in the next step
      last = picked;
    }
    __syncthreads();  // `picked` is read by every thread before the next batch item rewrites it
  }
}

ffi::Error FpsImpl(cudaStream_t stream, ffi::AnyBuffer xyz, int32_t npoint, ffi::Result<ffi::AnyBuffer> idx,
                   ffi::Result<ffi::AnyBuffer> workspace) {
  // The running minimum distances [b, n] live in a workspace output (not XLA scratch: command buffers).
  PointShape s;
  XLA_OPS_RETURN_IF_ERROR(CheckFarthestPointSample(kFpsOp, xyz, npoint, *idx, *workspace, &s));
  if (s.b == 0) return ffi::Error::Success();
  float* mind = workspace->typed_data<float>();
  // Enough threads to cover the points once (rounded to warps), at most 1024.
  const int threads = static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, CeilDiv(s.n, 32) * 32)));
  const unsigned int blocks = static_cast<unsigned int>(std::min<int64_t>(s.b, kMaxGridX));
  FpsKernel<<<blocks, threads, 0, stream>>>(s.b, s.n, npoint, xyz.typed_data<float>(), mind,
                                             idx->typed_data<int32_t>());
  return CheckLaunch(kFpsOp);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FarthestPointSampleCuda, FpsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoint")
                                  .Ret<ffi::AnyBuffer>()   // idx
                                  .Ret<ffi::AnyBuffer>(),  // workspace [..., N] float32
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kFpsOp, FarthestPointSampleCuda);

}  // namespace cuda
}  // namespace xla_ops
