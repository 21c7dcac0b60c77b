// Approximate EMD on CPU: approx_match (the multi-scale soft auction of the original GPU kernel,
// metric/tf_approxmatch_g.cu), match_cost and match_cost_grad. float32 throughout, like the GPU kernel.
//
// Parallelism and determinism: approx_match is 10 rounds of 3 passes (ratioL over xyz1, ratioR over xyz2,
// match/remainL over xyz1) on Morton-sorted copies of the clouds; each pass is split into fixed blocks of
// kMatchBlock points. With >= 1 batch item per thread every task runs one item's rounds; otherwise the
// blocks of each pass run on XLA's intra-op pool and the calling thread with a barrier between passes.
// Either way every output element is computed by exactly one thread in the same fixed order, so results do
// not depend on the thread count or the batch size. Memory: O(B * (n + m)) besides the [B, m, n] output.
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>

#include "common.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// The hot loops are compiled twice (AVX2+FMA and baseline x86-64) and picked at load time. They need
// -fno-trapping-math to vectorise (the selects compare floats); nothing here relies on floating-point
// exception flags. Header functions (std::max) would not be inlined into code compiled with other
// optimisation options, hence the local Min/Max. sqrt is avoided (RSqrt): it sets errno, and a pragma
// cannot turn -fmath-errno off.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define XLA_OPS_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#pragma GCC optimize("no-trapping-math")
#else
#define XLA_OPS_SIMD_CLONES
#endif

