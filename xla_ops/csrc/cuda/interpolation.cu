// Interpolation ops on CUDA: three_nn, three_interpolate and its gradient.
//  * three_nn: shared-memory tiled brute force keeping the 3 best in registers (nearest.cuh): ascending
//    squared distances, ties to the lowest index, with fewer than 3 known points the rest is (+inf, 0).
//  * three_interpolate: one thread per output element, out[b, i, c] = sum_s weight[b, i, s] *
//    features[b, idx[b, i, s], c] summed over s = 0, 1, 2 in order. An index outside [0, m) contributes zero
//    (docs/ops.md: the CPU handler reports it as INVALID_ARGUMENT, which a kernel cannot do without a sync).
//  * three_interpolate_grad: scatter-add of weight * grad_out with atomicAdd into a zeroed output, so the
//    float summation order (the last bits of the result) can vary between runs.
#include "nearest.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kThreeNnOp = "xla_ops_three_nn";
constexpr const char* kInterpOp = "xla_ops_three_interpolate";
constexpr const char* kInterpGradOp = "xla_ops_three_interpolate_grad";
constexpr int kThreads = 256;

ffi::Error ThreeNnImpl(cudaStream_t stream, ffi::AnyBuffer unknown, ffi::AnyBuffer known,
                       ffi::Result<ffi::AnyBuffer> dist, ffi::Result<ffi::AnyBuffer> idx) {
  PointShape su, sk;
  XLA_OPS_RETURN_IF_ERROR(CheckThreeNn(kThreeNnOp, unknown, known, *dist, *idx, &su, &sk));
  return LaunchNearestK<3>(kThreeNnOp, stream, su.b, su.n, sk.n, unknown.typed_data<float>(),
                           known.typed_data<float>(), dist->typed_data<float>(), idx->typed_data<int32_t>());
}

// ---- three_interpolate and its gradient ----------------------------------------------------------

// features [b, m, c], idx / weight [b, n, 3] -> out [b, n, c].
__global__ void ThreeInterpolateKernel(int64_t b, int64_t m, int64_t n, int64_t c,
                                       const float* __restrict__ features, const int32_t* __restrict__ idx,
                                       const float* __restrict__ weight, float* __restrict__ out) {
  XLA_OPS_GRID_STRIDE(t, b * n * c) {
    const int64_t row = t / c, ch = t - row * c;  // row = bi * n + i
    const int64_t bi = row / n;
    const float* f = features + bi * m * c + ch;
    float acc = 0.0f;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const int32_t j = idx[3 * row + s];
      if (j >= 0 && j < m) acc += weight[3 * row + s] * f[j * c];
    }
    out[t] = acc;
  }
}

// grad_out [b, n, c], idx / weight [b, n, 3] -> grad_features [b, m, c] (zeroed before the launch).
__global__ void ThreeInterpolateGradKernel(int64_t b, int64_t m, int64_t n, int64_t c,
                                           const float* __restrict__ grad_out, const int32_t* __restrict__ idx,
                                           const float* __restrict__ weight, float* __restrict__ grad_features) {
  XLA_OPS_GRID_STRIDE(t, b * n * c) {
    const int64_t row = t / c, ch = t - row * c;
    const int64_t bi = row / n;
    const float g = grad_out[t];
    float* gf = grad_features + bi * m * c + ch;
#pragma unroll
    for (int s = 0; s < 3; ++s) {
      const int32_t j = idx[3 * row + s];
      if (j >= 0 && j < m) atomicAdd(gf + j * c, weight[3 * row + s] * g);
    }
  }
}

ffi::Error ThreeInterpolateImpl(cudaStream_t stream, ffi::AnyBuffer features, ffi::AnyBuffer idx,
                                ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> out) {
  PointShape sf, si;
  XLA_OPS_RETURN_IF_ERROR(CheckThreeInterpolate(kInterpOp, features, idx, weight, *out, &sf, &si));
  const int64_t total = si.b * si.n * sf.c;
  if (total == 0) return ffi::Error::Success();
  ThreeInterpolateKernel<<<StrideBlocks(total, kThreads), kThreads, 0, stream>>>(
      sf.b, sf.n, si.n, sf.c, features.typed_data<float>(), idx.typed_data<int32_t>(),
      weight.typed_data<float>(), out->typed_data<float>());
  return CheckLaunch(kInterpOp);
}

ffi::Error ThreeInterpolateGradImpl(cudaStream_t stream, ffi::AnyBuffer grad_out, ffi::AnyBuffer idx,
                                    ffi::AnyBuffer weight, int32_t npoints,
                                    ffi::Result<ffi::AnyBuffer> grad_features) {
  PointShape sg, si;
  XLA_OPS_RETURN_IF_ERROR(
      CheckThreeInterpolateGrad(kInterpGradOp, grad_out, idx, weight, npoints, *grad_features, &sg, &si));
  float* gf = grad_features->typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(ZeroAsync(kInterpGradOp, gf, grad_features->size_bytes(), stream));
  const int64_t total = sg.b * sg.n * sg.c;
  if (total == 0) return ffi::Error::Success();
  ThreeInterpolateGradKernel<<<StrideBlocks(total, kThreads), kThreads, 0, stream>>>(
      sg.b, npoints, sg.n, sg.c, grad_out.typed_data<float>(), idx.typed_data<int32_t>(),
      weight.typed_data<float>(), gf);
  return CheckLaunch(kInterpGradOp);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeNnCuda, ThreeNnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kThreeNnOp, ThreeNnCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeInterpolateCuda, ThreeInterpolateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kInterpOp, ThreeInterpolateCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeInterpolateGradCuda, ThreeInterpolateGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoints")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kInterpGradOp, ThreeInterpolateGradCuda);

}  // namespace cuda
}  // namespace xla_ops
