// The CPU k-d tree over one 3-D point set, shared by nn_distance (cpu/chamfer.cc), knn at C = 3 and
// ball_query (cpu/grouping.cc) and three_nn (cpu/interpolation.cc). Every search returns exactly what the
// op's brute-force scan returns, bit for bit (tests/test_kdtree_exact.py compares the two paths).
//
// Layout. Build() keeps the points with finite coordinates, in leaf order (spatially coherent), as
// {x, y, z, id} records (id: the index in the input set); nodes hold their tight bounding box, their range
// of points, their right child (the left one is the next node) and min_id, the smallest id in the subtree.
// A node of more than kLeafSize points is split at the median of its widest axis, ordering by
// (coordinate, id): identical points are split by index, so the tree never degenerates (1e6 identical
// points give a balanced tree whose subtrees hold contiguous index ranges).
//
// Exactness. Candidates are ranked by the pair (squared distance, index), lexicographically, as the
// brute-force scans do (equal distances -> lowest index first). Every candidate distance is distance.h's
// SqDist3, the definition brute force uses. The bound of a subtree is SqDist3 between the query and its
// nearest point of the box (the query clamped to the box): float subtraction, multiplication and addition
// are monotone and the expression is the same (no FMA anywhere: host code is built with -ffp-contract=off,
// see distance.h), so the bound never exceeds the SqDist3 of any point in the
// box, and equals it for a point at the clamped position (so bounds are exact for identical points). A
// subtree is skipped only when (bound, min_id) is not lexicographically below the current worst kept
// candidate: no candidate that brute force would keep, tied or not, is ever skipped. This (distance,
// index) pruning is what makes clouds full of duplicates fast (a query among 1e6 identical points visits
// O(k + log N) nodes).
//
// Non-finite input. A point with a NaN or Inf coordinate gives a NaN or +inf distance to every query: it
// is left out of the tree and listed in nonfinite() (ascending ids), for the op to rank as its brute force
// does. Searches take finite queries only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <vector>

#include "distance.h"

namespace xla_ops {

// Which search the ops that have both a tree and a brute-force path take. The ops choose by measured size
// thresholds (kAuto); the environment variable XLA_OPS_CPU_SEARCH=tree|brute forces one path in every call
// made while it is set (tests/test_kdtree_exact.py compares the two paths on the same inputs; benchmarks
// can time each). Anything else, or unset, means kAuto. Both paths return identical results.
enum class SearchPath { kAuto, kTree, kBruteForce };
inline SearchPath SearchPathFromEnv() {
  const char* v = std::getenv("XLA_OPS_CPU_SEARCH");
  if (v != nullptr && std::strcmp(v, "tree") == 0) return SearchPath::kTree;
  if (v != nullptr && std::strcmp(v, "brute") == 0) return SearchPath::kBruteForce;
  return SearchPath::kAuto;
}
// The path to take: `tree_wins` is the op's measured size rule, used under kAuto.
inline bool UseTree(bool tree_wins) {
  const SearchPath path = SearchPathFromEnv();
  return path == SearchPath::kAuto ? tree_wins : path == SearchPath::kTree;
}

inline bool IsFinite3(const float* p) { return std::isfinite(p[0]) && std::isfinite(p[1]) && std::isfinite(p[2]); }

// (d0, i0) < (d1, i1) lexicographically (false if d0 is NaN).
inline bool PairLess(float d0, int32_t i0, float d1, int32_t i1) { return d0 < d1 || (d0 == d1 && i0 < i1); }

// The k smallest (distance, index) pairs seen so far, sorted ascending, in caller-owned arrays d[k], i[k].
// Empty slots are (+inf, INT32_MAX). Distances must not be NaN (callers map NaN to +inf first).
struct TopK {
  float* d;
  int32_t* i;
  int64_t k;

  void Reset() {
    std::fill(d, d + k, std::numeric_limits<float>::infinity());
    std::fill(i, i + k, std::numeric_limits<int32_t>::max());
  }
  float Worst() const { return d[k - 1]; }
  int32_t WorstIndex() const { return i[k - 1]; }
  // Inserts (x, j) if it is below the worst kept pair (insertion sort, O(k)).
  void Push(float x, int32_t j) {
    if (!PairLess(x, j, d[k - 1], i[k - 1])) return;
    int64_t pos = k - 1;
    while (pos > 0 && PairLess(x, j, d[pos - 1], i[pos - 1])) {
      d[pos] = d[pos - 1];
      i[pos] = i[pos - 1];
      --pos;
    }
    d[pos] = x;
    i[pos] = j;
  }
};

class KdTree {
 public:
  // Points per leaf; 8 beat 4 and 16 by 15-50% for nn_distance at 16384 x 16384 (uniform and
  // sphere-surface clouds, AMD EPYC Zen 3).
  static constexpr int32_t kLeafSize = 8;

