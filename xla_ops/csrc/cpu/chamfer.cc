// nn_distance (the Chamfer core) on CPU: for every point of `a` the squared distance to, and index of, its
// nearest point in `b`, and the same from `b` to `a`. Ties go to the lowest index. Exact brute force.
#include <cmath>
#include <limits>

#include "common.h"

namespace xla_ops {
namespace {

constexpr const char* kOp = "xla_ops_nn_distance";

// For queries q[begin:end) (row-major [n, 3]) finds the nearest of ref[0:m).
void NearestRange(const float* q, const float* ref, int64_t m, int64_t begin, int64_t end, float* dist,
                  int32_t* idx) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = q[3 * i], y = q[3 * i + 1], z = q[3 * i + 2];
    float best = std::numeric_limits<float>::infinity();
    int32_t best_j = 0;
    for (int64_t j = 0; j < m; ++j) {
      const float dx = ref[3 * j] - x, dy = ref[3 * j + 1] - y, dz = ref[3 * j + 2] - z;
      const float d = dx * dx + dy * dy + dz * dz;
      if (d < best) {
        best = d;
        best_j = static_cast<int32_t>(j);
      }
    }
    dist[i] = best;
    idx[i] = best_j;
  }
}

ffi::Future NnDistanceImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Result<ffi::AnyBuffer> dist_ab, ffi::Result<ffi::AnyBuffer> idx_ab,
                           ffi::Result<ffi::AnyBuffer> dist_ba, ffi::Result<ffi::AnyBuffer> idx_ba) {
  auto fail = [](ffi::Error e) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetError(std::move(e));
    return f;
  };
  auto sa = AsPointShape(a.dimensions(), "a");
  if (sa.has_error()) return fail(sa.error());
  auto sb = AsPointShape(b.dimensions(), "b");
  if (sb.has_error()) return fail(sb.error());
  if (a.element_type() != ffi::F32 || b.element_type() != ffi::F32)
    return fail(InvalidArgument(kOp, "a and b must be float32"));
  if (sa->c != 3 || sb->c != 3)
    return fail(InvalidArgument(kOp, "a and b must have 3 channels, got " + std::to_string(sa->c) +
                                         " and " + std::to_string(sb->c)));
  if (sa->b != sb->b)
    return fail(InvalidArgument(kOp, "batch mismatch: a has " + std::to_string(sa->b) + ", b has " +
                                         std::to_string(sb->b)));
  if (sa->n < 1 || sb->n < 1) return fail(InvalidArgument(kOp, "a and b need at least one point"));
  if (dist_ab->element_count() != sa->b * sa->n || idx_ab->element_count() != sa->b * sa->n ||
      dist_ba->element_count() != sb->b * sb->n || idx_ba->element_count() != sb->b * sb->n)
    return fail(InvalidArgument(kOp, "output sizes do not match the inputs"));

  const int64_t nb = sa->b, n = sa->n, m = sb->n;
  const float* pa = a.typed_data<float>();
  const float* pb = b.typed_data<float>();
  float* dab = dist_ab->typed_data<float>();
  int32_t* iab = idx_ab->typed_data<int32_t>();
  float* dba = dist_ba->typed_data<float>();
  int32_t* iba = idx_ba->typed_data<int32_t>();
  // One flat work list: the B*N queries of a, then the B*M queries of b. Rows are independent.
  const int64_t total = nb * (n + m);
  return ParallelFor(pool, total, 64, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end;) {
      if (t < nb * n) {
        const int64_t bi = t / n, lo = t % n, hi = std::min(n, lo + (end - t));
        NearestRange(pa + bi * n * 3, pb + bi * m * 3, m, lo, hi, dab + bi * n, iab + bi * n);
        t += hi - lo;
      } else {
        const int64_t u = t - nb * n, bi = u / m, lo = u % m, hi = std::min(m, lo + (end - t));
        NearestRange(pb + bi * m * 3, pa + bi * n * 3, n, lo, hi, dba + bi * m, iba + bi * m);
        t += hi - lo;
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NnDistanceCpu, NnDistanceImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kOp, NnDistanceCpu);

}  // namespace xla_ops