namespace xla_ops {
namespace {

constexpr const char* kMatchOp = "xla_ops_approx_match";
constexpr const char* kCostOp = "xla_ops_match_cost";
constexpr const char* kCostGradOp = "xla_ops_match_cost_grad";
constexpr int64_t kBlock = 256;      // points per match_cost work item (fixed: independent of the thread count)
constexpr int64_t kMatchBlock = 128; // points per approx_match work item (small: finer culling, see OutOfReach)
constexpr int kRounds = 10;      // j = 7, 6, ..., -2

// Runs fn(item) for every item in [0, count) on the pool and on the calling thread, and returns when all
// are done (a barrier). Unlike ParallelFor (common.h) it blocks, which lets a handler run several dependent
// passes while its ThreadPool context is valid. It cannot deadlock: the caller works through the items
// itself and only waits for items that a running thread has already taken.
void RunParallel(const ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> fn) {
  if (count <= 0) return;
  struct State {
    std::function<void(int64_t)> fn;
    int64_t count;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->fn = std::move(fn);
  state->count = count;
  auto work = [](State& s) {
    for (int64_t i = s.next.fetch_add(1); i < s.count; i = s.next.fetch_add(1)) {
      s.fn(i);
      if (s.done.fetch_add(1) + 1 == s.count) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count - 1);
  ffi::ThreadPool pool_copy = pool;
  // A helper that starts late finds no item left and returns without touching fn's captures.
  for (int64_t h = 0; h < helpers; ++h) pool_copy.Schedule([state, work]() { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == state->count; });
}

int64_t NumBlocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

template <typename To, typename From>
inline To BitCast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// exp(x) for x <= 0 in float32, branch-free so that the loops vectorise: Cephes expf (range reduction by
// ln 2, degree-5 polynomial, ~1 ulp). Results below 2^-125 (x < -87) are flushed to 0 instead of becoming
// denormals; NaN stays NaN.
inline float ExpNonPositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = x < -87.0f ? -87.0f : x;
  const float t = xc * kLog2e + kRound;
  const float nf = t - kRound;
  const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = BitCast<int32_t>(t) - BitCast<int32_t>(kRound);
  const float y = p * BitCast<float>((e + 127) << 23);
  return x < -87.0f ? 0.0f : y;
}

// Sets flush-to-zero and denormals-are-zero for the current thread while alive: the tiny products of the
// early, sharp rounds (exp(-80) * ratio) would otherwise hit the very slow denormal paths of x86 CPUs.
class FlushDenormals {
 public:
#if defined(__SSE__)
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#endif
};

inline float Min(float a, float b) { return b < a ? b : a; }
inline float Max(float a, float b) { return a < b ? b : a; }

// 1/sqrt(x) for x >= 0 without libm (std::sqrt sets errno, which keeps GCC from vectorising it even under the
// optimize pragma): bit-trick estimate and three Newton steps, a relative error of a few float ulp.
// RSqrt(0) is a large finite number, so x * RSqrt(x) is 0 at x = 0.
inline float RSqrt(float x) {
  float y = BitCast<float>(0x5f375a86 - (BitCast<int32_t>(x) >> 1));
  const float half_x = 0.5f * x;
  y = y * (1.5f - half_x * y * y);
  y = y * (1.5f - half_x * y * y);
  return y * (1.5f - half_x * y * y);
}

inline float SqDist(float x1, float y1, float z1, float x2, float y2, float z2) {
  const float dx = x2 - x1, dy = y2 - y1, dz = z2 - z1;
  return dx * dx + dy * dy + dz * dz;
}

// Points of all batch items as structure of arrays (x[B*n], y[B*n], z[B*n]).
struct Soa {
  std::vector<float> x, y, z;
  Soa(const float* xyz, int64_t count) : x(count), y(count), z(count) {
    for (int64_t i = 0; i < count; ++i) {
      x[i] = xyz[3 * i];
      y[i] = xyz[3 * i + 1];
      z[i] = xyz[3 * i + 2];
    }
  }
};

// Orders the points of one cloud along a Morton (Z-order) curve of their bounding box, so that blocks of
// consecutive sorted points are spatially compact. Returns sorted position -> original index.
std::vector<int32_t> MortonOrder(const float* xyz, int64_t count) {
  float lo[3], hi[3];
  for (int c = 0; c < 3; ++c) lo[c] = hi[c] = xyz[c];
  for (int64_t i = 0; i < count; ++i)
    for (int c = 0; c < 3; ++c) lo[c] = std::min(lo[c], xyz[3 * i + c]), hi[c] = std::max(hi[c], xyz[3 * i + c]);
  auto spread = [](uint32_t v) {  // 10 bits -> every third bit of 30
    v = (v | (v << 16)) & 0x030000FFu;
    v = (v | (v << 8)) & 0x0300F00Fu;
    v = (v | (v << 4)) & 0x030C30C3u;
    return (v | (v << 2)) & 0x09249249u;
  };
  std::vector<uint64_t> keys(count);
  for (int64_t i = 0; i < count; ++i) {
    uint32_t code = 0;
    for (int c = 0; c < 3; ++c) {
      const float extent = hi[c] - lo[c];
      const float t = extent > 0.0f ? (xyz[3 * i + c] - lo[c]) / extent : 0.0f;
      code |= spread(static_cast<uint32_t>(std::min(1023.0f, std::max(0.0f, t * 1024.0f)))) << c;
    }
    keys[i] = (static_cast<uint64_t>(code) << 32) | static_cast<uint64_t>(i);  // unique: deterministic order
  }
  std::sort(keys.begin(), keys.end());
  std::vector<int32_t> order(count);
  for (int64_t i = 0; i < count; ++i) order[i] = static_cast<int32_t>(keys[i] & 0xFFFFFFFFu);
  return order;
}

// Rewrites one example's match, computed with rows/columns in sorted order, into the original order in
// place (O(n + m) extra memory): row lp, column kp go to row order2[lp], column order1[kp].
void UnsortColumns(float* row, const int32_t* order1, int64_t n) {
  std::vector<float> tmp(n);
  for (int64_t k = 0; k < n; ++k) tmp[order1[k]] = row[k];
  std::copy(tmp.begin(), tmp.end(), row);
}

void UnsortRows(float* match, const int32_t* order2, int64_t m, int64_t n) {
  std::vector<int32_t> sorted_pos(m);
  for (int64_t l = 0; l < m; ++l) sorted_pos[order2[l]] = static_cast<int32_t>(l);
  std::vector<char> placed(m, 0);
  std::vector<float> tmp(n);
  for (int64_t start = 0; start < m; ++start) {  // follow each permutation cycle once
    if (placed[start]) continue;
    std::copy(match + start * n, match + (start + 1) * n, tmp.begin());
    for (int64_t p = start;;) {
      placed[p] = 1;
      const int64_t q = sorted_pos[p];  // the sorted row that belongs at original row p
      if (q == start) {
        std::copy(tmp.begin(), tmp.end(), match + p * n);
        break;
      }
      std::copy(match + q * n, match + (q + 1) * n, match + p * n);
      p = q;
    }
  }
}

// ---- approx_match passes (one block of points of one batch item each) ----------------------------------
// Culling: exp(level * d^2) is exactly 0 (ExpNonPositive flushes below -87) for every pair of a point and a
// block when level * (squared distance to the block's bounding box) < -88 (1% margin for rounding), so such
// pairs are skipped without changing any result. Blocks of sorted points are compact, so in the sharp early
// rounds most pairs are skipped.
struct Box {
  float lo[3], hi[3];
};

inline Box BoundingBox(const float* x, const float* y, const float* z, int64_t count) {
  Box b{{x[0], y[0], z[0]}, {x[0], y[0], z[0]}};
  for (int64_t i = 1; i < count; ++i) {
    b.lo[0] = Min(b.lo[0], x[i]), b.hi[0] = Max(b.hi[0], x[i]);
    b.lo[1] = Min(b.lo[1], y[i]), b.hi[1] = Max(b.hi[1], y[i]);
    b.lo[2] = Min(b.lo[2], z[i]), b.hi[2] = Max(b.hi[2], z[i]);
  }
  return b;
}

inline bool OutOfReach(const Box& b, float x, float y, float z, float level) {
  const float dx = Max(Max(b.lo[0] - x, x - b.hi[0]), 0.0f);
  const float dy = Max(Max(b.lo[1] - y, y - b.hi[1]), 0.0f);
  const float dz = Max(Max(b.lo[2] - z, z - b.hi[2]), 0.0f);
  return level * (dx * dx + dy * dy + dz * dz) < -88.0f;
}

// The bounding boxes of a block and of its sub-blocks of kSubBlock points (two-level culling).
constexpr int64_t kSubBlock = 32;
struct BlockBoxes {
  Box whole;
  Box sub[kMatchBlock / kSubBlock];
  int64_t count, num_sub;
  BlockBoxes(const float* x, const float* y, const float* z, int64_t count_)
      : count(count_), num_sub((count_ + kSubBlock - 1) / kSubBlock) {
    for (int64_t s = 0; s < num_sub; ++s) {
      const int64_t begin = s * kSubBlock;
      sub[s] = BoundingBox(x + begin, y + begin, z + begin, std::min(kSubBlock, count - begin));
    }
    whole = count > 0 ? BoundingBox(x, y, z, count) : Box{};
  }
  // Calls fn(begin, end) for the sub-block ranges that (x, y, z) can reach at this level.
  template <typename Fn>
  void ForReachable(float x, float y, float z, float level, Fn fn) const {
    if (OutOfReach(whole, x, y, z, level)) return;
    for (int64_t s = 0; s < num_sub; ++s)
      if (!OutOfReach(sub[s], x, y, z, level)) fn(s * kSubBlock, std::min(count, (s + 1) * kSubBlock));
  }
};

// Pass 1: ratio_l[k] = remain_l[k] / (1e-9 + sum_l exp(level d_kl) remain_r[l]) for the block's k. Points
// with remain_l == 0 get ratio 0 without the sum, and rows with remain_r == 0 add exactly 0, so both are
// skipped (the inputs are finite).
XLA_OPS_SIMD_CLONES
void RatioLeft(const float* px, const float* py, const float* pz, int64_t count, const float* qx,
               const float* qy, const float* qz, const float* remain_r, int64_t m, float level,
               const float* remain_l, float* ratio_l) {
  FlushDenormals ftz;
  float acc[kMatchBlock], x1[kMatchBlock], y1[kMatchBlock], z1[kMatchBlock];
  int64_t slot[kMatchBlock];
  int64_t active = 0;
  for (int64_t k = 0; k < count; ++k) {
    ratio_l[k] = 0.0f;
    if (remain_l[k] == 0.0f) continue;
    x1[active] = px[k], y1[active] = py[k], z1[active] = pz[k], slot[active] = k;
    acc[active++] = 1e-9f;
  }
  if (active == 0) return;
  const BlockBoxes boxes(x1, y1, z1, active);
  for (int64_t l = 0; l < m; ++l) {
    const float r = remain_r[l];
    if (r == 0.0f) continue;
    const float x2 = qx[l], y2 = qy[l], z2 = qz[l];
    boxes.ForReachable(x2, y2, z2, level, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k)
        acc[k] += ExpNonPositive(level * SqDist(x1[k], y1[k], z1[k], x2, y2, z2)) * r;
    });
  }
  for (int64_t k = 0; k < active; ++k) ratio_l[slot[k]] = remain_l[slot[k]] / acc[k];
}

// Pass 2: for the block's l, s = remain_r[l] * sum_k exp(level d_kl) ratio_l[k]; ratio_r[l] =
// min(remain_r[l] / (s + 1e-9), 1) * remain_r[l]; remain_r[l] = max(0, remain_r[l] - s). Points with
// remain_r == 0 keep it and get ratio 0 without the sum; columns with ratio_l == 0 add exactly 0.
XLA_OPS_SIMD_CLONES
void RatioRight(const float* qx, const float* qy, const float* qz, int64_t count, const float* px,
                const float* py, const float* pz, const float* ratio_l, int64_t n, float level,
                float* remain_r, float* ratio_r) {
  FlushDenormals ftz;
  float acc[kMatchBlock], x2[kMatchBlock], y2[kMatchBlock], z2[kMatchBlock];
  int64_t slot[kMatchBlock];
  int64_t active = 0;
  for (int64_t l = 0; l < count; ++l) {
    ratio_r[l] = 0.0f;
    if (remain_r[l] == 0.0f) continue;
    x2[active] = qx[l], y2[active] = qy[l], z2[active] = qz[l], slot[active] = l;
    acc[active++] = 0.0f;
  }
  if (active == 0) return;
  const BlockBoxes boxes(x2, y2, z2, active);
  for (int64_t k = 0; k < n; ++k) {
    const float rl = ratio_l[k];
    if (rl == 0.0f) continue;
    const float x1 = px[k], y1 = py[k], z1 = pz[k];
    boxes.ForReachable(x1, y1, z1, level, [&](int64_t begin, int64_t end) {
      for (int64_t l = begin; l < end; ++l)
        acc[l] += ExpNonPositive(level * SqDist(x1, y1, z1, x2[l], y2[l], z2[l])) * rl;
    });
  }
  for (int64_t i = 0; i < active; ++i) {
    const int64_t l = slot[i];
    const float remain = remain_r[l];
    const float s = acc[i] * remain;
    ratio_r[l] = Min(remain / (s + 1e-9f), 1.0f) * remain;
    remain_r[l] = Max(0.0f, remain - s);
  }
}

// Pass 3: match[l, k] += w = exp(level d_kl) ratio_l[k] ratio_r[l]; remain_l[k] = max(0, remain_l[k] - sum_l w)
// for the block's k. `match` points at column k0 of row 0 (row stride n).
XLA_OPS_SIMD_CLONES
void UpdateMatch(const float* px, const float* py, const float* pz, int64_t count, const float* qx,
                 const float* qy, const float* qz, const float* ratio_r, int64_t m, float level,
                 const float* ratio_l, float* remain_l, float* match, int64_t n) {
  FlushDenormals ftz;
  float acc[kMatchBlock];
  for (int64_t k = 0; k < count; ++k) acc[k] = 0.0f;
  const BlockBoxes boxes(px, py, pz, count);
  for (int64_t l = 0; l < m; ++l) {
    const float rr = ratio_r[l];
    if (rr == 0.0f) continue;
    const float x2 = qx[l], y2 = qy[l], z2 = qz[l];
    float* row = match + l * n;
    boxes.ForReachable(x2, y2, z2, level, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const float w = ExpNonPositive(level * SqDist(px[k], py[k], pz[k], x2, y2, z2)) * ratio_l[k] * rr;
        row[k] += w;
        acc[k] += w;
      }
    });
  }
  for (int64_t k = 0; k < count; ++k) remain_l[k] = Max(0.0f, remain_l[k] - acc[k]);
}