  struct Point {
    float x, y, z;
    int32_t id;  // index in the input point set
  };

  // Builds the tree over the finite points of xyz [n, 3] (n < 2^31).
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

  // Finite points in leaf order; ids of the non-finite ones, ascending.
  const std::vector<Point>& points() const { return points_; }
  const std::vector<int32_t>& nonfinite() const { return nonfinite_; }

  // Improves (*best_d, *best_j) to the lexicographic minimum of itself and every (SqDist3, id) of the
  // tree's points from the finite query (x, y, z). Start from (+inf, 0) to take finite distances only.
  void Nearest(float x, float y, float z, float* best_d, int32_t* best_j) const {
    if (!nodes_.empty()) NearestNode(0, x, y, z, best_d, best_j);
  }

  // Pushes into `top` every (SqDist3, id) of the tree's points from the finite query (x, y, z) that can
  // belong to its k smallest; afterwards `top` holds them exactly.
  void KNearest(float x, float y, float z, TopK* top) const {
    if (!nodes_.empty()) KNearestNode(0, x, y, z, top);
  }

  // The ids >= first_id of the points with SqDist3 < r2 from the finite query (x, y, z), merged into the
  // ascending ids[0:*count] (*count <= cap, all of them < first_id): afterwards ids[0:*count] holds the
  // smallest `cap` of the union, ascending.
  void Ball(float x, float y, float z, float r2, int32_t first_id, int64_t cap, int32_t* ids,
            int64_t* count) const {
    if (!nodes_.empty()) BallNode(0, x, y, z, r2, first_id, cap, ids, count);
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
    for (int a = 0; a < 3; ++a) {
      node.lo[a] = std::numeric_limits<float>::infinity();
      node.hi[a] = -std::numeric_limits<float>::infinity();
    }
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
                       [axis](const Point& p, const Point& q) {
                         const float pa = (&p.x)[axis], qa = (&q.x)[axis];
                         return pa < qa || (pa == qa && p.id < q.id);
                       });
      BuildNode(begin, mid);
      node.right = BuildNode(mid, end);
    }
    nodes_[index] = node;
    return index;
  }

  // Lower bound of SqDist3 from (x, y, z) to any point in the node's box (see the file comment).
  static float BoxSqDist(const Node& node, float x, float y, float z) {
    const float cx = std::min(std::max(x, node.lo[0]), node.hi[0]);
    const float cy = std::min(std::max(y, node.lo[1]), node.hi[1]);
    const float cz = std::min(std::max(z, node.lo[2]), node.hi[2]);
    return SqDist3(cx, cy, cz, x, y, z);
  }

  // The children of an inner node as (near, far): ascending (bound, min_id).
  void OrderChildren(int32_t index, float x, float y, float z, int32_t* near, float* near_bound, int32_t* far,
                     float* far_bound) const {
    *near = index + 1;
    *far = nodes_[index].right;
    *near_bound = BoxSqDist(nodes_[*near], x, y, z);
    *far_bound = BoxSqDist(nodes_[*far], x, y, z);
    if (PairLess(*far_bound, nodes_[*far].min_id, *near_bound, nodes_[*near].min_id)) {
      std::swap(*near, *far);
      std::swap(*near_bound, *far_bound);
    }
  }

  void NearestNode(int32_t index, float x, float y, float z, float* best_d, int32_t* best_j) const {
    const Node& node = nodes_[index];
    if (node.right < 0) {
      for (int32_t k = node.begin; k < node.end; ++k) {
        const Point& p = points_[k];
        const float d = SqDist3(p.x, p.y, p.z, x, y, z);
        if (PairLess(d, p.id, *best_d, *best_j)) *best_d = d, *best_j = p.id;
      }
      return;
    }
    int32_t near, far;
    float near_bound, far_bound;
    OrderChildren(index, x, y, z, &near, &near_bound, &far, &far_bound);
    if (PairLess(near_bound, nodes_[near].min_id, *best_d, *best_j)) NearestNode(near, x, y, z, best_d, best_j);
    if (PairLess(far_bound, nodes_[far].min_id, *best_d, *best_j)) NearestNode(far, x, y, z, best_d, best_j);
  }

  void KNearestNode(int32_t index, float x, float y, float z, TopK* top) const {
    const Node& node = nodes_[index];
    if (node.right < 0) {
      for (int32_t k = node.begin; k < node.end; ++k) {
        const Point& p = points_[k];
        top->Push(SqDist3(p.x, p.y, p.z, x, y, z), p.id);
      }
      return;
    }
    int32_t near, far;
    float near_bound, far_bound;
    OrderChildren(index, x, y, z, &near, &near_bound, &far, &far_bound);
    if (PairLess(near_bound, nodes_[near].min_id, top->Worst(), top->WorstIndex())) KNearestNode(near, x, y, z, top);
    if (PairLess(far_bound, nodes_[far].min_id, top->Worst(), top->WorstIndex())) KNearestNode(far, x, y, z, top);
  }

  void BallNode(int32_t index, float x, float y, float z, float r2, int32_t first_id, int64_t cap, int32_t* ids,
                int64_t* count) const {
    const Node& node = nodes_[index];
    if (!(BoxSqDist(node, x, y, z) < r2)) return;                 // no point of the box is inside
    if (*count == cap && node.min_id > ids[cap - 1]) return;       // every id here comes too late
    if (node.right < 0) {
      for (int32_t k = node.begin; k < node.end; ++k) {
        const Point& p = points_[k];
        if (p.id < first_id || (*count == cap && p.id > ids[cap - 1])) continue;
        if (!(SqDist3(p.x, p.y, p.z, x, y, z) < r2)) continue;
        int64_t pos = *count < cap ? (*count)++ : cap - 1;  // insert p.id into the sorted ids
        while (pos > 0 && ids[pos - 1] > p.id) {
          ids[pos] = ids[pos - 1];
          --pos;
        }
        ids[pos] = p.id;
      }
      return;
    }
    // Lower ids first, so that a full buffer prunes the other child by min_id.
    int32_t first = index + 1, second = node.right;
    if (nodes_[second].min_id < nodes_[first].min_id) std::swap(first, second);
    BallNode(first, x, y, z, r2, first_id, cap, ids, count);
    BallNode(second, x, y, z, r2, first_id, cap, ids, count);
  }

  std::vector<Point> points_;
  std::vector<int32_t> nonfinite_;
  std::vector<Node> nodes_;
};

