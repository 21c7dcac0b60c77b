// Grouping ops on CUDA: ball_query, group_points and its gradient.
//  * ball_query: one thread per query point scans xyz in index order (early exit after nsample hits), so
//    the result is the CPU handler's exactly: the first nsample indices with d^2 < radius^2 (squared
//    distances bit-identical to the CPU's, see SqDist3), the row padded with the first hit, count = hits;
//    an empty ball gives idx 0 and count 0.
//  * group_points: one thread per output element. An index outside [0, N) reads zeros (docs/ops.md: the
//    CPU handler reports it as INVALID_ARGUMENT, which a kernel cannot do without a device sync).
//  * group_points_grad: scatter-add with atomicAdd into a zeroed output, so the float summation order (and
//    the last bits of the result) can vary from run to run. Out-of-range indices contribute nothing.
#include "cuda_common.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kBallQueryOp = "xla_ops_ball_query";
constexpr const char* kGroupPointsOp = "xla_ops_group_points";
constexpr const char* kGroupPointsGradOp = "xla_ops_group_points_grad";
constexpr int kThreads = 256;

// ---- ball_query ----------------------------------------------------------------------------------

__global__ void BallQueryKernel(int64_t b, int64_t n, int64_t m, int32_t nsample, float radius2,
                                const float* __restrict__ xyz, const float* __restrict__ new_xyz,
                                int32_t* __restrict__ idx, int32_t* __restrict__ count) {
  XLA_OPS_GRID_STRIDE(t, b * m) {
    const int64_t bi = t / m;
    const float qx = new_xyz[3 * t], qy = new_xyz[3 * t + 1], qz = new_xyz[3 * t + 2];
    const float* p = xyz + bi * n * 3;
    int32_t* row = idx + t * nsample;
    int32_t hits = 0;
    for (int64_t i = 0; i < n && hits < nsample; ++i) {
      if (SqDist3(p[3 * i], p[3 * i + 1], p[3 * i + 2], qx, qy, qz) < radius2) row[hits++] = static_cast<int32_t>(i);
    }
    const int32_t pad = hits > 0 ? row[0] : 0;
    for (int32_t s = hits; s < nsample; ++s) row[s] = pad;
    count[t] = hits;
  }
}

ffi::Error BallQueryImpl(cudaStream_t stream, ffi::AnyBuffer xyz, ffi::AnyBuffer new_xyz, float radius,
                         int32_t nsample, ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> count) {
  PointShape sx, sq;
  XLA_OPS_RETURN_IF_ERROR(CheckBallQuery(kBallQueryOp, xyz, new_xyz, radius, nsample, *idx, *count, &sx, &sq));
  const int64_t queries = sq.b * sq.n;
  if (queries == 0) return ffi::Error::Success();
  BallQueryKernel<<<StrideBlocks(queries, kThreads), kThreads, 0, stream>>>(
      sx.b, sx.n, sq.n, nsample, radius * radius, xyz.typed_data<float>(), new_xyz.typed_data<float>(),
      idx->typed_data<int32_t>(), count->typed_data<int32_t>());
  return CheckLaunch(kBallQueryOp);
}

// ---- group_points and its gradient ---------------------------------------------------------------

// points [b, n, c], idx [b, m, k] -> out [b, m, k, c]; `mk` = m * k.
__global__ void GroupPointsKernel(int64_t b, int64_t n, int64_t c, int64_t mk, const float* __restrict__ points,
                                  const int32_t* __restrict__ idx, float* __restrict__ out) {
  XLA_OPS_GRID_STRIDE(t, b * mk * c) {
    const int64_t row = t / c, ch = t - row * c;  // row = bi * mk + slot
    const int64_t bi = row / mk;
    const int32_t j = idx[row];
    out[t] = (j >= 0 && j < n) ? points[(bi * n + j) * c + ch] : 0.0f;
  }
}

// grad_out [b, m, k, c], idx [b, m, k] -> grad_points [b, n, c] (zeroed before the launch).
__global__ void GroupPointsGradKernel(int64_t b, int64_t n, int64_t c, int64_t mk,
                                      const float* __restrict__ grad_out, const int32_t* __restrict__ idx,
                                      float* __restrict__ grad_points) {
  XLA_OPS_GRID_STRIDE(t, b * mk * c) {
    const int64_t row = t / c, ch = t - row * c;
    const int64_t bi = row / mk;
    const int32_t j = idx[row];
    if (j >= 0 && j < n) atomicAdd(grad_points + (bi * n + j) * c + ch, grad_out[t]);
  }
}

ffi::Error GroupPointsImpl(cudaStream_t stream, ffi::AnyBuffer points, ffi::AnyBuffer idx,
                           ffi::Result<ffi::AnyBuffer> out) {
  PointShape sp, si;  // si views idx [..., M, K] as [B, M, K]
  XLA_OPS_RETURN_IF_ERROR(CheckGroupPoints(kGroupPointsOp, points, idx, *out, &sp, &si));
  const int64_t total = si.b * si.n * si.c * sp.c;
  if (total == 0) return ffi::Error::Success();
  GroupPointsKernel<<<StrideBlocks(total, kThreads), kThreads, 0, stream>>>(
      sp.b, sp.n, sp.c, si.n * si.c, points.typed_data<float>(), idx.typed_data<int32_t>(),
      out->typed_data<float>());
  return CheckLaunch(kGroupPointsOp);
}

ffi::Error GroupPointsGradImpl(cudaStream_t stream, ffi::AnyBuffer grad_out, ffi::AnyBuffer idx, int32_t npoints,
                               ffi::Result<ffi::AnyBuffer> grad_points) {
  PointShape si;  // idx [..., M, K] viewed as [B, M, K]
  int64_t c = 0;
  XLA_OPS_RETURN_IF_ERROR(CheckGroupPointsGrad(kGroupPointsGradOp, grad_out, idx, npoints, *grad_points, &si, &c));
  float* gp = grad_points->typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(ZeroAsync(kGroupPointsGradOp, gp, grad_points->size_bytes(), stream));
  const int64_t total = si.b * si.n * si.c * c;
  if (total == 0) return ffi::Error::Success();
  GroupPointsGradKernel<<<StrideBlocks(total, kThreads), kThreads, 0, stream>>>(
      si.b, npoints, c, si.n * si.c, grad_out.typed_data<float>(), idx.typed_data<int32_t>(), gp);
  return CheckLaunch(kGroupPointsGradOp);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BallQueryCuda, BallQueryImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("radius")
                                  .Attr<int32_t>("nsample")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kBallQueryOp, BallQueryCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupPointsCuda, GroupPointsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kGroupPointsOp, GroupPointsCuda);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupPointsGradCuda, GroupPointsGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoints")
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kGroupPointsGradOp, GroupPointsGradCuda);

}  // namespace cuda
}  // namespace xla_ops
