// Approximate EMD on CPU: approx_match (the multi-scale soft auction of the original GPU kernel,
// metric/tf_approxmatch_g.cu), match_cost, match_cost_grad, and emd (approx_match + match_cost with its
// gradient, without the match: EmdImpl). float32 throughout, like the GPU kernel.
//
// approx_match evaluates the original's 10 rounds x 3 passes as one sweep over the rows (xyz2 points) per
// round against the Morton-sorted xyz1 columns, with culling (see "approx_match" below). Per-example lengths
// (ragged batches) restrict item i to its first n_i / m_i points (ApproxMatchRun). Parallelism and
// determinism: the rows are split into fixed blocks (depending on m_i only), each with its own column sums
// that a combine step adds up in block order. With >= 1 batch item per thread every task runs one item's
// phases; otherwise each phase's tasks of all items run on XLA's intra-op pool and the calling thread with a
// barrier between phases. Either way every value is computed by one thread in the same fixed order, so
// results do not depend on the thread count or the batch size. Memory: O(B * (n + m)) besides the
// [B, m, n] output (the per-block column sums are at most 2 * 32 * np floats per item, np = n padded to a
// multiple of kSub, see SweepData; emd adds 3 * 32 * np for its gradient column sums and no output).
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "checks.h"
#include "common.h"

#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
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
constexpr const char* kEmdOp = "xla_ops_emd";
constexpr int64_t kBlock = 256;  // points per match_cost work item (fixed: independent of the thread count)
constexpr int kRounds = 10;      // j = 7, 6, ..., -2

int64_t NumBlocks(int64_t n) { return (n + kBlock - 1) / kBlock; }