// Calls fn(row) for every row in [begin, end) of the queries q [.., 3], in the Morton (Z-curve) order of
// their coordinates within the rows' bounding box, then the rows with a NaN/Inf coordinate in input order.
// Consecutive queries are then close in space and their searches touch the same tree nodes (knn k=20 of
// 3e5 random points: 1.5 s instead of 2.3 s). `keys` is scratch space.
template <typename Fn>
void ForEachInSpatialOrder(const float* q, int64_t begin, int64_t end, std::vector<uint64_t>& keys, Fn fn) {
  float lo[3] = {std::numeric_limits<float>::infinity(), std::numeric_limits<float>::infinity(),
                 std::numeric_limits<float>::infinity()};
  float hi[3] = {-lo[0], -lo[1], -lo[2]};
  for (int64_t r = begin; r < end; ++r) {
    if (!IsFinite3(q + 3 * r)) continue;
    for (int a = 0; a < 3; ++a) lo[a] = std::min(lo[a], q[3 * r + a]), hi[a] = std::max(hi[a], q[3 * r + a]);
  }
  double scale[3];
  for (int a = 0; a < 3; ++a) {
    const double extent = static_cast<double>(hi[a]) - static_cast<double>(lo[a]);
    scale[a] = extent > 0 ? 1023.0 / extent : 0.0;
  }
  keys.clear();
  for (int64_t r = begin; r < end; ++r) {
    const float* p = q + 3 * r;
    if (!IsFinite3(p)) continue;
    uint64_t code = 0;
    for (int a = 0; a < 3; ++a) {
      const uint64_t cell = static_cast<uint64_t>((static_cast<double>(p[a]) - lo[a]) * scale[a]);
      for (int bit = 0; bit < 10; ++bit) code |= ((cell >> bit) & 1u) << (3 * bit + a);
    }
    keys.push_back((code << 32) | static_cast<uint64_t>(r - begin));
  }
  std::sort(keys.begin(), keys.end());
  for (const uint64_t key : keys) fn(begin + static_cast<int64_t>(key & 0xffffffffu));
  for (int64_t r = begin; r < end; ++r) {
    if (!IsFinite3(q + 3 * r)) fn(r);
  }
}

// The trees of one point set [batch, n, 3] in one call, each built on first use by whichever task needs it
// first (std::call_once: a task needing a tree under construction waits for its builder, which never waits
// itself, so no deadlock). Share it between tasks through a std::shared_ptr captured by value.
class LazyTrees {
 public:
  LazyTrees(const float* xyz, int64_t batch, int64_t n)
      : xyz_(xyz), n_(n), trees_(batch), once_(new std::once_flag[batch]) {}

  const KdTree& Get(int64_t bi) {
    std::call_once(once_[bi], [&] { trees_[bi].Build(xyz_ + bi * n_ * 3, n_); });
    return trees_[bi];
  }

 private:
  const float* xyz_;
  int64_t n_;
  std::vector<KdTree> trees_;
  std::unique_ptr<std::once_flag[]> once_;
};

}  // namespace xla_ops
