// Neighbourhood ops on CPU: ball_query, group_points (+ its scatter-add gradient) and knn.
//
// * ball_query: every query scans xyz in index order and keeps the first nsample points with d^2 < r^2;
//   unfilled slots repeat the first hit; an empty ball gives idx 0 and count 0. Large inputs get the same
//   result from a k-d tree (kdtree.h) where that is cheaper (see UseBallTree).
// * group_points: out[b, m, k, :] = points[b, idx[b, m, k], :]. Out-of-range indices -> INVALID_ARGUMENT.
// * group_points_grad: grad_points[b, n, :] = sum over (m, k) with idx[b, m, k] == n of grad_out[b, m, k, :].
//   Deterministic: a task owns a (batch, channel block) slice of the output and adds into it in ascending
//   (m, k) order, so results do not depend on the thread count (no atomics).
// * knn: the k nearest ref points of every query, ascending (squared distance, index): ties go to the lowest
//   index, NaN distances count as +inf. Exact brute force with SIMD distance tiles and a sorted top-k
//   buffer per query (details in the knn section below); at C = 3 from kKnnTreeMinRefs refs on, the same
//   result from a k-d tree (kdtree.h).
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "common.h"
#include "distance.h"
#include "kdtree.h"

// 256-bit GCC vector types are passed between inline helpers only; silence the ABI note about them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace xla_ops {
namespace {

// ---- ball_query ---------------------------------------------------------------------------------

constexpr const char* kBallQuery = "xla_ops_ball_query";

// ball_query searches a k-d tree (kdtree.h) of each example's xyz, rather than scanning xyz in index order
// (which stops after nsample hits), from these sizes on. Both give identical results. Measured with
// XLA_OPS_CPU_SEARCH=tree|brute (shared 2-core Xeon, B=4, M=N/4, nsample=32, uniform unit cube), brute/tree
// time at r=0.1: 0.54 at N=512, 0.91 at 1024, 1.14 at 2048, 2.0 at 16384; at r=0.3 (big balls: the scan
// stops early) the tree path loses (0.6-0.7) up to N=2048, which the per-query choice below limits.
constexpr int64_t kBallTreeMinPoints = 4096;
constexpr int64_t kBallTreeMinQueries = 64;  // fewer queries do not pay for building the trees
// The prefix of xyz (in index order) that every query scans before it turns to the tree.
constexpr int64_t kBallScanFirst = 256;
// The tree's cost in scanned-point equivalents: per hit in the ball, and per search (tuned on the cases
// above: r = 0.1 and 0.3 at N = 2048 and 16384, r = 0.05 at N = 8192).
constexpr double kBallTreeCostPerHit = 16.0;
constexpr double kBallTreeCostBase = 256.0;
bool UseBallTree(int64_t n, int64_t m) { return UseTree(n >= kBallTreeMinPoints && m >= kBallTreeMinQueries); }

// Fills the unused slots o[hits:ns) with the first hit (0 for an empty ball) and stores the count.
inline void PadBall(int32_t* o, int64_t hits, int64_t ns, int32_t* count) {
  const int32_t fill = hits > 0 ? o[0] : 0;
  for (int64_t s = hits; s < ns; ++s) o[s] = fill;
  *count = static_cast<int32_t>(hits);
}

ffi::Future BallQueryImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz, ffi::AnyBuffer new_xyz, float radius,
                          int32_t nsample, ffi::Result<ffi::AnyBuffer> idx, ffi::Result<ffi::AnyBuffer> count) {
  PointShape sx, sq;
  if (ffi::Error e = CheckBallQuery(kBallQuery, xyz, new_xyz, radius, nsample, *idx, *count, &sx, &sq); e.failure())
    return FailedFuture(std::move(e));
  const int64_t nb = sx.b, n = sx.n, m = sq.n, ns = nsample;

  const float r2 = radius * radius;
  const float* px = xyz.typed_data<float>();
  const float* pq = new_xyz.typed_data<float>();
  int32_t* out_idx = idx->typed_data<int32_t>();
  int32_t* out_cnt = count->typed_data<int32_t>();
  if (!UseBallTree(n, m)) {
    return ParallelFor(pool, nb * m, 64, [=](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const float* p = px + (row / m) * n * 3;
        const float qx = pq[3 * row], qy = pq[3 * row + 1], qz = pq[3 * row + 2];
        int32_t* o = out_idx + row * ns;
        int64_t hits = 0;
        for (int64_t j = 0; j < n && hits < ns; ++j) {
          if (SqDist3(p[3 * j], p[3 * j + 1], p[3 * j + 2], qx, qy, qz) < r2) o[hits++] = static_cast<int32_t>(j);
        }
        PadBall(o, hits, ns, out_cnt + row);
      }
    });
  }
  // The same hits through each example's tree: the ns smallest ids with d^2 < r2, ascending. Points and
  // queries with a NaN/Inf coordinate have NaN or +inf distances, never < r2: the tree leaves them out and
  // such a query gets an empty ball, as in the scan above.
  // A query first scans a prefix of xyz as above. A ball that holds a large fraction of xyz fills by
  // scanning in far fewer steps than a tree search, which must find the lowest ids among all the hits; the
  // prefix's hit rate f estimates both costs: scanning on, about (ns - hits) / f points; the tree, about
  // kBallTreeCostPerHit * f * n + kBallTreeCostBase. The cheaper one finishes the query (identical results).
  const int64_t prefix = std::min(n, kBallScanFirst);
  auto trees = std::make_shared<LazyTrees>(px, nb, n);  // kept alive by the tasks' copies
  return ParallelFor(pool, nb * m, 64, [=](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* p = px + (row / m) * n * 3;
      const float* q = pq + 3 * row;
      int32_t* o = out_idx + row * ns;
      int64_t hits = 0;
      int64_t j = 0;
      for (; j < prefix && hits < ns; ++j) {
        if (SqDist3(p[3 * j], p[3 * j + 1], p[3 * j + 2], q[0], q[1], q[2]) < r2) o[hits++] = static_cast<int32_t>(j);
      }
      if (hits < ns && j < n && IsFinite3(q)) {
        const double rate = static_cast<double>(hits) / static_cast<double>(j);
        const bool scan_on = hits > 0 && static_cast<double>(ns - hits) / rate <
                                              kBallTreeCostPerHit * rate * static_cast<double>(n) + kBallTreeCostBase;
        if (scan_on) {
          for (; j < n && hits < ns; ++j) {
            if (SqDist3(p[3 * j], p[3 * j + 1], p[3 * j + 2], q[0], q[1], q[2]) < r2) o[hits++] = static_cast<int32_t>(j);
          }
        } else {
          trees->Get(row / m).Ball(q[0], q[1], q[2], r2, static_cast<int32_t>(j), ns, o, &hits);
        }
      }
      PadBall(o, hits, ns, out_cnt + row);
    }
  });
}

