// nn_distance (the Chamfer core) on CUDA: for every point of `a` the squared distance to, and index of, its
// nearest point in `b`, and the same from `b` to `a`. Shared-memory tiled brute force (nearest.cuh, K=1);
// ties go to the lowest index and distances are bit-identical to the CPU handler's.
#include "nearest.cuh"

namespace xla_ops {
namespace cuda {
namespace {

constexpr const char* kOp = "xla_ops_nn_distance";

ffi::Error NnDistanceImpl(cudaStream_t stream, ffi::AnyBuffer a, ffi::AnyBuffer b,
                          ffi::Result<ffi::AnyBuffer> dist_ab, ffi::Result<ffi::AnyBuffer> idx_ab,
                          ffi::Result<ffi::AnyBuffer> dist_ba, ffi::Result<ffi::AnyBuffer> idx_ba) {
  PointShape sa, sb;
  XLA_OPS_RETURN_IF_ERROR(CheckNnDistance(kOp, a, b, *dist_ab, *idx_ab, *dist_ba, *idx_ba, &sa, &sb));
  const float* pa = a.typed_data<float>();
  const float* pb = b.typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(LaunchNearestK<1>(kOp, stream, sa.b, sa.n, sb.n, pa, pb, dist_ab->typed_data<float>(),
                                            idx_ab->typed_data<int32_t>()));
  return LaunchNearestK<1>(kOp, stream, sb.b, sb.n, sa.n, pb, pa, dist_ba->typed_data<float>(),
                           idx_ba->typed_data<int32_t>());
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnDistanceCuda, NnDistanceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_OPS_REGISTER(kOp, NnDistanceCuda);

}  // namespace cuda
}  // namespace xla_ops
