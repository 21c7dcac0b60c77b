// nn_distance (the Chamfer core) on CPU: for every point of `a` the squared distance to, and index of, its
// nearest point in `b`, and the same from `b` to `a`. Exact; ties go to the lowest index.
//
// Small problems (N * M <= kBruteForceMaxPairs) use brute force. Larger ones build one k-d tree per point set
// and batch item (median split on the widest axis of the tight bounding box, points stored in leaf order)
// and answer each query by branch and bound. The queries of a set are processed in the leaf order of their
// own tree, so consecutive queries are close in space and each starts from the previous query's winner.
//
// Exactness. Every candidate distance is computed by SqDist ((dx*dx + dy*dy) + dz*dz in float32, as the
// numpy reference does), in both paths, and candidates are compared as (distance, index) pairs, so the
// winner is the lexicographic minimum exactly as in brute force. The bound of a subtree, BoxSqDist, is the
// same expression applied to the per-axis gaps between the query and the subtree's box; float subtraction,
// multiplication and addition are monotone, so it never exceeds the SqDist of any point in the box. It is
// further shrunk by a relative 2^-20 (kBoundShrink), so it stays a lower bound even if a compiler fused
// multiply-adds differently in the two expressions (x86-64 without -mfma never fuses). A subtree is
// skipped only when that bound is larger than the best distance, or equal to it and every index in it
// (min_id) is larger than the best index: no tied candidate is ever skipped.
//
// Non-finite input (both paths agree): a NaN distance never wins a comparison and the search starts from
// (+inf, index 0), so a query with no finite candidate distance gets distance +inf and index 0. Points with a
// NaN or Inf coordinate can only produce NaN or +inf distances: they are left out of the trees, and such
// queries are answered (+inf, 0) directly.
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>

#include "checks.h"
#include "common.h"
#include "distance.h"

namespace xla_ops {
namespace {

constexpr const char* kOp = "xla_ops_nn_distance";
// Brute force up to this many (query, reference) pairs per batch item. Measured on an AMD EPYC (Zen 3),
// one thread, both directions: trees take 0.13 ms vs 0.26 ms at 256 x 256, and break even near 128 x 128.
constexpr int64_t kBruteForceMaxPairs = 128 * 128;
// Points per leaf; 8 beat 4 and 16 by 15-50% at 16384 x 16384 (uniform and sphere-surface clouds).
constexpr int32_t kLeafSize = 8;
// Relative shrink of the subtree bounds (see "Exactness" above).
constexpr float kBoundShrink = 1.0f - 1.0f / (1 << 20);
constexpr float kInf = std::numeric_limits<float>::infinity();

// distance.h's SqDist3: the same bits as the CUDA kernels.
inline float SqDist(float x0, float y0, float z0, float x1, float y1, float z1) {
  return SqDist3(x0, y0, z0, x1, y1, z1);
}

inline bool IsFinite3(const float* p) {
  return std::isfinite(p[0]) && std::isfinite(p[1]) && std::isfinite(p[2]);
}

// The running winner of one query: (distance, index), compared lexicographically.
struct Best {
  float d = kInf;
  int32_t j = 0;
  // True if candidate (d, j) beats the winner. False for a NaN d.
  bool Improves(float cand_d, int32_t cand_j) const { return cand_d < d || (cand_d == d && cand_j < j); }
};

// Brute force for queries q[begin:end) (row-major [n, 3]) against ref[0:m).
void NearestBruteForce(const float* q, const float* ref, int64_t m, int64_t begin, int64_t end, float* dist,
                       int32_t* idx) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = q[3 * i], y = q[3 * i + 1], z = q[3 * i + 2];
    Best best;
    for (int64_t j = 0; j < m; ++j) {
      const float d = SqDist(ref[3 * j], ref[3 * j + 1], ref[3 * j + 2], x, y, z);
      if (d < best.d) best = {d, static_cast<int32_t>(j)};  // j ascends: strict < keeps the lowest index
    }
    dist[i] = best.d;
    idx[i] = best.j;
  }
}

class KdTree {
 public:
  struct Point {
    float x, y, z;
    int32_t id;  // index in the input point set
  };

