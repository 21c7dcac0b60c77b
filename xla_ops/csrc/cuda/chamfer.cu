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
  auto sa = PointsOf(kOp, "a", a, ffi::F32);
  if (sa.has_error()) return sa.error();
  auto sb = PointsOf(kOp, "b", b, ffi::F32);
  if (sb.has_error()) return sb.error();
  if (sa->c != 3 || sb->c != 3)
    return InvalidArgument(kOp, "a and b must have 3 channels, got " + std::to_string(sa->c) + " and " +
                                    std::to_string(sb->c));
  XLA_OPS_RETURN_IF_ERROR(CheckSameBatch(kOp, "a", *sa, "b", *sb));
  if (sa->n < 1 || sb->n < 1) return InvalidArgument(kOp, "a and b need at least one point");
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "dist_ab", *dist_ab, ffi::F32, sa->b * sa->n));
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "idx_ab", *idx_ab, ffi::S32, sa->b * sa->n));
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "dist_ba", *dist_ba, ffi::F32, sb->b * sb->n));
  XLA_OPS_RETURN_IF_ERROR(CheckResult(kOp, "idx_ba", *idx_ba, ffi::S32, sb->b * sb->n));
  const float* pa = a.typed_data<float>();
  const float* pb = b.typed_data<float>();
  XLA_OPS_RETURN_IF_ERROR(LaunchNearestK<1>(kOp, stream, sa->b, sa->n, sb->n, pa, pb, dist_ab->typed_data<float>(),
                                            idx_ab->typed_data<int32_t>()));
  return LaunchNearestK<1>(kOp, stream, sb->b, sb->n, sa->n, pb, pa, dist_ba->typed_data<float>(),
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
