// farthest_point_sample on CPU: exact FPS from index 0 on squared distances, ties to the lowest index.
//
// Every point keeps its running min squared distance to the picked set; pick t is the argmax after pick
// t-1 updated the distances. Exact, but most of each pass is skipped:
//  * the points are sorted along a Morton curve and cut into blocks of kBlock (spatially compact), each
//    with a bounding box and its current (max distance, lowest original index at that max);
//  * pick c can only lower the distance of a point p with |p - c|^2 < dist[p] <= max of p's block, and
//    |p - c|^2 >= (squared distance from c to the block's box) -- also in float32, since the rounded
//    differences, squares and sums are monotone in their inputs. Blocks whose box is not closer than their
//    max are skipped (their max is unchanged); the others are updated by a branch-free SIMD loop;
//  * the next pick is the lexicographic (max, -original index) argmax over the blocks' summaries.
// Examples run in parallel on XLA's thread pool; within an example the picks are sequential, so a batch of
// 1 uses one thread.
//
// Differences from the original GPU kernel: ties go to the lowest global index (the GPU's tree reduction
// prefers lower thread ids, not strictly lower indices) and the running distance starts at +inf (1e38
// there). A picked point's distance is set to -1, so it is never picked again whatever its coordinates
// (clouds of identical points: once every distinct point is picked, the lowest unpicked index comes next).
// NaN coordinates: a NaN distance never replaces a running minimum, so a NaN point keeps +inf and is picked
// early (lowest index first); a NaN pick lowers nothing. Every output index is in [0, N) and distinct.
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "checks.h"
#include "common.h"