template <typename To, typename From>
inline To BitCast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// 8 float lanes as a GCC vector: AVX in the x86-64-v3 clones, two SSE halves in the default ones.
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
#define XLA_OPS_INLINE __attribute__((always_inline)) inline
template <typename T>
XLA_OPS_INLINE T Load(const float* p) {
  T v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
XLA_OPS_INLINE void Store(float* p, f32x8 v) { __builtin_memcpy(p, &v, sizeof(v)); }
XLA_OPS_INLINE f32x8 Broadcast(float v) { return f32x8{} + v; }
XLA_OPS_INLINE f32x8 MaxV(f32x8 a, f32x8 b) { return a < b ? b : a; }  // maxps: a if either is NaN

// exp(x) for x <= 0 in float32, 8 lanes: Cephes expf (range reduction by ln 2, degree-5 polynomial, ~1 ulp).
// Results below 2^-125 (x < -87) are flushed to 0 instead of becoming denormals; NaN stays NaN.
XLA_OPS_INLINE f32x8 ExpNonPositive(f32x8 x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const f32x8 xc = MaxV(x, Broadcast(-87.0f));
  const f32x8 t = xc * kLog2e + kRound;
  const f32x8 nf = t - kRound;
  const f32x8 r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
  f32x8 p = Broadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const i32x8 e = reinterpret_cast<i32x8>(t) - BitCast<int32_t>(kRound);
  const f32x8 y = p * reinterpret_cast<f32x8>((e + 127) << 23);
  return x < -87.0f ? f32x8{} : y;
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
// optimize pragma): bit-trick estimate (relative error < 3.5%) and three Newton steps (2e-3, 5e-6, then
// float rounding: < 4 ulp; two steps would leave 80 ulp). RSqrt(0) is a large finite number, so
// x * RSqrt(x) is 0 at x = 0.
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

// ---- approx_match ----------------------------------------------------------------------------------
// Round r of the original (level L_r = -4^(7-r) for r < 9, L_9 = 0) is three passes over all pairs with
// e = exp(L_r d^2), d^2 = ||xyz1[k] - xyz2[l]||^2:
//   1. ratio_l[k] = remain_l[k] / (1e-9 + sum_l e remain_r[l])
//   2. s_l = remain_r[l] sum_k e ratio_l[k]; ratio_r[l] = min(remain_r[l] / (s_l + 1e-9), 1) remain_r[l];
//      remain_r[l] = max(0, remain_r[l] - s_l)
//   3. match[l, k] += w = e ratio_l[k] ratio_r[l]; remain_l[k] = max(0, remain_l[k] - sum_l w)
// Here one sweep over the rows l (xyz2 points, in their original order) does passes 2 and 3 of round r and
// the sums of pass 1 of round r + 1. For row l it computes e over the columns into a row buffer while
// summing s_l (pass 2 needs only ratio_l, known from the round before), adds w to match row l and to the
// pass-3 column sums, and, if the row has mass left, adds exp(L_{r+1} d^2) * (new remain_r[l]) to the
// pass-1 column sums of round r + 1. So 2 exponentials per pair and round instead of 3, and rows emptied
// in round r cost nothing more. The rows are split into fixed blocks, each with its own column sums,
// which a combine step adds up per column in block order (-> remain_l, ratio_l of round r + 1). Round 0's
// pass 1 is a sweep of its own. Round 9 has level 0, where every weight is exactly 1: its pass-1 and
// pass-2 sums are one scalar sum each (the same for every column / row), and its pass 3, an outer product,
// is added while the columns are put back into the original order (the match is built with the columns in
// sorted order). Using e = exp(L_{r+1} d^2)^4 instead of a second exponential was tried: its few-ulp error
// is amplified by the rounds beyond the 1e-4 tolerance of the reference tests.
//
// Culling: xyz1 is sorted along a Morton curve and cut into sub-blocks of kSub columns. A pass skips a
// sub-block for row l when level * (squared distance from xyz2[l] to the bounding box of the sub-block's
// columns with remain_l > 0) < -88: ExpNonPositive flushes exponents below -87 to 0, so every skipped
// value is exactly 0 (1% margin for rounding). Rows with remain_r = 0 (most of them after a few rounds)
// contribute exactly 0 and are skipped; columns with remain_l = 0 have ratio_l = 0 and need no pass-1 sum.
//
// Rounding differences from evaluating the three passes literally in index order: the pass-2 sums run in 8
// interleaved lanes, the pass-1 and pass-3 column sums per row block and then over the blocks.
constexpr int64_t kSub = 16;           // columns per culling sub-block
constexpr int64_t kLanes = 8;          // interleaved partial sums of the pass-2 dot products (fixed)
constexpr int64_t kMinRowBlock = 128;  // rows per sweep task, at least
constexpr int64_t kMaxRowBlocks = 32;  // bounds the per-block column sums to 32 * 2 * n floats per item
constexpr int64_t kColChunk = 256;     // columns per combine task (a multiple of kSub)
constexpr float kCutoff = 88.0f;      // culled where level * d^2 < -kCutoff (ExpNonPositive: 0 below -87)

float Level(int round) { return round >= kRounds - 1 ? 0.0f : -std::ldexp(1.0f, 2 * (7 - round)); }

enum class SweepKind {
  kFirstRatio,  // pass 1 of round 0 only
  kFused,       // passes 2, 3 of round r < 8 and the pass-1 sums of round r + 1
  kLast,        // passes 2, 3 of round 8 (round 9's pass 1 is a scalar sum)
};

// One item's sorted clouds and state as a sweep sees them. Column arrays are padded to np (a multiple of
// kSub) with remain_l = ratio_l = 0 and coordinates 0.
struct SweepData {
  const float *x1, *y1, *z1, *ratio_l;
  const float* box;  // [6, subs8]: lo x, y, z, hi x, y, z of each sub-block's columns with remain_l > 0
  int64_t n, np, subs8;
  const float *x2, *y2, *z2;
  float* remain_r;
  float* match;       // the item's [m, n] output (columns in sorted order until FinishRows), or nullptr
  float* ratio_r;     // the round's ratio_r [m] (kFused, kLast; rows without mass keep 0), or nullptr
  float level;        // passes 2 and 3 (kFirstRatio: pass 1)
  float level_next;   // pass 1 of the next round (kFused)
  bool first_write;   // the rows hold garbage: write them whole
};

// Bit t of the result: lane t of a comparison result (all ones or zero). Two SSE movemasks (baseline x86-64,
// so the same code serves both clones).
XLA_OPS_INLINE uint64_t LaneBits(i32x8 mask) {
#if defined(__SSE__)
  __m128 half[2];
  __builtin_memcpy(half, &mask, sizeof(half));
  return static_cast<uint64_t>(_mm_movemask_ps(half[0]) | (_mm_movemask_ps(half[1]) << 4));
#else
  uint64_t bits = 0;
  for (int j = 0; j < kLanes; ++j) bits |= static_cast<uint64_t>(mask[j] != 0) << j;
  return bits;
#endif
}

// Turns the runs of set bits of words[0, num_words) (bit t: sub-block t is reachable) into column ranges
// [ranges[2i], ranges[2i + 1]); returns their number.
int64_t BitRuns(const uint64_t* words, int64_t num_words, int32_t* ranges) {
  int64_t num = 0;
  const int64_t total = num_words * 64;
  int64_t t = 0;
  while (t < total) {
    uint64_t w = words[t / 64] >> (t % 64);
    if (w == 0) {
      t = (t / 64 + 1) * 64;
      continue;
    }
    const int64_t start = t + __builtin_ctzll(w);
    t = start;
    for (;;) {  // the end of the run: the next clear bit
      const uint64_t clear = ~words[t / 64] >> (t % 64);
      if (clear != 0) {
        t += __builtin_ctzll(clear);
        break;
      }
      t = (t / 64 + 1) * 64;
      if (t >= total) break;
    }
    ranges[2 * num] = static_cast<int32_t>(start * kSub);
    ranges[2 * num + 1] = static_cast<int32_t>(t * kSub);
    ++num;
  }
  return num;
}

// Adds sum_k exp(level d_kl^2) * weight over the ranges to sum_a[k] (pass 1).
XLA_OPS_INLINE void AddPassOne(const float* x1, const float* y1, const float* z1, float x, float y, float z,
                               const int32_t* ranges, int64_t num, float level, float weight, float* sum_a) {
  const f32x8 lv = Broadcast(level), wv = Broadcast(weight);
  for (int64_t i = 0; i < num; ++i)
    for (int64_t k = ranges[2 * i]; k < ranges[2 * i + 1]; k += kLanes) {
      const f32x8 dx = Load<f32x8>(x1 + k) - x, dy = Load<f32x8>(y1 + k) - y, dz = Load<f32x8>(z1 + k) - z;
      Store(sum_a + k, Load<f32x8>(sum_a + k) + ExpNonPositive(lv * (dx * dx + dy * dy + dz * dz)) * wv);
    }
}

// Rows [l_begin, l_end) of one item. sum_a, sum_c [np]: this block's pass-1 and pass-3 column sums.
XLA_OPS_SIMD_CLONES
void SweepRows(const SweepData& d, SweepKind kind, int64_t l_begin, int64_t l_end, float* sum_a, float* sum_c) {
  FlushDenormals ftz;
  const int64_t n = d.n, np = d.np, subs = np / kSub, subs8 = d.subs8;
  const int64_t num_words = (subs8 + 63) / 64;
  std::vector<float> e_row(np);
  std::vector<uint64_t> reach(num_words), reach_next(num_words);  // bit t: sub-block t is within reach
  std::vector<int32_t> ranges(2 * subs + 2), ranges_next(2 * subs + 2);
  for (int64_t k = 0; k < np; ++k) sum_a[k] = sum_c[k] = 0.0f;
  const float *x1 = d.x1, *y1 = d.y1, *z1 = d.z1, *rl = d.ratio_l;
  const float max_d2 = kCutoff / -d.level;
  const float max_d2_next = kind == SweepKind::kFused ? kCutoff / -d.level_next : 0.0f;
  for (int64_t l = l_begin; l < l_end; ++l) {
    float* row = d.match != nullptr ? d.match + l * n : nullptr;
    const float rem = d.remain_r[l];
    if (rem == 0.0f) {
      if (row != nullptr && d.first_write) std::fill(row, row + n, 0.0f);
      continue;
    }
    const float x = d.x2[l], y = d.y2[l], z = d.z2[l];
    // Squared distances from (x, y, z) to the boxes; level * d2 < -kCutoff <=> d2 > kCutoff / -level
    // exactly, the levels being powers of 2 (an empty box is at +inf).
    std::fill(reach.begin(), reach.end(), 0);
    std::fill(reach_next.begin(), reach_next.end(), 0);
    for (int64_t t = 0; t < subs8; t += kLanes) {
      const f32x8 zero{};
      const f32x8 dx = MaxV(MaxV(Load<f32x8>(d.box + t) - x, x - Load<f32x8>(d.box + 3 * subs8 + t)), zero);
      const f32x8 dy = MaxV(MaxV(Load<f32x8>(d.box + subs8 + t) - y, y - Load<f32x8>(d.box + 4 * subs8 + t)), zero);
      const f32x8 dz = MaxV(MaxV(Load<f32x8>(d.box + 2 * subs8 + t) - z, z - Load<f32x8>(d.box + 5 * subs8 + t)), zero);
      const f32x8 d2 = dx * dx + dy * dy + dz * dz;
      reach[t / 64] |= LaneBits(d2 <= max_d2) << (t % 64);
      reach_next[t / 64] |= LaneBits(d2 <= max_d2_next) << (t % 64);
    }
    const int64_t num = BitRuns(reach.data(), num_words, ranges.data());
    if (kind == SweepKind::kFirstRatio) {
      AddPassOne(x1, y1, z1, x, y, z, ranges.data(), num, d.level, rem, sum_a);
      continue;
    }
    if (row != nullptr)
      for (int64_t i = 0; i < num; ++i)  // the row is read and written after pass 2's exponentials
        for (int64_t k = ranges[2 * i]; k < std::min<int64_t>(ranges[2 * i + 1], n); k += 64 / sizeof(float))
          __builtin_prefetch(row + k, 1);
    // Pass 2 (padded columns have ratio_l = 0), e kept for pass 3.
    const f32x8 lv = Broadcast(d.level);
    f32x8 acc{};
    for (int64_t i = 0; i < num; ++i)
      for (int64_t k = ranges[2 * i]; k < ranges[2 * i + 1]; k += kLanes) {
        const f32x8 dx = Load<f32x8>(x1 + k) - x, dy = Load<f32x8>(y1 + k) - y, dz = Load<f32x8>(z1 + k) - z;
        const f32x8 e = ExpNonPositive(lv * (dx * dx + dy * dy + dz * dz));
        Store(&e_row[k], e);
        acc += e * Load<f32x8>(rl + k);
      }
    float sum = 0.0f;
    for (int64_t j = 0; j < kLanes; ++j) sum += acc[j];
    const float s = sum * rem;
    const float rr = Min(rem / (s + 1e-9f), 1.0f) * rem;
    const float rem_next = Max(0.0f, rem - s);
    d.remain_r[l] = rem_next;
    if (d.ratio_r != nullptr) d.ratio_r[l] = rr;
    // Pass 3.
    int64_t written = 0;
    for (int64_t i = 0; i < num; ++i) {
      const int64_t begin = ranges[2 * i], end = ranges[2 * i + 1];
      if (row != nullptr && d.first_write) std::fill(row + written, row + begin, 0.0f);
      for (int64_t k = begin; k < end; k += kLanes) {
        const f32x8 w = Load<f32x8>(&e_row[k]) * Load<f32x8>(rl + k) * rr;
        Store(sum_c + k, Load<f32x8>(sum_c + k) + w);
        if (row == nullptr) continue;
        if (k + kLanes <= n) {
          Store(row + k, d.first_write ? w : Load<f32x8>(row + k) + w);
        } else {
          for (int64_t j = 0; k + j < n; ++j) row[k + j] = (d.first_write ? 0.0f : row[k + j]) + w[j];
        }
      }
      written = std::min(end, n);
    }
    if (row != nullptr && d.first_write) std::fill(row + written, row + n, 0.0f);
    // Pass 1 of the next round (rows emptied this round add exactly 0).
    if (kind == SweepKind::kFused && rem_next > 0.0f) {
      const int64_t num_next = BitRuns(reach_next.data(), num_words, ranges_next.data());
      AddPassOne(x1, y1, z1, x, y, z, ranges_next.data(), num_next, d.level_next, rem_next, sum_a);
    }
  }
}

// Bounding boxes of the columns with remain_l > 0 in sub-blocks [t_begin, t_end) (empty: lo = +inf,
// hi = -inf).
void ColumnBoxes(const float* x1, const float* y1, const float* z1, const float* remain_l, int64_t t_begin,
                 int64_t t_end, int64_t subs, float* box) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  for (int64_t t = t_begin; t < t_end; ++t) {
    float lo[3] = {kInf, kInf, kInf}, hi[3] = {-kInf, -kInf, -kInf};
    for (int64_t k = t * kSub; k < (t + 1) * kSub; ++k) {
      if (!(remain_l[k] > 0.0f)) continue;
      lo[0] = Min(lo[0], x1[k]), hi[0] = Max(hi[0], x1[k]);
      lo[1] = Min(lo[1], y1[k]), hi[1] = Max(hi[1], y1[k]);
      lo[2] = Min(lo[2], z1[k]), hi[2] = Max(hi[2], z1[k]);
    }
    for (int c = 0; c < 3; ++c) box[c * subs + t] = lo[c], box[(3 + c) * subs + t] = hi[c];
  }
}

// After a sweep, for columns [k_begin, k_end): remain_l -= the pass-3 sums (not after kFirstRatio) and
// ratio_l = remain_l / (1e-9 + pass-1 sum), the block sums added in block order (after kLast the pass-1
// sum is `level0_sum`, 1e-9 + sum of remain_r, the same for every column).
XLA_OPS_SIMD_CLONES
void CombineColumns(SweepKind kind, int64_t k_begin, int64_t k_end, int64_t blocks, int64_t np,
                    const float* sum_a, const float* sum_c, float level0_sum, float* remain_l, float* ratio_l) {
  FlushDenormals ftz;
  for (int64_t k = k_begin; k < k_end; ++k) {
    float remain = remain_l[k];
    if (kind != SweepKind::kFirstRatio) {
      float c = 0.0f;
      for (int64_t b = 0; b < blocks; ++b) c += sum_c[b * np + k];
      remain = Max(0.0f, remain - c);
      remain_l[k] = remain;
    }
    float a = level0_sum;
    if (kind != SweepKind::kLast) {
      a = 1e-9f;
      for (int64_t b = 0; b < blocks; ++b) a += sum_a[b * np + k];
    }
    ratio_l[k] = remain > 0.0f ? remain / a : 0.0f;
  }
}

// Round 9's pass 3 for rows [l_begin, l_end) while their columns go from sorted to original order (column j
// is sorted column pos1[j]): match[l, j] = match[l, k] + ratio_l[k] * ratio_r[l] with k = pos1[j].
void FinishRows(const float* ratio_l, const float* ratio_r, const int32_t* pos1, int64_t l_begin, int64_t l_end,
                int64_t n, int64_t n_valid, float* match) {
  FlushDenormals ftz;
  // The copy of a row starts 2 KiB away from the row modulo 4 KiB: loads from it would otherwise be held
  // up behind stores to the row with the same low 12 address bits (4K aliasing) when n is a multiple of 1024.
  std::vector<float> buffer(n + 1024);
  const uintptr_t gap = (reinterpret_cast<uintptr_t>(match) - reinterpret_cast<uintptr_t>(buffer.data()) + 2048) & 4095;
  float* sorted = buffer.data() + gap / sizeof(float);
  for (int64_t l = l_begin; l < l_end; ++l) {
    float* row = match + l * n;
    if (l + 1 < l_end)  // the next row: a page further at n = 1024, where the hardware prefetchers stop
      for (int64_t j = 0; j < n; j += 64 / sizeof(float)) __builtin_prefetch(row + n + j, 1);
    std::copy(row, row + n, sorted);
    const float rr = ratio_r[l];
    if (rr == 0.0f) {  // most rows: emptied before round 9
      for (int64_t j = 0; j < n_valid; ++j) row[j] = sorted[pos1[j]];
    } else {
      for (int64_t j = 0; j < n_valid; ++j) {
        const int64_t k = pos1[j];
        row[j] = sorted[k] + ratio_l[k] * rr;
      }
    }
    std::fill(row + n_valid, row + n, 0.0f);  // padded columns (lengths)
  }
}

// Asks Linux for transparent huge pages on the 2 MiB pages inside [data, data + bytes) (a hint, no effect
// where THP is off or the range is smaller). XLA hands a freshly mapped output to each call; faulting it in
// 4 KiB pages costs more than approx_match's arithmetic at 1k points.
void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

bool AllFinite(const float* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i)
    if (!std::isfinite(v[i])) return false;
  return true;
}