bool AllFinite(const float* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

ffi::Error CheckPair(const char* op, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, PointShape* s1, PointShape* s2) {
  auto a = AsPointShape(xyz1.dimensions(), "xyz1");
  if (a.has_error()) return a.error();
  auto b = AsPointShape(xyz2.dimensions(), "xyz2");
  if (b.has_error()) return b.error();
  if (xyz1.element_type() != ffi::F32 || xyz2.element_type() != ffi::F32)
    return InvalidArgument(op, "xyz1 and xyz2 must be float32");
  if (a->c != 3 || b->c != 3)
    return InvalidArgument(op, "xyz1 and xyz2 must have 3 channels, got " + std::to_string(a->c) + " and " +
                                   std::to_string(b->c));
  if (a->b != b->b)
    return InvalidArgument(op, "batch mismatch: xyz1 has " + std::to_string(a->b) + ", xyz2 has " +
                                   std::to_string(b->b));
  if (a->n < 1 || b->n < 1) return InvalidArgument(op, "xyz1 and xyz2 need at least one point");
  *s1 = *a;
  *s2 = *b;
  return ffi::Error::Success();
}

ffi::Error ApproxMatchImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2,
                           ffi::Result<ffi::AnyBuffer> match) {
  PointShape s1, s2;
  if (auto err = CheckPair(kMatchOp, xyz1, xyz2, &s1, &s2); err.failure()) return err;
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
  if (match->element_type() != ffi::F32 || static_cast<int64_t>(match->element_count()) != nb * m * n)
    return InvalidArgument(kMatchOp, "match must be float32 [..., m, n]");
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();
  float* out = match->typed_data<float>();

  // Points sorted along a Morton curve per example (see OutOfReach); match is computed in that order and
  // put back into the original order at the end.
  std::vector<int32_t> order1(nb * n), order2(nb * m);
  std::vector<float> sorted1(nb * n * 3), sorted2(nb * m * 3);
  auto sort_cloud = [](const float* xyz, int64_t count, int32_t* order, float* sorted) {
    const std::vector<int32_t> o = MortonOrder(xyz, count);
    for (int64_t i = 0; i < count; ++i) {
      order[i] = o[i];
      for (int c = 0; c < 3; ++c) sorted[3 * i + c] = xyz[3 * o[i] + c];
    }
  };
  for (int64_t i = 0; i < nb; ++i) {
    sort_cloud(p1 + i * n * 3, n, &order1[i * n], &sorted1[i * n * 3]);
    sort_cloud(p2 + i * m * 3, m, &order2[i * m], &sorted2[i * m * 3]);
  }
  const Soa a(sorted1.data(), nb * n), b(sorted2.data(), nb * m);
  const float mass_l = n >= m ? 1.0f : static_cast<float>(m / n);
  const float mass_r = n >= m ? static_cast<float>(n / m) : 1.0f;
  std::vector<float> remain_l(nb * n, mass_l), ratio_l(nb * n), remain_r(nb * m, mass_r), ratio_r(nb * m);
  std::vector<char> finite(nb);
  for (int64_t i = 0; i < nb; ++i)
    finite[i] = AllFinite(p1 + i * n * 3, n * 3) && AllFinite(p2 + i * m * 3, m * 3);

  const int64_t blocks_l = (n + kMatchBlock - 1) / kMatchBlock, blocks_r = (m + kMatchBlock - 1) / kMatchBlock;
  auto level_of = [](int round) {
    return round == kRounds - 1 ? 0.0f : -std::pow(4.0f, static_cast<float>(7 - round));
  };
  // The three passes of one round for one block of batch item i.
  auto ratio_left = [&](int64_t i, int64_t block, float level) {
    const int64_t k0 = block * kMatchBlock, o1 = i * n + k0, o2 = i * m;
    RatioLeft(&a.x[o1], &a.y[o1], &a.z[o1], std::min(kMatchBlock, n - k0), &b.x[o2], &b.y[o2], &b.z[o2],
              &remain_r[o2], m, level, &remain_l[o1], &ratio_l[o1]);
  };
  auto ratio_right = [&](int64_t i, int64_t block, float level) {
    const int64_t l0 = block * kMatchBlock, o2 = i * m + l0, o1 = i * n;
    RatioRight(&b.x[o2], &b.y[o2], &b.z[o2], std::min(kMatchBlock, m - l0), &a.x[o1], &a.y[o1], &a.z[o1],
               &ratio_l[o1], n, level, &remain_r[o2], &ratio_r[o2]);
  };
  auto update_match = [&](int64_t i, int64_t block, float level) {
    const int64_t k0 = block * kMatchBlock, o1 = i * n + k0, o2 = i * m;
    UpdateMatch(&a.x[o1], &a.y[o1], &a.z[o1], std::min(kMatchBlock, n - k0), &b.x[o2], &b.y[o2], &b.z[o2],
                &ratio_r[o2], m, level, &ratio_l[o1], &remain_l[o1], out + i * m * n + k0, n);
  };
  auto init_item = [&](int64_t i) {  // zeros, or NaN for an example with a non-finite coordinate
    std::fill(out + i * m * n, out + (i + 1) * m * n, finite[i] ? 0.0f : std::numeric_limits<float>::quiet_NaN());
  };

  // Two schedules with identical arithmetic (same blocks, same order within each output element): with at
  // least one batch item per thread, one task per item runs all its rounds (no barriers: a pass over 1k
  // points is shorter than the time a pool thread takes to wake up on a busy machine); otherwise every pass
  // is split into blocks over all items, with a barrier between passes (B = 1 at 16k points).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (nb >= threads) {
    RunParallel(pool, nb, [&](int64_t i) {
      init_item(i);
      if (!finite[i]) return;
      for (int round = 0; round < kRounds; ++round) {
        const float level = level_of(round);
        for (int64_t blk = 0; blk < blocks_l; ++blk) ratio_left(i, blk, level);
        for (int64_t blk = 0; blk < blocks_r; ++blk) ratio_right(i, blk, level);
        for (int64_t blk = 0; blk < blocks_l; ++blk) update_match(i, blk, level);
      }
      for (int64_t l = 0; l < m; ++l) UnsortColumns(out + (i * m + l) * n, &order1[i * n], n);
      UnsortRows(out + i * m * n, &order2[i * m], m, n);
    });
    return ffi::Error::Success();
  }
  RunParallel(pool, nb, init_item);
  for (int round = 0; round < kRounds; ++round) {
    const float level = level_of(round);
    RunParallel(pool, nb * blocks_l, [&](int64_t item) {
      if (finite[item / blocks_l]) ratio_left(item / blocks_l, item % blocks_l, level);
    });
    RunParallel(pool, nb * blocks_r, [&](int64_t item) {
      if (finite[item / blocks_r]) ratio_right(item / blocks_r, item % blocks_r, level);
    });
    RunParallel(pool, nb * blocks_l, [&](int64_t item) {
      if (finite[item / blocks_l]) update_match(item / blocks_l, item % blocks_l, level);
    });
  }
  RunParallel(pool, nb * m, [&](int64_t row) {
    if (finite[row / m]) UnsortColumns(out + row * n, &order1[(row / m) * n], n);
  });
  RunParallel(pool, nb, [&](int64_t i) {
    if (finite[i]) UnsortRows(out + i * m * n, &order2[i * m], m, n);
  });
  return ffi::Error::Success();
}