// ---- group_points and its gradient ----------------------------------------------------------------

constexpr const char* kGroup = "xla_ops_group_points";
constexpr const char* kGroupGrad = "xla_ops_group_points_grad";

ffi::Future GroupPointsImpl(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer idx,
                            ffi::Result<ffi::AnyBuffer> out) {
  PointShape sp, si;  // si views idx [..., M, K] as [B, M, K]
  if (ffi::Error e = CheckGroupPoints(kGroup, points, idx, *out, &sp, &si); e.failure())
    return FailedFuture(std::move(e));
  const int64_t nb = sp.b, n = sp.n, c = sp.c, rows = si.n * si.c;  // rows = M * K per example
  const int32_t* pi = idx.typed_data<int32_t>();
  if (ffi::Error e = checks::IndexRange(kGroup, "idx", pi, nb * rows, n); e.failure())
    return FailedFuture(std::move(e));

  const float* pp = points.typed_data<float>();
  float* po = out->typed_data<float>();
  return ParallelFor(pool, nb * rows, 256, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::memcpy(po + r * c, pp + ((r / rows) * n + pi[r]) * c, c * sizeof(float));
    }
  });
}

ffi::Future GroupPointsGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer grad_out, ffi::AnyBuffer idx,
                                int32_t npoints, ffi::Result<ffi::AnyBuffer> grad_points) {
  PointShape si;  // idx [..., M, K] viewed as [B, M, K]
  int64_t c = 0;
  if (ffi::Error e = CheckGroupPointsGrad(kGroupGrad, grad_out, idx, npoints, *grad_points, &si, &c); e.failure())
    return FailedFuture(std::move(e));
  const int64_t nb = si.b, rows = si.n * si.c, n = npoints;
  const int32_t* pi = idx.typed_data<int32_t>();
  if (ffi::Error e = checks::IndexRange(kGroupGrad, "idx", pi, nb * rows, n); e.failure())
    return FailedFuture(std::move(e));

  const float* pg = grad_out.typed_data<float>();
  float* pout = grad_points->typed_data<float>();
  constexpr int64_t kBlock = 16;  // channels per task slice
  const int64_t blocks = (c + kBlock - 1) / kBlock;
  return ParallelFor(pool, nb * blocks, 1, [=](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * kBlock, c1 = std::min(c, c0 + kBlock);
      float* dst = pout + b * n * c;
      for (int64_t i = 0; i < n; ++i) std::fill(dst + i * c + c0, dst + i * c + c1, 0.0f);
      const float* src = pg + b * rows * c;
      const int32_t* ib = pi + b * rows;
      for (int64_t r = 0; r < rows; ++r) {
        float* d = dst + ib[r] * c;
        const float* g = src + r * c;
        for (int64_t ch = c0; ch < c1; ++ch) d[ch] += g[ch];
      }
    }
  });
}