// Per-item point counts: lengths[i] clamped to [0, count], or `count` for every item without lengths.
std::vector<int64_t> ItemLengths(const ffi::AnyBuffer& lengths, int64_t nb, int64_t count) {
  std::vector<int64_t> out(nb);
  const int32_t* v = lengths.typed_data<int32_t>();
  for (int64_t i = 0; i < nb; ++i) out[i] = std::min<int64_t>(count, std::max<int64_t>(0, v[i]));
  return out;
}

// The approx_match rounds of a batch, as a list of phases (see ApproxMatchImpl for the two schedules).
// Item i uses its first n_i = len1[i] xyz1 points and m_i = len2[i] xyz2 points (ragged batches); the others
// have no mass and contribute exactly 0. Every per-item decomposition (row blocks, column padding, Morton
// order) depends on n_i and m_i only, so a padded item gives the same floats as the unpadded cloud.
//
// Besides the state of the rounds, it keeps every round's factors: match[l, k] = sum_r e_r(l, k) *
// ratio_l_r[k] * ratio_r_r[l] with e_r = exp(level_r d^2) (culled to 0 beyond the round's boxes), so the
// match can be rebuilt row by row (EmdRows) without ever being stored: O(kRounds * (n + m)) per item.
struct ApproxMatchRun {
  int64_t nb, n, m, np, subs, subs8, max_row_blocks, col_chunks;
  std::vector<int64_t> len1, len2, rows_per_block, row_blocks;
  std::vector<float> x1, y1, z1, remain_l;  // [nb, np], sorted columns
  std::vector<float> x2, y2, z2, remain_r;  // [nb, m]
  std::vector<float> ratio_l;               // [kRounds, nb, np]: round r's ratio_l (sorted columns)
  std::vector<float> ratio_r;               // [kRounds, nb, m]: round r's ratio_r (0: no mass that round)
  std::vector<float> box;                   // [kRounds, nb, 6, subs8]: boxes of round r's sweep
  std::vector<int32_t> pos1, order1;        // [nb, n]: original -> sorted column, sorted -> original
  std::vector<float> sum_a, sum_c;          // [nb, max_row_blocks, np]
  std::vector<float> level0_sum;
  std::vector<char> active;                 // finite, n_i > 0 and m_i > 0
  std::vector<char> finite;
  float* match = nullptr;                   // [nb, m, n] output, or nullptr (factored: EmdImpl)