// ---- match_cost and its gradient -------------------------------------------------------------------
// For the block of xyz1 points k: column sums over l of match[l, k] * ||p_k - q_l|| (cost) and, when
// grad1 != nullptr, of match[l, k] * (p_k - q_l) / max(||p_k - q_l||, 1e-10).
XLA_OPS_SIMD_CLONES
void CostColumns(const float* px, const float* py, const float* pz, int64_t count, const float* qx,
                 const float* qy, const float* qz, int64_t m, const float* match, int64_t n, float* cost,
                 float* grad1) {
  float acc[kBlock], gx[kBlock], gy[kBlock], gz[kBlock];
  for (int64_t k = 0; k < count; ++k) acc[k] = gx[k] = gy[k] = gz[k] = 0.0f;
  for (int64_t l = 0; l < m; ++l) {
    const float x2 = qx[l], y2 = qy[l], z2 = qz[l];
    const float* row = match + l * n;
    if (grad1 == nullptr) {
      for (int64_t k = 0; k < count; ++k) {
        const float d2 = SqDist(px[k], py[k], pz[k], x2, y2, z2);
        acc[k] += row[k] * (d2 * RSqrt(d2));
      }
    } else {
      for (int64_t k = 0; k < count; ++k) {
        const float dx = px[k] - x2, dy = py[k] - y2, dz = pz[k] - z2;
        const float g = row[k] * RSqrt(Max(dx * dx + dy * dy + dz * dz, 1e-20f));
        gx[k] += g * dx;
        gy[k] += g * dy;
        gz[k] += g * dz;
      }
    }
  }
  if (grad1 == nullptr) {
    for (int64_t k = 0; k < count; ++k) cost[k] = acc[k];
  } else {
    for (int64_t k = 0; k < count; ++k) {
      grad1[3 * k] = gx[k];
      grad1[3 * k + 1] = gy[k];
      grad1[3 * k + 2] = gz[k];
    }
  }
}