  // Builds the tree over the finite points of xyz [n, 3].
  void Build(const float* xyz, int64_t n) {
    points_.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const float* p = xyz + 3 * i;
      if (IsFinite3(p)) {
        points_.push_back({p[0], p[1], p[2], static_cast<int32_t>(i)});
      } else {
        nonfinite_.push_back(static_cast<int32_t>(i));
      }
    }
    if (points_.empty()) return;
    nodes_.reserve(4 * (points_.size() / kLeafSize + 1));
    BuildNode(0, static_cast<int32_t>(points_.size()));
  }

  // Finite points in leaf order (spatially coherent), then the indices of the non-finite ones.
  const std::vector<Point>& points() const { return points_; }
  const std::vector<int32_t>& nonfinite() const { return nonfinite_; }

  // Improves `best` with the nearest finite point to (x, y, z) (a finite query).
  void Search(float x, float y, float z, Best* best) const {
    if (!nodes_.empty()) SearchNode(0, x, y, z, best);
  }

 private:
  struct Node {
    float lo[3], hi[3];  // tight bounding box of the subtree's points
    int32_t begin, end;  // the subtree's points: points_[begin:end)
    int32_t right;       // right child (the left one is the next node); -1 for a leaf
    int32_t min_id;      // smallest input index in the subtree
  };

  int32_t BuildNode(int32_t begin, int32_t end) {
    const int32_t index = static_cast<int32_t>(nodes_.size());
    nodes_.emplace_back();
    Node node;
    node.begin = begin;
    node.end = end;
    node.right = -1;
    node.min_id = std::numeric_limits<int32_t>::max();
    for (int a = 0; a < 3; ++a) node.lo[a] = kInf, node.hi[a] = -kInf;
    for (int32_t k = begin; k < end; ++k) {
      const Point& p = points_[k];
      const float c[3] = {p.x, p.y, p.z};
      for (int a = 0; a < 3; ++a) {
        node.lo[a] = std::min(node.lo[a], c[a]);
        node.hi[a] = std::max(node.hi[a], c[a]);
      }
      node.min_id = std::min(node.min_id, p.id);
    }
    if (end - begin > kLeafSize) {
      int axis = 0;
      for (int a = 1; a < 3; ++a) {
        if (node.hi[a] - node.lo[a] > node.hi[axis] - node.lo[axis]) axis = a;
      }
      const int32_t mid = begin + (end - begin) / 2;
      std::nth_element(points_.begin() + begin, points_.begin() + mid, points_.begin() + end,
                       [axis](const Point& p, const Point& q) { return (&p.x)[axis] < (&q.x)[axis]; });
      BuildNode(begin, mid);
      node.right = BuildNode(mid, end);
    }
    nodes_[index] = node;
    return index;
  }

  // Lower bound of SqDist from (x, y, z) to any point in the node's box (see the file comment).
  static float BoxSqDist(const Node& node, float x, float y, float z) {
    const float q[3] = {x, y, z};
    float gap[3];
    for (int a = 0; a < 3; ++a) {
      gap[a] = q[a] < node.lo[a] ? node.lo[a] - q[a] : (q[a] > node.hi[a] ? q[a] - node.hi[a] : 0.0f);
    }
    return gap[0] * gap[0] + gap[1] * gap[1] + gap[2] * gap[2];
  }

  // Whether a subtree with lower bound `bound` and smallest index `min_id` may hold a better candidate.
  static bool MayImprove(float bound, int32_t min_id, const Best& best) {
    return best.Improves(bound * kBoundShrink, min_id);
  }

  void SearchNode(int32_t index, float x, float y, float z, Best* best) const {
    const Node& node = nodes_[index];
    if (node.right < 0) {
      for (int32_t k = node.begin; k < node.end; ++k) {
        const Point& p = points_[k];
        const float d = SqDist(p.x, p.y, p.z, x, y, z);
        if (best->Improves(d, p.id)) *best = {d, p.id};
      }
      return;
    }
    int32_t near = index + 1, far = node.right;
    float near_bound = BoxSqDist(nodes_[near], x, y, z), far_bound = BoxSqDist(nodes_[far], x, y, z);
    if (far_bound < near_bound) std::swap(near, far), std::swap(near_bound, far_bound);
    if (MayImprove(near_bound, nodes_[near].min_id, *best)) SearchNode(near, x, y, z, best);
    if (MayImprove(far_bound, nodes_[far].min_id, *best)) SearchNode(far, x, y, z, best);
  }

  std::vector<Point> points_;
  std::vector<int32_t> nonfinite_;
  std::vector<Node> nodes_;
};

// The trees of one call, each built on first use by whichever task needs it first (std::call_once: a task
// needing a tree under construction waits for the builder, which never waits itself, so no deadlock).
class LazyTrees {
 public:
  LazyTrees(const float* a, const float* b, int64_t batch, int64_t n, int64_t m)
      : a_(a), b_(b), n_(n), m_(m), trees_(2 * batch), once_(new std::once_flag[2 * batch]) {}