  float* RatioL(int r, int64_t i) { return &ratio_l[(r * nb + i) * np]; }
  float* RatioR(int r, int64_t i) { return &ratio_r[(r * nb + i) * m]; }
  float* Box(int r, int64_t i) { return &box[(r * nb + i) * 6 * subs8]; }

  ApproxMatchRun(int64_t nb_, int64_t n_, int64_t m_, std::vector<int64_t> l1, std::vector<int64_t> l2)
      : nb(nb_), n(n_), m(m_), len1(std::move(l1)), len2(std::move(l2)) {
    np = (n + kSub - 1) / kSub * kSub;
    subs = np / kSub;
    subs8 = (subs + kLanes - 1) / kLanes * kLanes;
    max_row_blocks = (m + RowsPerBlock(m) - 1) / RowsPerBlock(m);
    col_chunks = (np + kColChunk - 1) / kColChunk;
    rows_per_block.resize(nb);
    row_blocks.resize(nb);
    for (int64_t i = 0; i < nb; ++i) {
      rows_per_block[i] = RowsPerBlock(len2[i]);
      row_blocks[i] = (len2[i] + rows_per_block[i] - 1) / rows_per_block[i];
    }
    x1.resize(nb * np), y1.resize(nb * np), z1.resize(nb * np), remain_l.resize(nb * np);
    x2.resize(nb * m), y2.resize(nb * m), z2.resize(nb * m), remain_r.resize(nb * m);
    ratio_l.assign(kRounds * nb * np, 0.0f);
    ratio_r.assign(kRounds * nb * m, 0.0f);
    box.resize(kRounds * nb * 6 * subs8);
    pos1.resize(nb * n), order1.resize(nb * n);
    sum_a.resize(nb * max_row_blocks * np), sum_c.resize(nb * max_row_blocks * np);
    level0_sum.resize(nb);
    active.resize(nb), finite.resize(nb);
  }
  static int64_t RowsPerBlock(int64_t rows) {
    return std::max(kMinRowBlock, (rows + kMaxRowBlocks - 1) / kMaxRowBlocks);
  }