// grad2[l] = sum_k match[l, k] * (q_l - p_k) / max(||q_l - p_k||, 1e-10) for the block's l; each row is summed
// in 8 interleaved lanes (fixed order, vectorisable) that are added up in lane order.
XLA_OPS_SIMD_CLONES
void GradRows(const float* qx, const float* qy, const float* qz, int64_t count, const float* px,
              const float* py, const float* pz, int64_t n, const float* match, float* grad2) {
  constexpr int kLanes = 8;
  for (int64_t l = 0; l < count; ++l) {
    const float x2 = qx[l], y2 = qy[l], z2 = qz[l];
    const float* row = match + l * n;
    float gx[kLanes] = {}, gy[kLanes] = {}, gz[kLanes] = {};
    int64_t k0 = 0;
    for (; k0 + kLanes <= n; k0 += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float dx = x2 - px[k0 + j], dy = y2 - py[k0 + j], dz = z2 - pz[k0 + j];
        const float g = row[k0 + j] * RSqrt(Max(dx * dx + dy * dy + dz * dz, 1e-20f));
        gx[j] += g * dx;
        gy[j] += g * dy;
        gz[j] += g * dz;
      }
    }
    for (int j = 0; k0 + j < n; ++j) {
      const float dx = x2 - px[k0 + j], dy = y2 - py[k0 + j], dz = z2 - pz[k0 + j];
      const float g = row[k0 + j] * RSqrt(Max(dx * dx + dy * dy + dz * dz, 1e-20f));
      gx[j] += g * dx;
      gy[j] += g * dy;
      gz[j] += g * dz;
    }
    float sx = 0.0f, sy = 0.0f, sz = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      sx += gx[j];
      sy += gy[j];
      sz += gz[j];
    }
    grad2[3 * l] = sx;
    grad2[3 * l + 1] = sy;
    grad2[3 * l + 2] = sz;
  }
}