  // Tree over a[bi] (set 0) or b[bi] (set 1).
  const KdTree& Get(int set, int64_t bi) {
    const int64_t slot = 2 * bi + set;
    std::call_once(once_[slot], [&] {
      trees_[slot].Build(set == 0 ? a_ + bi * n_ * 3 : b_ + bi * m_ * 3, set == 0 ? n_ : m_);
    });
    return trees_[slot];
  }

 private:
  const float* a_;
  const float* b_;
  int64_t n_, m_;
  std::vector<KdTree> trees_;
  std::unique_ptr<std::once_flag[]> once_;
};

// Answers queries [lo, hi) of set `query_set` of batch item bi (in the leaf order of their own tree) against
// the other set's tree; writes dist/idx at the queries' input positions.
void NearestTreeRange(LazyTrees* trees, int query_set, int64_t bi, const float* ref_xyz, int64_t lo,
                      int64_t hi, float* dist, int32_t* idx) {
  const KdTree& queries = trees->Get(query_set, bi);
  const KdTree& ref = trees->Get(1 - query_set, bi);
  const auto& points = queries.points();
  const int64_t finite = static_cast<int64_t>(points.size());
  int32_t previous = -1;  // the previous query's winner (a finite reference point), if any
  for (int64_t k = lo; k < hi; ++k) {
    if (k >= finite) {  // a query with a NaN/Inf coordinate has no finite candidate distance
      const int32_t i = queries.nonfinite()[k - finite];
      dist[i] = kInf;
      idx[i] = 0;
      continue;
    }
    const KdTree::Point& q = points[k];
    Best best;
    if (previous >= 0) {
      const float* r = ref_xyz + 3 * previous;
      const float d = SqDist(r[0], r[1], r[2], q.x, q.y, q.z);
      if (best.Improves(d, previous)) best = {d, previous};  // a real candidate: a valid starting bound
    }
    ref.Search(q.x, q.y, q.z, &best);
    dist[q.id] = best.d;
    idx[q.id] = best.j;
    if (best.d < kInf) previous = best.j;
  }
}

ffi::Future NnDistanceImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                           ffi::Result<ffi::AnyBuffer> dist_ab, ffi::Result<ffi::AnyBuffer> idx_ab,
                           ffi::Result<ffi::AnyBuffer> dist_ba, ffi::Result<ffi::AnyBuffer> idx_ba) {
  PointShape sa, sb;
  if (ffi::Error e = CheckNnDistance(kOp, a, b, *dist_ab, *idx_ab, *dist_ba, *idx_ba, &sa, &sb); e.failure())
    return FailedFuture(std::move(e));

  const int64_t nb = sa.b, n = sa.n, m = sb.n;
  const float* pa = a.typed_data<float>();
  const float* pb = b.typed_data<float>();
  float* dab = dist_ab->typed_data<float>();
  int32_t* iab = idx_ab->typed_data<int32_t>();
  float* dba = dist_ba->typed_data<float>();
  int32_t* iba = idx_ba->typed_data<int32_t>();
  // One flat work list: the B*N queries of a, then the B*M queries of b. Every query is answered
  // independently of the others and of the task split, so results do not depend on the thread count.
  const int64_t total = nb * (n + m);
  if (n * m <= kBruteForceMaxPairs) {
    return ParallelFor(pool, total, 64, [=](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end;) {
        if (t < nb * n) {
          const int64_t bi = t / n, lo = t % n, hi = std::min(n, lo + (end - t));
          NearestBruteForce(pa + bi * n * 3, pb + bi * m * 3, m, lo, hi, dab + bi * n, iab + bi * n);
          t += hi - lo;
        } else {
          const int64_t u = t - nb * n, bi = u / m, lo = u % m, hi = std::min(m, lo + (end - t));
          NearestBruteForce(pb + bi * m * 3, pa + bi * n * 3, n, lo, hi, dba + bi * m, iba + bi * m);
          t += hi - lo;
        }
      }
    });
  }
  // Kept alive by the tasks' copies of the pointer until the last one finishes.
  auto trees = std::make_shared<LazyTrees>(pa, pb, nb, n, m);
  return ParallelFor(pool, total, 256, [=](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end;) {
      if (t < nb * n) {
        const int64_t bi = t / n, lo = t % n, hi = std::min(n, lo + (end - t));
        NearestTreeRange(trees.get(), 0, bi, pb + bi * m * 3, lo, hi, dab + bi * n, iab + bi * n);
        t += hi - lo;
      } else {
        const int64_t u = t - nb * n, bi = u / m, lo = u % m, hi = std::min(m, lo + (end - t));
        NearestTreeRange(trees.get(), 1, bi, pa + bi * n * 3, lo, hi, dba + bi * m, iba + bi * m);
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