  // Sorts item i's real xyz1 points along a Morton curve (xyz2 keeps its order) into the state above.
  void Prepare(int64_t i, const float* p1, const float* p2) {
    const int64_t ni = len1[i], mi = len2[i];
    const float* a = p1 + i * n * 3;
    const float* b = p2 + i * m * 3;
    finite[i] = AllFinite(a, ni * 3) && AllFinite(b, mi * 3);
    active[i] = finite[i] && ni > 0 && mi > 0;
    if (match != nullptr) {
      float* out = match + i * m * n;
      if (!finite[i]) std::fill(out, out + m * n, std::numeric_limits<float>::quiet_NaN());
      else if (!active[i]) std::fill(out, out + m * n, 0.0f);
      else std::fill(out + mi * n, out + m * n, 0.0f);  // padded rows (the sweeps touch rows < m_i only)
    }
    if (!active[i]) return;
    const float mass_l = ni >= mi ? 1.0f : static_cast<float>(mi / ni);
    const float mass_r = ni >= mi ? static_cast<float>(ni / mi) : 1.0f;
    const std::vector<int32_t> o1 = MortonOrder(a, ni);
    for (int64_t k = 0; k < np; ++k) {
      const int64_t at = i * np + k;
      x1[at] = k < ni ? a[3 * o1[k]] : 0.0f;
      y1[at] = k < ni ? a[3 * o1[k] + 1] : 0.0f;
      z1[at] = k < ni ? a[3 * o1[k] + 2] : 0.0f;
      remain_l[at] = k < ni ? mass_l : 0.0f;
      if (k < ni) pos1[i * n + o1[k]] = static_cast<int32_t>(k), order1[i * n + k] = o1[k];
    }
    for (int64_t l = 0; l < m; ++l) {
      const bool real = l < mi;
      x2[i * m + l] = real ? b[3 * l] : 0.0f, y2[i * m + l] = real ? b[3 * l + 1] : 0.0f;
      z2[i * m + l] = real ? b[3 * l + 2] : 0.0f;
      remain_r[i * m + l] = real ? mass_r : 0.0f;
    }
    for (int r = 0; r < kRounds; ++r) {  // padding sub-blocks keep an empty box
      float* item_box = Box(r, i);
      std::fill(item_box, item_box + 3 * subs8, std::numeric_limits<float>::infinity());
      std::fill(item_box + 3 * subs8, item_box + 6 * subs8, -std::numeric_limits<float>::infinity());
    }
    ColumnBoxes(&x1[i * np], &y1[i * np], &z1[i * np], &remain_l[i * np], 0, subs, subs8, Box(0, i));
  }

  struct Phase {
    int64_t tasks;
    std::function<void(int64_t, int64_t)> fn;
  };