// ---- knn ----------------------------------------------------------------------------------------
//
// Result definition: the k smallest (distance, index) pairs (NaN distance = +inf), where distance is
// distance.h's SqDistC (shared with the CUDA kernel): (q_c - r_c)^2 summed in float32 into 8 partial sums
// (channel c into sum c % 8, in channel order) and then pairwise, no FMA; for C <= 3 this is the plain
// in-order sum that DirectTile computes.
// Refs are transposed into blocks of 8 ([block][channel][lane]) and processed in chunks of kRefChunk refs
// (hot in cache while every query of the task visits them, 4 queries at a time):
//  * C < kExpansionMinChannels: exact distances of the whole chunk (DirectTile: 4 queries x 8 refs per
//    SIMD step) are scanned against each query's current k-th distance.
//  * otherwise filter-and-refine: approximate distances |q|^2 + |r|^2 - 2 q.r (ExpansionTile: one
//    multiply-add per channel, 4 queries x 16 refs per step) have a float32 error below
//    eps = (4C + 16) * 2^-24 * (|q|^2 + max |r|^2) (dot product and norms: gamma_C each, exact sum:
//    gamma_{C+3}, with slack). A candidate whose approximate distance exceeds (k-th exact distance so far)
//    + eps, or (k-th approximate distance of the first chunk) + 2 eps, cannot enter the top k; the others
//    of a chunk get their exact distances together and are pushed. The result is exact; the filter only
//    decides how many candidates are refined (all of them when the norms are huge or not finite).
// The scan compares 8 candidates at a time, so the common case (none can enter) costs one vector compare;
// each query keeps a sorted top-k buffer (its output row) updated by insertion.

constexpr const char* kKnn = "xla_ops_knn";
constexpr int kLanes = 8;       // refs per SIMD vector
constexpr int kQueryTile = 4;   // queries sharing one pass over the refs
constexpr int64_t kExpansionMinChannels = 4;  // below: DirectTile (its in-order sum == ExactSqDist)
constexpr int64_t kRefChunk = 256;  // refs per chunk (a multiple of 2 * kLanes)

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline f32x8 LoadF8(const float* p) {
  f32x8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// Exact squared distances of kQueryTile queries (q: [kQueryTile, c]) to every ref of the transposed ref
// array rt ([block][channel][lane], nblk blocks); out: [kQueryTile, out_stride].
__attribute__((always_inline)) inline void DirectTileImpl(const float* q, const float* rt, int64_t c,
                                                          int64_t nblk, float* out, int64_t out_stride) {
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const float* r = rt + blk * c * kLanes;
    f32x8 acc0{}, acc1{}, acc2{}, acc3{};
    for (int64_t ch = 0; ch < c; ++ch) {
      const f32x8 rv = LoadF8(r + ch * kLanes);
      const f32x8 d0 = rv - q[ch], d1 = rv - q[c + ch], d2 = rv - q[2 * c + ch], d3 = rv - q[3 * c + ch];
      acc0 += d0 * d0;
      acc1 += d1 * d1;
      acc2 += d2 * d2;
      acc3 += d3 * d3;
    }
    float* o = out + blk * kLanes;
    __builtin_memcpy(o, &acc0, sizeof(acc0));
    __builtin_memcpy(o + out_stride, &acc1, sizeof(acc1));
    __builtin_memcpy(o + 2 * out_stride, &acc2, sizeof(acc2));
    __builtin_memcpy(o + 3 * out_stride, &acc3, sizeof(acc3));
  }
}

