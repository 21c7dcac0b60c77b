// three_nn, three_interpolate and its gradient on CPU (the original PointNet++ interpolation ops).
//  * three_nn: the 3 nearest known points of every unknown point (squared distances, ascending, strict `<`
//    so ties go to the lowest index); slots beyond m keep idx 0 and distance +inf. From
//    kThreeNnTreeMinKnown known points on, the same result from a k-d tree (kdtree.h).
//  * three_interpolate: out[i] = sum_j weight[i, j] * features[idx[i, j]].
//  * three_interpolate_grad: grad_features[p] = sum over (i, j) with idx[i, j] == p of weight[i, j] *
//    grad_out[i], summed in ascending (i, j) order by one thread per (batch item, channel block), so the
//    result does not depend on the thread count.
// Indices outside [0, m) are rejected with INVALID_ARGUMENT before any work is done.
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "common.h"
#include "distance.h"
#include "kdtree.h"

namespace xla_ops {
namespace {

constexpr const char* kNnOp = "xla_ops_three_nn";
constexpr const char* kInterpOp = "xla_ops_three_interpolate";
constexpr const char* kGradOp = "xla_ops_three_interpolate_grad";
constexpr int64_t kChannelBlock = 16;
// three_nn searches a k-d tree of each example's known points (kdtree.h) from these sizes on; below them the
// brute-force scan, which gives identical results. Measured with XLA_OPS_CPU_SEARCH=tree|brute (shared
// 2-core Xeon, B=4, n=m, uniform clouds), brute/tree time: 0.86 at m=16, 0.96 at 64, 1.47 at 128, 1.24 at
// 256, 11.8 at 8192.
constexpr int64_t kThreeNnTreeMinKnown = 128;
constexpr int64_t kThreeNnTreeMinUnknown = 16;

ffi::Future ThreeNnImpl(ffi::ThreadPool pool, ffi::AnyBuffer unknown, ffi::AnyBuffer known,
                        ffi::Result<ffi::AnyBuffer> dist, ffi::Result<ffi::AnyBuffer> idx) {
  PointShape su, sk;
  if (ffi::Error e = CheckThreeNn(kNnOp, unknown, known, *dist, *idx, &su, &sk); e.failure())
    return FailedFuture(std::move(e));
  const int64_t n = su.n, m = sk.n;
  const float* pu = unknown.typed_data<float>();
  const float* pk = known.typed_data<float>();
  float* pd = dist->typed_data<float>();
  int32_t* pi = idx->typed_data<int32_t>();
  if (UseTree(m >= kThreeNnTreeMinKnown && n >= kThreeNnTreeMinUnknown)) {
    // The same result through a k-d tree of each example's known points (kdtree.h): the 3 smallest
    // (distance, index) pairs, of which those with distance +inf become the padding (+inf, 0), as the scan
    // below (strict <) never takes an infinite distance. Known points with a NaN/Inf coordinate (left out
    // of the tree) and every known point of such an unknown one are at NaN or +inf: never taken.
    auto trees = std::make_shared<LazyTrees>(pk, su.b, m);  // kept alive by the tasks' copies
    return ParallelFor(pool, su.b * n, 64, [=](int64_t begin, int64_t end) {
      constexpr float kInf = std::numeric_limits<float>::infinity();
      std::vector<uint64_t> order;
      for (int64_t t0 = begin; t0 < end;) {  // the task's queries of one example at a time
        const int64_t b = t0 / n, t1 = std::min(end, (b + 1) * n);
        const KdTree& tree = trees->Get(b);
        ForEachInSpatialOrder(pu, t0, t1, order, [&](int64_t t) {
          const float* q = pu + 3 * t;
          TopK top{pd + 3 * t, pi + 3 * t, 3};
          top.Reset();
          if (IsFinite3(q)) tree.KNearest(q[0], q[1], q[2], &top);
          for (int j = 0; j < 3; ++j) {
            if (!(top.d[j] < kInf)) top.d[j] = kInf, top.i[j] = 0;
          }
        });
        t0 = t1;
      }
    });
  }
  return ParallelFor(pool, su.b * n, 64, [=](int64_t begin, int64_t end) {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    for (int64_t t = begin; t < end; ++t) {
      const float* ref = pk + (t / n) * m * 3;
      const float x = pu[3 * t], y = pu[3 * t + 1], z = pu[3 * t + 2];
      float d0 = kInf, d1 = kInf, d2 = kInf;
      int32_t i0 = 0, i1 = 0, i2 = 0;
      for (int64_t j = 0; j < m; ++j) {
        const float d = SqDist3(ref[3 * j], ref[3 * j + 1], ref[3 * j + 2], x, y, z);  // distance.h
        if (d < d2) {
          const int32_t jj = static_cast<int32_t>(j);
          if (d < d1) {
            d2 = d1, i2 = i1;
            if (d < d0) {
              d1 = d0, i1 = i0, d0 = d, i0 = jj;
            } else {
              d1 = d, i1 = jj;
            }
          } else {
            d2 = d, i2 = jj;
          }
        }
      }
      pd[3 * t] = d0, pd[3 * t + 1] = d1, pd[3 * t + 2] = d2;
      pi[3 * t] = i0, pi[3 * t + 1] = i1, pi[3 * t + 2] = i2;
    }
  });
}

ffi::Future ThreeInterpolateImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer idx,
                                 ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> out) {
  PointShape sf, si;
  if (ffi::Error e = CheckThreeInterpolate(kInterpOp, features, idx, weight, *out, &sf, &si); e.failure())
    return FailedFuture(std::move(e));
  const int64_t n = si.n, m = sf.n, c = sf.c;
  if (ffi::Error e = checks::IndexRange(kInterpOp, "idx", idx.typed_data<int32_t>(), sf.b * n * 3, m); e.failure())
    return FailedFuture(std::move(e));
  const float* pf = features.typed_data<float>();
  const int32_t* pi = idx.typed_data<int32_t>();
  const float* pw = weight.typed_data<float>();
  float* po = out->typed_data<float>();
  return ParallelFor(pool, sf.b * n, 64, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* f = pf + (t / n) * m * c;
      const float* f0 = f + pi[3 * t] * c;
      const float* f1 = f + pi[3 * t + 1] * c;
      const float* f2 = f + pi[3 * t + 2] * c;
      const float w0 = pw[3 * t], w1 = pw[3 * t + 1], w2 = pw[3 * t + 2];
      float* o = po + t * c;
      for (int64_t ch = 0; ch < c; ++ch) o[ch] = w0 * f0[ch] + w1 * f1[ch] + w2 * f2[ch];
    }
  });
}