  // The phases of the rounds; `finish_match` adds round 9's pass 3 into the match output (match != nullptr).
  std::vector<Phase> Phases(const float* p1, const float* p2, bool finish_match) {
    auto sweep = [this](SweepKind kind, int round) {
      const float level = Level(round), level_next = Level(round + 1);  // kFirstRatio: round 0
      const bool first_write = kind == SweepKind::kFused && round == 0;
      return [this, kind, round, level, level_next, first_write](int64_t i, int64_t block) {
        if (!active[i] || block >= row_blocks[i]) return;
        const SweepData d{&x1[i * np], &y1[i * np], &z1[i * np], RatioL(round, i), Box(round, i), n, np, subs8,
                          &x2[i * m], &y2[i * m], &z2[i * m], &remain_r[i * m],
                          match != nullptr ? match + i * m * n : nullptr,
                          kind == SweepKind::kFirstRatio ? nullptr : RatioR(round, i), level, level_next,
                          first_write};
        const int64_t begin = block * rows_per_block[i], end = std::min(len2[i], begin + rows_per_block[i]);
        const int64_t sums = (i * max_row_blocks + block) * np;
        SweepRows(d, kind, begin, end, &sum_a[sums], &sum_c[sums]);
      };
    };
    auto combine = [this](SweepKind kind, int next_round) {
      return [this, kind, next_round](int64_t i, int64_t chunk) {
        if (!active[i]) return;
        const int64_t begin = chunk * kColChunk, end = std::min(np, begin + kColChunk);
        const int64_t sums = i * max_row_blocks * np;
        CombineColumns(kind, begin, end, row_blocks[i], np, &sum_a[sums], &sum_c[sums], level0_sum[i],
                       &remain_l[i * np], RatioL(next_round, i));
        ColumnBoxes(&x1[i * np], &y1[i * np], &z1[i * np], &remain_l[i * np], begin / kSub, end / kSub, subs8,
                    Box(next_round, i));
      };
    };
    auto prepare = [this, p1, p2](int64_t i, int64_t) { Prepare(i, p1, p2); };
    auto sum_remain_r = [this](int64_t i, int64_t) {  // round 9's pass-1 sum (in row order, from 1e-9)
      if (!active[i]) return;
      FlushDenormals ftz;
      float s = 1e-9f;
      for (int64_t l = 0; l < len2[i]; ++l) s += remain_r[i * m + l];
      level0_sum[i] = s;
    };
    auto last_ratio_r = [this](int64_t i, int64_t) {  // round 9's pass 2: the same column sum for every row
      if (!active[i]) return;
      FlushDenormals ftz;
      const float* rl = RatioL(kRounds - 1, i);
      float* rr = RatioR(kRounds - 1, i);
      float t = 0.0f;
      for (int64_t k = 0; k < len1[i]; ++k) t += rl[k];
      for (int64_t l = 0; l < len2[i]; ++l) {
        const float remain = remain_r[i * m + l];
        rr[l] = remain == 0.0f ? 0.0f : Min(remain / (t * remain + 1e-9f), 1.0f) * remain;
      }
    };
    auto finish = [this](int64_t i, int64_t block) {
      if (!active[i] || block >= row_blocks[i]) return;
      const int64_t begin = block * rows_per_block[i], end = std::min(len2[i], begin + rows_per_block[i]);
      FinishRows(RatioL(kRounds - 1, i), RatioR(kRounds - 1, i), &pos1[i * n], begin, end, n, len1[i],
                 match + i * m * n);
    };
    std::vector<Phase> phases = {{1, prepare},
                                 {max_row_blocks, sweep(SweepKind::kFirstRatio, 0)},
                                 {col_chunks, combine(SweepKind::kFirstRatio, 0)}};
    for (int round = 0; round < kRounds - 1; ++round) {
      const SweepKind kind = round < kRounds - 2 ? SweepKind::kFused : SweepKind::kLast;
      phases.push_back({max_row_blocks, sweep(kind, round)});
      if (kind == SweepKind::kLast) phases.push_back({1, sum_remain_r});
      phases.push_back({col_chunks, combine(kind, round + 1)});
    }
    phases.push_back({1, last_ratio_r});
    if (finish_match) phases.push_back({max_row_blocks, finish});
    return phases;
  }
};

// Runs the phases. Two schedules with identical arithmetic: with at least one batch item per thread one task
// per item runs all phases (no barriers: a pass over 1k points is shorter than the time a pool thread takes
// to wake up on a busy machine); otherwise every phase runs its tasks of all items in parallel, with a
// barrier between phases (B = 1 at 16k points).
void RunPhases(const ffi::ThreadPool& pool, int64_t nb, const std::vector<ApproxMatchRun::Phase>& phases) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (nb >= threads) {
    RunParallel(pool, nb, [&](int64_t i) {
      for (const auto& phase : phases)
        for (int64_t t = 0; t < phase.tasks; ++t) phase.fn(i, t);
    });
  } else {
    for (const auto& phase : phases)
      RunParallel(pool, nb * phase.tasks, [&](int64_t t) { phase.fn(t / phase.tasks, t % phase.tasks); });
  }
}

// `workspace` is used by the CUDA handler only (cuda/emd.cu); both platforms share the call signature.
ffi::Error ApproxMatchImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer lengths1,
                           ffi::AnyBuffer lengths2, ffi::Result<ffi::AnyBuffer> match,
                           ffi::Result<ffi::AnyBuffer> /*workspace*/) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckApproxMatch(kMatchOp, xyz1, xyz2, lengths1, lengths2, *match, &s1, &s2));
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
  ApproxMatchRun run(nb, n, m, ItemLengths(lengths1, nb, n), ItemLengths(lengths2, nb, m));
  run.match = match->typed_data<float>();
  AdviseHugePages(run.match, static_cast<size_t>(nb * m * n) * sizeof(float));
  RunPhases(pool, nb, run.Phases(xyz1.typed_data<float>(), xyz2.typed_data<float>(), /*finish_match=*/true));
  return ffi::Error::Success();
}

// ---- earth_mover_distance: value and gradient without the match --------------------------------------
// Per row l of the match (an xyz2 point) EmdRows rebuilds match[l, :] from the rounds' factors into a row
// buffer, with the same culling and the same float operations in the same order as approx_match's sweeps
// (so the entries equal approx_match's up to FMA contraction), and adds its cost and gradient terms:
//   cost_l = sum_k match[l, k] ||p_k - q_l||,  grad2[l] = sum_k match[l, k] (q_l - p_k) / max(||.||, 1e-10),
//   gcol[k] += match[l, k] (p_k - q_l) / max(||.||, 1e-10)  (this row block's share of grad1[k]).
// Rows with no mass in any round are skipped; a row touches only the sub-blocks within reach of its rounds.
struct EmdRowData {
  ApproxMatchRun* run;
  int64_t i;
  float* row_cost;  // [m] of the item
  float* grad2;     // [m, 3] of the item (original order)
  bool with_grad;   // false: the cost only (grad2 and gcol stay 0)
};