// Approximate squared distances |q|^2 + |r|^2 - 2 q.r (qn, rn: the squared norms) for the same layout.
__attribute__((always_inline)) inline void ExpansionTileImpl(const float* q, const float* qn, const float* rt,
                                                             const float* rn, int64_t c, int64_t nblk, float* out,
                                                             int64_t out_stride) {
  const int64_t stride = c * kLanes;
  for (int64_t blk = 0; blk < nblk; blk += 2) {
    // Two ref blocks per step (the second one repeats the first for an odd last block).
    const int64_t blk2 = std::min(blk + 1, nblk - 1);
    const float* ra = rt + blk * stride;
    const float* rb = rt + blk2 * stride;
    f32x8 a0{}, a1{}, a2{}, a3{}, b0{}, b1{}, b2{}, b3{};
    for (int64_t ch = 0; ch < c; ++ch) {
      const f32x8 va = LoadF8(ra + ch * kLanes), vb = LoadF8(rb + ch * kLanes);
      const float q0 = q[ch], q1 = q[c + ch], q2 = q[2 * c + ch], q3 = q[3 * c + ch];
      a0 += va * q0;
      b0 += vb * q0;
      a1 += va * q1;
      b1 += vb * q1;
      a2 += va * q2;
      b2 += vb * q2;
      a3 += va * q3;
      b3 += vb * q3;
    }
    const f32x8 na = LoadF8(rn + blk * kLanes), nb = LoadF8(rn + blk2 * kLanes);
    const f32x8 dots_a[kQueryTile] = {a0, a1, a2, a3}, dots_b[kQueryTile] = {b0, b1, b2, b3};
    for (int t = 0; t < kQueryTile; ++t) {
      const f32x8 da = (na + qn[t]) - 2.0f * dots_a[t], db = (nb + qn[t]) - 2.0f * dots_b[t];
      __builtin_memcpy(out + t * out_stride + blk * kLanes, &da, sizeof(da));
      if (blk2 != blk) __builtin_memcpy(out + t * out_stride + blk2 * kLanes, &db, sizeof(db));
    }
  }
}

void DirectTileDefault(const float* q, const float* rt, int64_t c, int64_t nblk, float* out, int64_t stride) {
  DirectTileImpl(q, rt, c, nblk, out, stride);
}
void ExpansionTileDefault(const float* q, const float* qn, const float* rt, const float* rn, int64_t c,
                          int64_t nblk, float* out, int64_t stride) {
  ExpansionTileImpl(q, qn, rt, rn, c, nblk, out, stride);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The exact distances must not use FMA (same result as the default version; CMake builds with
// -ffp-contract=off). The approximate ones may (optimize("fp-contract=fast") re-enables it for this one
// function): FMA can only change how many candidates are refined, never the result.
__attribute__((target("avx2"))) void DirectTileAvx2(const float* q, const float* rt, int64_t c, int64_t nblk,
                                                    float* out, int64_t stride) {
  DirectTileImpl(q, rt, c, nblk, out, stride);
}
__attribute__((target("avx2,fma"), optimize("fp-contract=fast"))) void ExpansionTileAvx2(const float* q, const float* qn, const float* rt,
                                                           const float* rn, int64_t c, int64_t nblk, float* out,
                                                           int64_t stride) {
  ExpansionTileImpl(q, qn, rt, rn, c, nblk, out, stride);
}
#endif

struct Kernels {
  void (*direct)(const float*, const float*, int64_t, int64_t, float*, int64_t) = DirectTileDefault;
  void (*expansion)(const float*, const float*, const float*, const float*, int64_t, int64_t, float*,
                    int64_t) = ExpansionTileDefault;
};

Kernels SelectKernels() {
  Kernels k;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) k.direct = DirectTileAvx2;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) k.expansion = ExpansionTileAvx2;
#endif
  return k;
}