ffi::Error CheckMatch(const char* op, ffi::AnyBuffer match, const PointShape& s1, const PointShape& s2) {
  const auto dims = match.dimensions();
  if (match.element_type() != ffi::F32 || dims.size() < 2 || dims[dims.size() - 2] != s2.n ||
      dims[dims.size() - 1] != s1.n || LeadingSize(dims, 2) != s1.b)
    return InvalidArgument(op, "match must be float32 [..., m, n] with m = " + std::to_string(s2.n) +
                                   ", n = " + std::to_string(s1.n) + " and the batch of xyz1");
  return ffi::Error::Success();
}

ffi::Error MatchCostImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer match,
                         ffi::Result<ffi::AnyBuffer> cost) {
  PointShape s1, s2;
  if (auto err = CheckPair(kCostOp, xyz1, xyz2, &s1, &s2); err.failure()) return err;
  if (auto err = CheckMatch(kCostOp, match, s1, s2); err.failure()) return err;
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
  if (cost->element_type() != ffi::F32 || static_cast<int64_t>(cost->element_count()) != nb)
    return InvalidArgument(kCostOp, "cost must be float32 [...]");
  const Soa a(xyz1.typed_data<float>(), nb * n), b(xyz2.typed_data<float>(), nb * m);
  const float* mt = match.typed_data<float>();
  std::vector<float> columns(nb * n);
  const int64_t blocks = NumBlocks(n);
  RunParallel(pool, nb * blocks, [&](int64_t item) {
    const int64_t i = item / blocks, k0 = (item % blocks) * kBlock, cnt = std::min(kBlock, n - k0);
    const int64_t o1 = i * n + k0, o2 = i * m;
    CostColumns(&a.x[o1], &a.y[o1], &a.z[o1], cnt, &b.x[o2], &b.y[o2], &b.z[o2], m, mt + i * m * n + k0, n,
                &columns[o1], nullptr);
  });
  float* out = cost->typed_data<float>();
  for (int64_t i = 0; i < nb; ++i) {
    float total = 0.0f;
    for (int64_t k = 0; k < n; ++k) total += columns[i * n + k];
    out[i] = total;
  }
  return ffi::Error::Success();
}