XLA_OPS_SIMD_CLONES
void EmdRows(const EmdRowData& e, int64_t l_begin, int64_t l_end, float* gcol) {
  FlushDenormals ftz;
  ApproxMatchRun& run = *e.run;
  const int64_t i = e.i, np = run.np, subs8 = run.subs8, num_words = (subs8 + 63) / 64;
  const float *x1 = &run.x1[i * np], *y1 = &run.y1[i * np], *z1 = &run.z1[i * np];
  std::vector<float> row(np, 0.0f);
  std::vector<uint64_t> reach(num_words), touched(num_words);
  std::vector<int32_t> ranges(2 * run.subs + 2);
  for (int64_t k = 0; k < 3 * np; ++k) gcol[k] = 0.0f;
  float* gx = gcol;
  float* gy = gcol + np;
  float* gz = gcol + 2 * np;
  for (int64_t l = l_begin; l < l_end; ++l) {
    float rr[kRounds];
    bool any = false;
    for (int r = 0; r < kRounds; ++r) rr[r] = run.RatioR(r, i)[l], any |= rr[r] != 0.0f;
    e.row_cost[l] = 0.0f;
    e.grad2[3 * l] = e.grad2[3 * l + 1] = e.grad2[3 * l + 2] = 0.0f;
    if (!any) continue;
    const float x = run.x2[i * run.m + l], y = run.y2[i * run.m + l], z = run.z2[i * run.m + l];
    std::fill(touched.begin(), touched.end(), 0);
    for (int r = 0; r < kRounds - 1; ++r) {
      if (rr[r] == 0.0f) continue;
      const float* box = run.Box(r, i);
      const float max_d2 = kCutoff / -Level(r);
      std::fill(reach.begin(), reach.end(), 0);
      for (int64_t t = 0; t < subs8; t += kLanes) {  // as in SweepRows
        const f32x8 zero{};
        const f32x8 dx = MaxV(MaxV(Load<f32x8>(box + t) - x, x - Load<f32x8>(box + 3 * subs8 + t)), zero);
        const f32x8 dy = MaxV(MaxV(Load<f32x8>(box + subs8 + t) - y, y - Load<f32x8>(box + 4 * subs8 + t)), zero);
        const f32x8 dz = MaxV(MaxV(Load<f32x8>(box + 2 * subs8 + t) - z, z - Load<f32x8>(box + 5 * subs8 + t)), zero);
        reach[t / 64] |= LaneBits(dx * dx + dy * dy + dz * dz <= max_d2) << (t % 64);
      }
      for (int64_t w = 0; w < num_words; ++w) touched[w] |= reach[w];
      const int64_t num = BitRuns(reach.data(), num_words, ranges.data());
      const float* rl = run.RatioL(r, i);
      const f32x8 lv = Broadcast(Level(r));
      for (int64_t s = 0; s < num; ++s)
        for (int64_t k = ranges[2 * s]; k < ranges[2 * s + 1]; k += kLanes) {
          const f32x8 dx = Load<f32x8>(x1 + k) - x, dy = Load<f32x8>(y1 + k) - y, dz = Load<f32x8>(z1 + k) - z;
          const f32x8 ev = ExpNonPositive(lv * (dx * dx + dy * dy + dz * dz));
          Store(&row[k], Load<f32x8>(&row[k]) + ev * Load<f32x8>(rl + k) * rr[r]);
        }
    }
    const float rr_last = rr[kRounds - 1];
    if (rr_last != 0.0f) {  // round 9: level 0, every entry
      const float* rl = run.RatioL(kRounds - 1, i);
      for (int64_t k = 0; k < np; ++k) row[k] = row[k] + rl[k] * rr_last;
      for (int64_t t = 0; t < run.subs; ++t) touched[t / 64] |= uint64_t{1} << (t % 64);
    }
    const int64_t num = BitRuns(touched.data(), num_words, ranges.data());
    float cost[kLanes] = {}, sx[kLanes] = {}, sy[kLanes] = {}, sz[kLanes] = {};
    for (int64_t s = 0; s < num; ++s)
      for (int64_t k0 = ranges[2 * s]; k0 < ranges[2 * s + 1]; k0 += kLanes) {
        if (!e.with_grad) {
          for (int j = 0; j < kLanes; ++j) {
            const int64_t k = k0 + j;
            const float dx = x1[k] - x, dy = y1[k] - y, dz = z1[k] - z;
            const float d2 = dx * dx + dy * dy + dz * dz;
            cost[j] += row[k] * (d2 * RSqrt(d2));
            row[k] = 0.0f;
          }
          continue;
        }
        for (int j = 0; j < kLanes; ++j) {
          const int64_t k = k0 + j;
          const float mk = row[k];
          row[k] = 0.0f;
          const float dx = x1[k] - x, dy = y1[k] - y, dz = z1[k] - z;  // p_k - q_l
          const float d2 = dx * dx + dy * dy + dz * dz;
          cost[j] += mk * (d2 * RSqrt(d2));
          const float g = mk * RSqrt(Max(d2, 1e-20f));
          sx[j] -= g * dx, sy[j] -= g * dy, sz[j] -= g * dz;
          gx[k] += g * dx, gy[k] += g * dy, gz[k] += g * dz;
        }
      }
    float c = 0.0f, gxs = 0.0f, gys = 0.0f, gzs = 0.0f;
    for (int j = 0; j < kLanes; ++j) c += cost[j], gxs += sx[j], gys += sy[j], gzs += sz[j];
    e.row_cost[l] = c;
    e.grad2[3 * l] = gxs, e.grad2[3 * l + 1] = gys, e.grad2[3 * l + 2] = gzs;
  }
}