// The exact squared distance: distance.h's SqDistC (one definition with the CUDA kernel), NaN as +inf.
float ExactSqDist(const float* a, const float* b, int64_t c) {
  const float sum = SqDistC(a, b, c);
  return std::isnan(sum) ? std::numeric_limits<float>::infinity() : sum;
}

float SqNorm(const float* a, int64_t c) {
  float s = 0.0f;
  for (int64_t ch = 0; ch < c; ++ch) s += a[ch] * a[ch];
  return s;
}

// Calls visit(j) for every j < n (in increasing order) whose key is not > threshold() (NaN keys are
// visited too), where threshold() is re-read after every visit. keys has a multiple of 8 entries.
template <typename Threshold, typename Visit>
inline void ScanNotAbove(const float* keys, int64_t n, Threshold threshold, Visit visit) {
  float thr = threshold();
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t lanes = std::min<int64_t>(8, n - j0);
#if defined(__SSE2__)
    const __m128 t = _mm_set1_ps(thr);
    unsigned mask = _mm_movemask_ps(_mm_cmpngt_ps(_mm_loadu_ps(keys + j0), t)) |
                    (_mm_movemask_ps(_mm_cmpngt_ps(_mm_loadu_ps(keys + j0 + 4), t)) << 4);
    mask &= (1u << lanes) - 1;
    while (mask != 0) {
      const int l = __builtin_ctz(mask);
      mask &= mask - 1;
      if (!(keys[j0 + l] > thr)) {  // the threshold may have dropped since the block test
        visit(j0 + l);
        thr = threshold();
      }
    }
#else
    for (int64_t l = 0; l < lanes; ++l) {
      if (!(keys[j0 + l] > thr)) {
        visit(j0 + l);
        thr = threshold();
      }
    }
#endif
  }
}

// Per-task buffers of KnnQueries.
struct KnnWorkspace {
  std::vector<float> rt, rn, qpack, qn, keys, exact, seed_d;
  std::vector<int32_t> cand, seed_i;
};

inline float NanAsInf(float x) { return std::isnan(x) ? std::numeric_limits<float>::infinity() : x; }
// x (a double bounding float distances) rounded up to float.
inline float RoundUp(double x) { return static_cast<float>(x * (1.0 + 1e-6)); }