ffi::Error MatchCostGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2,
                             ffi::AnyBuffer match, ffi::Result<ffi::AnyBuffer> grad1,
                             ffi::Result<ffi::AnyBuffer> grad2) {
  PointShape s1, s2;
  if (auto err = CheckPair(kCostGradOp, xyz1, xyz2, &s1, &s2); err.failure()) return err;
  if (auto err = CheckMatch(kCostGradOp, match, s1, s2); err.failure()) return err;
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
  if (grad1->element_type() != ffi::F32 || static_cast<int64_t>(grad1->element_count()) != nb * n * 3 ||
      grad2->element_type() != ffi::F32 || static_cast<int64_t>(grad2->element_count()) != nb * m * 3)
    return InvalidArgument(kCostGradOp, "grad1/grad2 must be float32 [..., n, 3] / [..., m, 3]");
  const Soa a(xyz1.typed_data<float>(), nb * n), b(xyz2.typed_data<float>(), nb * m);
  const float* mt = match.typed_data<float>();
  float* g1 = grad1->typed_data<float>();
  float* g2 = grad2->typed_data<float>();
  // One flat work list: the column blocks (grad1) of every item, then the row blocks (grad2).
  const int64_t blocks_l = NumBlocks(n), blocks_r = NumBlocks(m);
  RunParallel(pool, nb * (blocks_l + blocks_r), [&](int64_t item) {
    if (item < nb * blocks_l) {
      const int64_t i = item / blocks_l, k0 = (item % blocks_l) * kBlock, cnt = std::min(kBlock, n - k0);
      const int64_t o1 = i * n + k0, o2 = i * m;
      CostColumns(&a.x[o1], &a.y[o1], &a.z[o1], cnt, &b.x[o2], &b.y[o2], &b.z[o2], m, mt + i * m * n + k0, n,
                  nullptr, g1 + o1 * 3);
    } else {
      item -= nb * blocks_l;
      const int64_t i = item / blocks_r, l0 = (item % blocks_r) * kBlock, cnt = std::min(kBlock, m - l0);
      const int64_t o2 = i * m + l0, o1 = i * n;
      GradRows(&b.x[o2], &b.y[o2], &b.z[o2], cnt, &a.x[o1], &a.y[o1], &a.z[o1], n, mt + i * m * n + l0 * n,
               g2 + o2 * 3);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ApproxMatchCpu, ApproxMatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kMatchOp, ApproxMatchCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostCpu, MatchCostImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kCostOp, MatchCostCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostGradCpu, MatchCostGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_OPS_REGISTER(kCostGradOp, MatchCostGradCpu);

}  // namespace xla_ops
