// farthest_point_sample on CPU: exact FPS from index 0 on squared distances, ties to the lowest index.
//
// One example is one serial chain of npoint passes over its N points (pass t updates every point's running
// min distance with pick t-1 and finds the argmax, which is pick t). The pass is a branch-free SIMD loop
// over SoA copies of the coordinates, with a per-lane running max and index (strict `>`, so each lane keeps
// its lowest index) reduced to the lowest global index at the end. Examples run in parallel on XLA's
// thread pool; within an example the passes are sequential (a per-pass barrier across threads would cost
// more than a pass of 16k points), so a batch of 1 uses one thread.
//
// Differences from the original GPU kernel: ties go to the lowest global index (the GPU's tree reduction
// prefers lower thread ids, not strictly lower indices) and the running distance starts at +inf (1e38
// there). NaN coordinates: a NaN distance never replaces a running minimum, so a NaN point keeps +inf and
// is picked early; every output index is still in [0, N).
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

// 256-bit GCC vector types are passed between inline helpers only; silence the ABI note about them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace xla_ops {
namespace {

constexpr const char* kOp = "xla_ops_farthest_point_sample";
constexpr int kLanes = 8;

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

inline f32x8 Select(i32x8 mask, f32x8 a, f32x8 b) {
  return reinterpret_cast<f32x8>((reinterpret_cast<i32x8>(a) & mask) | (reinterpret_cast<i32x8>(b) & ~mask));
}
inline i32x8 Select(i32x8 mask, i32x8 a, i32x8 b) { return (a & mask) | (b & ~mask); }

// FPS of one example. x, y, z, dist: SoA buffers of n_pad (a multiple of kLanes) floats; lanes past the
// n real points carry dist = -1, so they never win the argmax (real running distances are >= 0).
__attribute__((always_inline)) inline void FpsExampleImpl(const float* x, const float* y, const float* z,
                                                          float* dist, int64_t n_pad, int64_t npoint,
                                                          int32_t* out) {
  int32_t pick = 0;
  out[0] = 0;
  i32x8 lane_ids;
  for (int l = 0; l < kLanes; ++l) lane_ids[l] = l;
  for (int64_t t = 1; t < npoint; ++t) {
    const float cx = x[pick], cy = y[pick], cz = z[pick];
    f32x8 best = f32x8{} - std::numeric_limits<float>::infinity();
    i32x8 best_j = i32x8{};
    i32x8 j = lane_ids;
    for (int64_t i = 0; i < n_pad; i += kLanes, j += kLanes) {
      f32x8 px, py, pz, d;
      __builtin_memcpy(&px, x + i, sizeof(px));
      __builtin_memcpy(&py, y + i, sizeof(py));
      __builtin_memcpy(&pz, z + i, sizeof(pz));
      __builtin_memcpy(&d, dist + i, sizeof(d));
      const f32x8 dx = px - cx, dy = py - cy, dz = pz - cz;
      const f32x8 nd = dx * dx + dy * dy + dz * dz;
      d = Select(nd < d, nd, d);  // NaN never replaces
      __builtin_memcpy(dist + i, &d, sizeof(d));
      const i32x8 better = d > best;
      best = Select(better, d, best);
      best_j = Select(better, j, best_j);
    }
    float m = best[0];
    int32_t m_j = best_j[0];
    for (int l = 1; l < kLanes; ++l) {
      if (best[l] > m || (best[l] == m && best_j[l] < m_j)) {
        m = best[l];
        m_j = best_j[l];
      }
    }
    pick = m_j;
    out[t] = pick;
  }
}

void FpsExampleDefault(const float* x, const float* y, const float* z, float* dist, int64_t n_pad,
                       int64_t npoint, int32_t* out) {
  FpsExampleImpl(x, y, z, dist, n_pad, npoint, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Same arithmetic (no FMA), so the result does not depend on which version runs.
__attribute__((target("avx2"))) void FpsExampleAvx2(const float* x, const float* y, const float* z,
                                                    float* dist, int64_t n_pad, int64_t npoint,
                                                    int32_t* out) {
  FpsExampleImpl(x, y, z, dist, n_pad, npoint, out);
}
#endif

using FpsFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int32_t*);

FpsFn SelectFps() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2")) return FpsExampleAvx2;
#endif
  return FpsExampleDefault;
}

ffi::Future FpsImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz, int32_t npoint, ffi::Result<ffi::AnyBuffer> idx) {
  auto fail = [](ffi::Error e) {
    ffi::Promise p;
    ffi::Future f(p);
    p.SetError(std::move(e));
    return f;
  };
  auto s = AsPointShape(xyz.dimensions(), "xyz");
  if (s.has_error()) return fail(s.error());
  if (xyz.element_type() != ffi::F32) return fail(InvalidArgument(kOp, "xyz must be float32"));
  if (s->c != 3) return fail(InvalidArgument(kOp, "xyz must have 3 channels, got " + std::to_string(s->c)));
  if (s->n < 1) return fail(InvalidArgument(kOp, "xyz needs at least one point"));
  if (npoint < 1 || npoint > s->n)
    return fail(InvalidArgument(kOp, "npoint must be in [1, N=" + std::to_string(s->n) + "], got " +
                                         std::to_string(npoint)));
  if (idx->element_type() != ffi::S32 || idx->element_count() != static_cast<size_t>(s->b * npoint))
    return fail(InvalidArgument(kOp, "idx must be int32 [..., npoint]"));

  const int64_t nb = s->b, n = s->n, np = npoint;
  const int64_t n_pad = (n + kLanes - 1) / kLanes * kLanes;
  const float* in = xyz.typed_data<float>();
  int32_t* out = idx->typed_data<int32_t>();
  static const FpsFn fps = SelectFps();
  return ParallelFor(pool, nb, 1, [=](int64_t begin, int64_t end) {
    std::vector<float> soa(4 * n_pad);
    float *x = soa.data(), *y = x + n_pad, *z = y + n_pad, *dist = z + n_pad;
    for (int64_t b = begin; b < end; ++b) {
      const float* p = in + b * n * 3;
      for (int64_t i = 0; i < n; ++i) {
        x[i] = p[3 * i];
        y[i] = p[3 * i + 1];
        z[i] = p[3 * i + 2];
        dist[i] = std::numeric_limits<float>::infinity();
      }
      for (int64_t i = n; i < n_pad; ++i) {
        x[i] = y[i] = z[i] = 0.0f;
        dist[i] = -1.0f;
      }
      fps(x, y, z, dist, n_pad, np, out + b * np);
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FarthestPointSampleCpu, FpsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoint")
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kOp, FarthestPointSampleCpu);

}  // namespace xla_ops