ffi::Future ThreeInterpolateGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_out, ffi::AnyBuffer idx,
                                     ffi::AnyBuffer weight, ffi::Result<ffi::AnyBuffer> grad_features,
                                     int32_t npoints) {
  PointShape sg, si;
  if (ffi::Error e = CheckThreeInterpolateGrad(kGradOp, grad_out, idx, weight, npoints, *grad_features, &sg, &si);
      e.failure())
    return FailedFuture(std::move(e));
  const int64_t n = sg.n, c = sg.c, m = npoints;
  if (ffi::Error e = checks::IndexRange(kGradOp, "idx", idx.typed_data<int32_t>(), sg.b * n * 3, m); e.failure())
    return FailedFuture(std::move(e));
  const float* pg = grad_out.typed_data<float>();
  const int32_t* pi = idx.typed_data<int32_t>();
  const float* pw = weight.typed_data<float>();
  float* pf = grad_features->typed_data<float>();
  // Work items: (batch item, block of kChannelBlock channels); each scatters all n points in order.
  const int64_t cblocks = (c + kChannelBlock - 1) / kChannelBlock;
  return ParallelFor(pool, sg.b * cblocks, 1, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / cblocks, c0 = (t % cblocks) * kChannelBlock, c1 = std::min(c, c0 + kChannelBlock);
      float* gf = pf + b * m * c;
      for (int64_t p = 0; p < m; ++p)
        for (int64_t ch = c0; ch < c1; ++ch) gf[p * c + ch] = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const float* g = pg + (b * n + i) * c;
        for (int j = 0; j < 3; ++j) {
          const int64_t q = (b * n + i) * 3 + j;
          float* dst = gf + pi[q] * c;
          const float w = pw[q];
          for (int64_t ch = c0; ch < c1; ++ch) dst[ch] += w * g[ch];
        }
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeNnCpu, ThreeNnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kNnOp, ThreeNnCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeInterpolateCpu, ThreeInterpolateImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kInterpOp, ThreeInterpolateCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ThreeInterpolateGradCpu, ThreeInterpolateGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoints"));
XLA_OPS_REGISTER(kGradOp, ThreeInterpolateGradCpu);

}  // namespace xla_ops