// The k nearest refs of queries [q_begin, q_end) of one example. q: [M, c] (the example's queries),
// r: [n, c]; out_d / out_i: [M, k].
void KnnQueries(const Kernels& kernels, const float* q, const float* r, int64_t n, int64_t c, int64_t kk,
                int64_t q_begin, int64_t q_end, KnnWorkspace& ws, float* out_d, int32_t* out_i) {
  const bool expansion = c >= kExpansionMinChannels;
  const int64_t nblk = (n + kLanes - 1) / kLanes;
  // The refs: transposed blocks (padding refs j >= n are zeros, never reported) and squared norms.
  ws.rt.assign(nblk * kLanes * c, 0.0f);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t ch = 0; ch < c; ++ch) ws.rt[((j / kLanes) * c + ch) * kLanes + j % kLanes] = r[j * c + ch];
  }
  ws.rn.assign(nblk * kLanes, 0.0f);
  float max_rn = 0.0f;
  if (expansion) {
    for (int64_t j = 0; j < n; ++j) {
      ws.rn[j] = SqNorm(r + j * c, c);
      max_rn = std::isnan(ws.rn[j]) ? std::numeric_limits<float>::infinity() : std::max(max_rn, ws.rn[j]);
    }
  }
  // The queries in groups of kQueryTile ([group][query][channel]; a short last group repeats its last
  // query), their squared norms and error bounds; every output row starts empty.
  const int64_t nq = q_end - q_begin, groups = (nq + kQueryTile - 1) / kQueryTile;
  ws.qpack.resize(groups * kQueryTile * c);
  ws.qn.resize(groups * kQueryTile);
  for (int64_t t = 0; t < groups * kQueryTile; ++t) {
    const float* src = q + (q_begin + std::min(t, nq - 1)) * c;
    std::memcpy(ws.qpack.data() + t * c, src, c * sizeof(float));
    ws.qn[t] = expansion ? SqNorm(src, c) : 0.0f;
  }
  std::vector<TopK> top(nq);
  std::vector<double> eps(nq);
  std::vector<float> seed(nq, std::numeric_limits<float>::infinity());
  const double eps_scale = (4.0 * c + 16.0) * std::ldexp(1.0, -24) * 1.05;
  for (int64_t t = 0; t < nq; ++t) {
    top[t] = TopK{out_d + (q_begin + t) * kk, out_i + (q_begin + t) * kk, kk};
    top[t].Reset();
    eps[t] = eps_scale * (static_cast<double>(ws.qn[t]) + max_rn);
  }
  ws.keys.resize(kQueryTile * kRefChunk);
  ws.exact.resize(kRefChunk);
  ws.cand.resize(kRefChunk);
  ws.seed_d.resize(kk);
  ws.seed_i.resize(kk);

  for (int64_t blk0 = 0; blk0 < nblk; blk0 += kRefChunk / kLanes) {
    const int64_t blk1 = std::min(nblk, blk0 + kRefChunk / kLanes);
    const int64_t j0 = blk0 * kLanes, count = std::min(n, blk1 * kLanes) - j0;
    const float* rt = ws.rt.data() + blk0 * c * kLanes;
    for (int64_t g = 0; g < groups; ++g) {
      const float* qg = ws.qpack.data() + g * kQueryTile * c;
      if (expansion) {
        kernels.expansion(qg, ws.qn.data() + g * kQueryTile, rt, ws.rn.data() + j0, c, blk1 - blk0,
                          ws.keys.data(), kRefChunk);
      } else {
        kernels.direct(qg, rt, c, blk1 - blk0, ws.keys.data(), kRefChunk);
      }
      for (int64_t t = g * kQueryTile; t < std::min(nq, (g + 1) * kQueryTile); ++t) {
        TopK& tk = top[t];
        const float* keys = ws.keys.data() + (t - g * kQueryTile) * kRefChunk;
        if (!expansion) {
          ScanNotAbove(keys, count, [&] { return tk.Worst(); }, [&](int64_t j) {
            tk.Push(std::isnan(keys[j]) ? std::numeric_limits<float>::infinity() : keys[j],
                    static_cast<int32_t>(j0 + j));
          });
          continue;
        }
        // Seed: with k approximate keys <= K (the k-th smallest of the first chunk), the k-th exact
        // distance is <= K + eps, so no neighbour's key exceeds K + 2 eps (+inf if K is not finite).
        const double e = eps[t];
        if (blk0 == 0 && count >= kk) {
          TopK approx{ws.seed_d.data(), ws.seed_i.data(), kk};
          approx.Reset();
          ScanNotAbove(keys, count, [&] { return approx.Worst(); },
                       [&](int64_t j) { approx.Push(NanAsInf(keys[j]), static_cast<int32_t>(j)); });
          if (std::isfinite(approx.Worst())) seed[t] = RoundUp(approx.Worst() + 2.0 * e);
        }
        // Candidates of this chunk under the threshold at its start (seed, or current k-th + eps; +inf
        // while neither is known or if a norm overflowed), refined together, pushed in index order.
        const float thr = std::min(seed[t], RoundUp(tk.Worst() + e));
        int64_t ncand = 0;
        ScanNotAbove(keys, count, [&] { return thr; }, [&](int64_t j) { ws.cand[ncand++] = static_cast<int32_t>(j); });
        const float* qt = ws.qpack.data() + t * c;
        for (int64_t i = 0; i < ncand; ++i) ws.exact[i] = ExactSqDist(qt, r + (j0 + ws.cand[i]) * c, c);
        for (int64_t i = 0; i < ncand; ++i) tk.Push(ws.exact[i], static_cast<int32_t>(j0 + ws.cand[i]));
      }
    }
  }
}