// 256-bit GCC vector types are passed between inline helpers only; silence the ABI note about them.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace xla_ops {
namespace {

constexpr const char* kOp = "xla_ops_farthest_point_sample";
constexpr int kLanes = 8;
constexpr int64_t kBlock = 64;  // points per block (a multiple of kLanes)

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

#define XLA_OPS_INLINE __attribute__((always_inline)) inline
XLA_OPS_INLINE f32x8 Select(i32x8 mask, f32x8 a, f32x8 b) {
  return reinterpret_cast<f32x8>((reinterpret_cast<i32x8>(a) & mask) | (reinterpret_cast<i32x8>(b) & ~mask));
}
XLA_OPS_INLINE i32x8 Select(i32x8 mask, i32x8 a, i32x8 b) { return (a & mask) | (b & ~mask); }
template <typename T>
XLA_OPS_INLINE T Load(const void* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
XLA_OPS_INLINE void Store(void* p, T v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// One example, in Morton order. Points: x, y, z, dist, orig (original index) of n_pad = nblk * kBlock
// entries; padding points have dist -1 (never the max, never lowered). Blocks (nblk_pad, a multiple of
// kLanes): box lo/hi, bmax (max dist), bpos (position of the lowest original index at bmax); padding
// blocks have an empty box (lo = +inf, hi = -inf) and bmax -1. NaN points make their block's box infinite.
struct FpsState {
  float *x, *y, *z, *dist;
  int32_t* orig;
  float *lox, *loy, *loz, *hix, *hiy, *hiz, *bmax;
  int32_t* bpos;
  int64_t nblk, nblk_pad;
};

// Lowers the distances of block b's points with centre c and refreshes the block's summary.
XLA_OPS_INLINE void UpdateBlock(const FpsState& s, int64_t b, float cx, float cy, float cz) {
  f32x8 best = f32x8{} - 2.0f;
  i32x8 best_orig = i32x8{}, best_pos = i32x8{};
  i32x8 pos;
  for (int l = 0; l < kLanes; ++l) pos[l] = static_cast<int32_t>(b * kBlock + l);
  for (int64_t i = b * kBlock; i < (b + 1) * kBlock; i += kLanes, pos += kLanes) {
    const f32x8 dx = Load<f32x8>(s.x + i) - cx, dy = Load<f32x8>(s.y + i) - cy, dz = Load<f32x8>(s.z + i) - cz;
    const f32x8 nd = dx * dx + dy * dy + dz * dz;
    f32x8 d = Load<f32x8>(s.dist + i);
    d = Select(nd < d, nd, d);  // NaN never replaces
    Store(s.dist + i, d);
    const i32x8 o = Load<i32x8>(s.orig + i);
    const i32x8 better = (d > best) | ((d == best) & (o < best_orig));
    best = Select(better, d, best);
    best_orig = Select(better, o, best_orig);
    best_pos = Select(better, pos, best_pos);
  }
  float m = best[0];
  int32_t mo = best_orig[0], mp = best_pos[0];
  for (int l = 1; l < kLanes; ++l) {
    if (best[l] > m || (best[l] == m && best_orig[l] < mo)) {
      m = best[l];
      mo = best_orig[l];
      mp = best_pos[l];
    }
  }
  s.bmax[b] = m;
  s.bpos[b] = mp;
}

XLA_OPS_INLINE void FpsLoopImpl(const FpsState s, int32_t first_pos, int64_t npoint, int32_t* out) {
  int32_t pick = first_pos;
  out[0] = s.orig[pick];
  for (int64_t t = 1; t < npoint; ++t) {
    const float cx = s.x[pick], cy = s.y[pick], cz = s.z[pick];
    // Retire the pick (-1: never the max, never lowered) and refresh its block's summary, which the box
    // test below may skip (e.g. a block of identical points has max 0 and box distance 0).
    s.dist[pick] = -1.0f;
    UpdateBlock(s, pick / kBlock, cx, cy, cz);
    for (int64_t b0 = 0; b0 < s.nblk_pad; b0 += kLanes) {
      // Squared distance from c to 8 boxes (per axis: the gap max(lo - c, c - hi, 0)).
      f32x8 gx = Load<f32x8>(s.lox + b0) - cx, gy = Load<f32x8>(s.loy + b0) - cy, gz = Load<f32x8>(s.loz + b0) - cz;
      const f32x8 ux = cx - Load<f32x8>(s.hix + b0), uy = cy - Load<f32x8>(s.hiy + b0), uz = cz - Load<f32x8>(s.hiz + b0);
      gx = Select(ux > gx, ux, gx);
      gy = Select(uy > gy, uy, gy);
      gz = Select(uz > gz, uz, gz);
      const f32x8 zero{};
      gx = Select(gx > zero, gx, zero);
      gy = Select(gy > zero, gy, zero);
      gz = Select(gz > zero, gz, zero);
      const i32x8 update = (gx * gx + gy * gy + gz * gz) < Load<f32x8>(s.bmax + b0);
      for (int l = 0; l < kLanes; ++l) {
        if (update[l]) UpdateBlock(s, b0 + l, cx, cy, cz);
      }
    }
    // Next pick: the largest block max, ties to the lowest original index.
    f32x8 vmax = Load<f32x8>(s.bmax);
    for (int64_t b0 = kLanes; b0 < s.nblk_pad; b0 += kLanes) {
      const f32x8 v = Load<f32x8>(s.bmax + b0);
      vmax = Select(v > vmax, v, vmax);
    }
    float m = vmax[0];
    for (int l = 1; l < kLanes; ++l) m = vmax[l] > m ? vmax[l] : m;
    int32_t mp = -1;
    for (int64_t b0 = 0; b0 < s.nblk_pad; b0 += kLanes) {
      const i32x8 hit = Load<f32x8>(s.bmax + b0) == m;
      for (int l = 0; l < kLanes; ++l) {
        if (hit[l] && (mp < 0 || s.orig[s.bpos[b0 + l]] < s.orig[mp])) mp = s.bpos[b0 + l];
      }
    }
    pick = mp;
    out[t] = s.orig[pick];
  }
}

void FpsLoopDefault(const FpsState& s, int32_t first_pos, int64_t npoint, int32_t* out) {
  FpsLoopImpl(s, first_pos, npoint, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
// Same arithmetic (no FMA), so the result does not depend on which version runs.
__attribute__((target("avx2"))) void FpsLoopAvx2(const FpsState& s, int32_t first_pos, int64_t npoint,
                                                 int32_t* out) {
  FpsLoopImpl(s, first_pos, npoint, out);
}
#endif

using FpsFn = void (*)(const FpsState&, int32_t, int64_t, int32_t*);

FpsFn SelectFps() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2")) return FpsLoopAvx2;
#endif
  return FpsLoopDefault;
}

// Spreads the low 10 bits of v to every third bit (Morton interleaving).
uint32_t Spread3(uint32_t v) {
  v &= 0x3ff;
  v = (v | (v << 16)) & 0x030000ff;
  v = (v | (v << 8)) & 0x0300f00f;
  v = (v | (v << 4)) & 0x030c30c3;
  v = (v | (v << 2)) & 0x09249249;
  return v;
}

// Per-task buffers.
struct FpsWorkspace {
  std::vector<float> f;
  std::vector<int32_t> i;
  std::vector<std::pair<uint32_t, int32_t>> keys;
};

// FPS of one example p [n, 3] -> out [npoint] (original indices).
void FpsExample(FpsFn loop, const float* p, int64_t n, int64_t npoint, FpsWorkspace& ws, int32_t* out) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // Morton order over the bounding box of the finite points; points with NaN/inf coordinates go last.
  float lo[3] = {kInf, kInf, kInf}, hi[3] = {-kInf, -kInf, -kInf};
  for (int64_t j = 0; j < n; ++j) {
    for (int a = 0; a < 3; ++a) {
      const float v = p[3 * j + a];
      if (std::isfinite(v)) {
        lo[a] = std::min(lo[a], v);
        hi[a] = std::max(hi[a], v);
      }
    }
  }
  ws.keys.resize(n);
  for (int64_t j = 0; j < n; ++j) {
    uint32_t code = 0;
    bool finite = true;
    for (int a = 0; a < 3; ++a) {
      const float v = p[3 * j + a];
      finite = finite && std::isfinite(v);
      const float scale = hi[a] > lo[a] ? 1023.0f / (hi[a] - lo[a]) : 0.0f;
      const float q = finite ? (v - lo[a]) * scale : 0.0f;
      code |= Spread3(static_cast<uint32_t>(std::min(1023.0f, std::max(0.0f, q)))) << a;
    }
    ws.keys[j] = {finite ? code : 0xffffffffu, static_cast<int32_t>(j)};
  }
  std::sort(ws.keys.begin(), ws.keys.end());

  const int64_t nblk = (n + kBlock - 1) / kBlock, n_pad = nblk * kBlock;
  const int64_t nblk_pad = (nblk + kLanes - 1) / kLanes * kLanes;
  ws.f.resize(4 * n_pad + 7 * nblk_pad);
  ws.i.resize(n_pad + nblk_pad);
  FpsState s;
  s.x = ws.f.data();
  s.y = s.x + n_pad;
  s.z = s.y + n_pad;
  s.dist = s.z + n_pad;
  s.lox = s.dist + n_pad;
  s.loy = s.lox + nblk_pad;
  s.loz = s.loy + nblk_pad;
  s.hix = s.loz + nblk_pad;
  s.hiy = s.hix + nblk_pad;
  s.hiz = s.hiy + nblk_pad;
  s.bmax = s.hiz + nblk_pad;
  s.orig = ws.i.data();
  s.bpos = s.orig + n_pad;
  s.nblk = nblk;
  s.nblk_pad = nblk_pad;
  int32_t first_pos = 0;
  for (int64_t i = 0; i < n_pad; ++i) {
    if (i < n) {
      const int32_t j = ws.keys[i].second;
      s.x[i] = p[3 * j];
      s.y[i] = p[3 * j + 1];
      s.z[i] = p[3 * j + 2];
      s.dist[i] = kInf;
      s.orig[i] = j;
      if (j == 0) first_pos = static_cast<int32_t>(i);
    } else {
      s.x[i] = s.y[i] = s.z[i] = 0.0f;
      s.dist[i] = -1.0f;
      s.orig[i] = std::numeric_limits<int32_t>::max();
    }
  }
  for (int64_t b = 0; b < nblk_pad; ++b) {
    float* const box[6] = {s.lox + b, s.loy + b, s.loz + b, s.hix + b, s.hiy + b, s.hiz + b};
    for (int a = 0; a < 3; ++a) {
      *box[a] = kInf;
      *box[3 + a] = -kInf;
    }
    s.bmax[b] = -1.0f;
    s.bpos[b] = static_cast<int32_t>(std::min(b, nblk - 1) * kBlock);
    for (int64_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); ++i) {
      const float v[3] = {s.x[i], s.y[i], s.z[i]};
      for (int a = 0; a < 3; ++a) {
        const bool nan = std::isnan(v[a]);
        *box[a] = nan ? -kInf : std::min(*box[a], v[a]);
        *box[3 + a] = nan ? kInf : std::max(*box[3 + a], v[a]);
      }
      s.bmax[b] = kInf;
      if (s.orig[i] < s.orig[s.bpos[b]]) s.bpos[b] = static_cast<int32_t>(i);
    }
  }
  loop(s, first_pos, npoint, out);
}

// `workspace` ([..., N] float32) is used by the CUDA handler only; both platforms share the call signature.
ffi::Future FpsImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz, int32_t npoint, ffi::Result<ffi::AnyBuffer> idx,
                    ffi::Result<ffi::AnyBuffer> workspace) {
  PointShape s;
  if (ffi::Error e = CheckFarthestPointSample(kOp, xyz, npoint, *idx, *workspace, &s); e.failure())
    return FailedFuture(std::move(e));

  const int64_t nb = s.b, n = s.n, np = npoint;
  const float* in = xyz.typed_data<float>();
  int32_t* out = idx->typed_data<int32_t>();
  static const FpsFn loop = SelectFps();
  return ParallelFor(pool, nb, 1, [=](int64_t begin, int64_t end) {
    FpsWorkspace ws;
    for (int64_t b = begin; b < end; ++b) FpsExample(loop, in + b * n * 3, n, np, ws, out + b * np);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FarthestPointSampleCpu, FpsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<int32_t>("npoint")
                                  .Ret<ffi::AnyBuffer>()    // idx
                                  .Ret<ffi::AnyBuffer>());  // workspace (CUDA only)
XLA_OPS_REGISTER(kOp, FarthestPointSampleCpu);

}  // namespace xla_ops