// Approximate EMD (approx_match + match_cost) and its gradient w.r.t. both clouds in O(B (n + m)) memory: the
// rounds run as in approx_match keeping their factors instead of the match, then EmdRows rebuilds each match
// row to add its terms. with_grad = 0: the cost only (grad1, grad2 are 0: the primal of a jitted evaluation),
// 1: both. `workspace` is used by the CUDA handler only.
ffi::Error EmdImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer lengths1,
                   ffi::AnyBuffer lengths2, int32_t with_grad, ffi::Result<ffi::AnyBuffer> cost,
                   ffi::Result<ffi::AnyBuffer> grad1, ffi::Result<ffi::AnyBuffer> grad2,
                   ffi::Result<ffi::AnyBuffer> /*workspace*/) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(
      CheckEmd(kEmdOp, xyz1, xyz2, lengths1, lengths2, *cost, *grad1, *grad2, &s1, &s2));
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
  const float* p1 = xyz1.typed_data<float>();
  const float* p2 = xyz2.typed_data<float>();
  float* out_cost = cost->typed_data<float>();
  float* out_g1 = grad1->typed_data<float>();
  float* out_g2 = grad2->typed_data<float>();
  ApproxMatchRun run(nb, n, m, ItemLengths(lengths1, nb, n), ItemLengths(lengths2, nb, m));
  std::vector<float> row_cost(nb * m), gcol(nb * run.max_row_blocks * 3 * run.np);
  auto phases = run.Phases(p1, p2, /*finish_match=*/false);
  const int64_t np = run.np;
  phases.push_back({run.max_row_blocks, [&](int64_t i, int64_t block) {
                      if (!run.active[i] || block >= run.row_blocks[i]) return;
                      const int64_t begin = block * run.rows_per_block[i];
                      const int64_t end = std::min(run.len2[i], begin + run.rows_per_block[i]);
                      EmdRows({&run, i, &row_cost[i * m], out_g2 + i * m * 3, with_grad != 0}, begin, end,
                              &gcol[(i * run.max_row_blocks + block) * 3 * np]);
                    }});
  phases.push_back({1, [&](int64_t i, int64_t) {  // grad1 (block order), padded points, cost (row order)
                      const float nan = std::numeric_limits<float>::quiet_NaN();
                      if (!run.active[i]) {
                        const float fill = run.finite[i] ? 0.0f : nan;
                        out_cost[i] = fill;
                        std::fill(out_g1 + i * n * 3, out_g1 + (i + 1) * n * 3, fill);
                        std::fill(out_g2 + i * m * 3, out_g2 + (i + 1) * m * 3, fill);
                        return;
                      }
                      const int64_t ni = run.len1[i], mi = run.len2[i];
                      std::fill(out_g1 + (i * n + ni) * 3, out_g1 + (i + 1) * n * 3, 0.0f);
                      std::fill(out_g2 + (i * m + mi) * 3, out_g2 + (i + 1) * m * 3, 0.0f);
                      for (int64_t k = 0; k < ni; ++k) {
                        float g[3] = {0.0f, 0.0f, 0.0f};
                        for (int64_t b = 0; b < run.row_blocks[i]; ++b)
                          for (int c = 0; c < 3; ++c) g[c] += gcol[((i * run.max_row_blocks + b) * 3 + c) * np + k];
                        const int64_t j = run.order1[i * n + k];
                        for (int c = 0; c < 3; ++c) out_g1[(i * n + j) * 3 + c] = g[c];
                      }
                      float total = 0.0f;
                      for (int64_t l = 0; l < mi; ++l) total += row_cost[i * m + l];
                      out_cost[i] = total;
                    }});
  RunPhases(pool, nb, phases);
  return ffi::Error::Success();
}

// ---- match_cost and its gradient -------------------------------------------------------------------
constexpr int64_t kPrefetchRows = 8;  // match rows ahead whose segment CostColumns prefetches

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
    // The segments are rows apart (a page at n = 1024), beyond the hardware prefetchers' reach.
    if (l + kPrefetchRows < m)
      for (int64_t k = 0; k < count; k += 64 / sizeof(float)) __builtin_prefetch(row + kPrefetchRows * n + k);
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

// `workspace` ([..., m] row costs) is used by the CUDA handler only.
ffi::Error MatchCostImpl(ffi::ThreadPool pool, ffi::AnyBuffer xyz1, ffi::AnyBuffer xyz2, ffi::AnyBuffer match,
                         ffi::Result<ffi::AnyBuffer> cost, ffi::Result<ffi::AnyBuffer> workspace) {
  PointShape s1, s2;
  XLA_OPS_RETURN_IF_ERROR(CheckMatchCost(kCostOp, xyz1, xyz2, match, *cost, *workspace, &s1, &s2));
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
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
  XLA_OPS_RETURN_IF_ERROR(CheckMatchCostGrad(kCostGradOp, xyz1, xyz2, match, *grad1, *grad2, &s1, &s2));
  const int64_t nb = s1.b, n = s1.n, m = s2.n;
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
                                  .Arg<ffi::AnyBuffer>()    // xyz1
                                  .Arg<ffi::AnyBuffer>()    // xyz2
                                  .Arg<ffi::AnyBuffer>()    // lengths1 (int32 [...])
                                  .Arg<ffi::AnyBuffer>()    // lengths2
                                  .Ret<ffi::AnyBuffer>()    // match
                                  .Ret<ffi::AnyBuffer>());  // workspace (CUDA only)
XLA_OPS_REGISTER(kMatchOp, ApproxMatchCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(MatchCostCpu, MatchCostImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()    // cost
                                  .Ret<ffi::AnyBuffer>());  // workspace (CUDA only)
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmdCpu, EmdImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // xyz1
                                  .Arg<ffi::AnyBuffer>()    // xyz2
                                  .Arg<ffi::AnyBuffer>()    // lengths1 (int32 [...])
                                  .Arg<ffi::AnyBuffer>()    // lengths2
                                  .Attr<int32_t>("with_grad")
                                  .Ret<ffi::AnyBuffer>()    // cost
                                  .Ret<ffi::AnyBuffer>()    // grad1
                                  .Ret<ffi::AnyBuffer>()    // grad2
                                  .Ret<ffi::AnyBuffer>());  // workspace (CUDA only)
XLA_OPS_REGISTER(kEmdOp, EmdCpu);

}  // namespace xla_ops