// knn at C = 3 through a k-d tree of each example's refs (kdtree.h) from kKnnTreeMinRefs refs on; below
// (and for C != 3) the brute force above, which gives identical results. Measured with
// XLA_OPS_CPU_SEARCH=tree|brute (shared 2-core Xeon, B=4, self-knn of uniform clouds), brute/tree time:
// N=64: 0.84 (k=1), 0.87 (k=20); N=128: 0.88 (k=1), 1.28 (k=20); N=256: 0.94-1.41 for k=1..256 (k=N);
// N=1024: 2.0 (k=1), 1.6 (k=20), 1.25 (k=N); N=8192: 8.5 (k=1), 3.2 (k=20). Large k does not favour brute
// force (its sorted top-k insertion costs the same), so only N decides.
constexpr int64_t kKnnTreeMinRefs = 256;
constexpr int64_t kKnnTreeMinQueries = 16;  // fewer queries do not pay for building the trees
bool UseKnnTree(int64_t n, int64_t m, int64_t c) {
  return c == 3 && UseTree(n >= kKnnTreeMinRefs && m >= kKnnTreeMinQueries);
}

// The k nearest refs of one query q[3] from the tree of its example's refs; out_d / out_i: [k]. Same result
// as KnnQueries: refs with a NaN/Inf coordinate (not in the tree) and every ref of a query with one are at
// distance NaN or +inf, which rank as +inf, ties by index.
void KnnTreeQuery(const KdTree& tree, const float* q, int64_t kk, float* out_d, int32_t* out_i) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  if (!IsFinite3(q)) {
    for (int64_t j = 0; j < kk; ++j) out_d[j] = kInf, out_i[j] = static_cast<int32_t>(j);
    return;
  }
  TopK top{out_d, out_i, kk};
  top.Reset();
  tree.KNearest(q[0], q[1], q[2], &top);
  for (const int32_t j : tree.nonfinite()) {  // ascending ids: stop at the first that cannot enter
    if (!PairLess(kInf, j, top.Worst(), top.WorstIndex())) break;
    top.Push(kInf, j);
  }
}

ffi::Future KnnImpl(ffi::ThreadPool pool, ffi::AnyBuffer query, ffi::AnyBuffer ref, int32_t k,
                    ffi::Result<ffi::AnyBuffer> dist, ffi::Result<ffi::AnyBuffer> idx) {
  PointShape sq, sr;
  if (ffi::Error e = CheckKnn(kKnn, query, ref, k, *dist, *idx, &sq, &sr); e.failure())
    return FailedFuture(std::move(e));
  const int64_t nb = sq.b, m = sq.n, n = sr.n, c = sq.c, kk = k;

  const float* pq = query.typed_data<float>();
  const float* pr = ref.typed_data<float>();
  float* out_d = dist->typed_data<float>();
  int32_t* out_i = idx->typed_data<int32_t>();
  if (UseKnnTree(n, m, c)) {
    auto trees = std::make_shared<LazyTrees>(pr, nb, n);  // kept alive by the tasks' copies
    return ParallelFor(pool, nb * m, 64, [=](int64_t begin, int64_t end) {
      std::vector<uint64_t> order;
      for (int64_t q0 = begin; q0 < end;) {  // the task's queries of one example at a time
        const int64_t b = q0 / m, q1 = std::min(end, (b + 1) * m);
        const KdTree& tree = trees->Get(b);
        ForEachInSpatialOrder(pq, q0, q1, order, [&](int64_t row) {
          KnnTreeQuery(tree, pq + 3 * row, kk, out_d + row * kk, out_i + row * kk);
        });
        q0 = q1;
      }
    });
  }
  static const Kernels kernels = SelectKernels();
  // Work items are queries; a task prepares the refs of each example it touches (N * C copies), so it gets
  // enough queries to amortise that.
  return ParallelFor(pool, nb * m, 32, [=](int64_t begin, int64_t end) {
    KnnWorkspace ws;
    for (int64_t q0 = begin; q0 < end;) {
      const int64_t b = q0 / m, q1 = std::min(end, (b + 1) * m);
      KnnQueries(kernels, pq + b * m * c, pr + b * n * c, n, c, kk, q0 - b * m, q1 - b * m, ws,
                 out_d + b * m * kk, out_i + b * m * kk);
      q0 = q1;
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BallQueryCpu, BallQueryImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<float>("radius")
                                  .Attr<int32_t>("nsample")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kBallQuery, BallQueryCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupPointsCpu, GroupPointsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kGroup, GroupPointsCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GroupPointsGradCpu, GroupPointsGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoints")
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kGroupGrad, GroupPointsGradCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(KnnCpu, KnnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("k")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kKnn, KnnCpu);

}  // namespace xla_ops
