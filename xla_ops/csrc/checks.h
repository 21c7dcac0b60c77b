// The argument checks of every FFI handler: one function per op, shared by the CPU (cpu/*.cc) and CUDA
// (cuda/*.cu) handlers, so both backends reject the same bad call with the same message.
//
// The Python wrappers (xla_ops/_checks.py) check every argument at trace time, and that is the error users
// normally see. These checks protect direct custom calls (jax.ffi.ffi_call with a registered target name):
// a bad shape, dtype or attribute returns ffi::Error::InvalidArgument, "<target>: <argument> must ...,
// got ...", before any buffer is read. Each Check<Op> takes the operands, attributes and results of the
// handler and, on success, fills the flattened shapes the handler works with (PointShape, common.h).
//
// Only the index-range check (CheckIndexRange) reads data; it runs on the host, so only the CPU handlers use
// it (the CUDA kernels read zeros for out-of-range indices, a documented difference).
#pragma once

#include <cstdint>
#include <limits>
#include <string>

#include "common.h"

namespace xla_ops {

#define XLA_OPS_RETURN_IF_ERROR(expr)    \
  do {                                   \
    ::xla_ops::ffi::Error _err = (expr); \
    if (_err.failure()) return _err;     \
  } while (0)

namespace checks {

inline std::string DimsString(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline std::string DtypeName(ffi::DataType dtype) {
  switch (dtype) {
    case ffi::F32: return "float32";
    case ffi::F16: return "float16";
    case ffi::BF16: return "bfloat16";
    case ffi::F64: return "float64";
    case ffi::S32: return "int32";
    case ffi::S64: return "int64";
    default: return "dtype code " + std::to_string(static_cast<int>(dtype));
  }
}

// `what` is a [..., N, C] array of `dtype` (C == channels unless channels < 0; N >= min_points): its
// flattened PointShape. N must fit the int32 indices the ops return.
inline ffi::Error Points(const char* op, const char* what, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
                         int64_t channels, int64_t min_points, PointShape* shape) {
  const auto dims = buffer.dimensions();
  const std::string want = channels < 0 ? "[..., N, C]" : "[..., N, " + std::to_string(channels) + "]";
  if (buffer.element_type() != dtype)
    return InvalidArgument(op, std::string(what) + " must be " + DtypeName(dtype) + ", got " +
                                   DtypeName(buffer.element_type()));
  if (dims.size() < 2 || (channels >= 0 && dims[dims.size() - 1] != channels))
    return InvalidArgument(op, std::string(what) + " must have shape " + want + ", got " + DimsString(dims));
  auto s = AsPointShape(dims, what);
  if (s.has_error()) return InvalidArgument(op, s.error().message());
  if (s->n < min_points)
    return InvalidArgument(op, std::string(what) + " must have at least " + std::to_string(min_points) +
                                   " point(s), got shape " + DimsString(dims));
  if (s->n > std::numeric_limits<int32_t>::max())
    return InvalidArgument(op, std::string(what) + " has more than 2^31 - 1 points (int32 indices), got shape " +
                                   DimsString(dims));
  *shape = *s;
  return ffi::Error::Success();
}

// a and b have the same leading (batch) dims in front of their last `core_a` / `core_b` dims.
inline ffi::Error SameBatch(const char* op, const char* a, const ffi::AnyBuffer& buf_a, int64_t core_a,
                            const char* b, const ffi::AnyBuffer& buf_b, int64_t core_b) {
  const auto da = buf_a.dimensions(), db = buf_b.dimensions();
  const int64_t na = static_cast<int64_t>(da.size()) - core_a, nb = static_cast<int64_t>(db.size()) - core_b;
  bool same = na == nb && na >= 0;
  for (int64_t i = 0; same && i < na; ++i) same = da[i] == db[i];
  if (!same)
    return InvalidArgument(op, std::string("batch mismatch: ") + a + " and " + b +
                                   " must have the same batch shape, got shapes " + DimsString(da) + " and " +
                                   DimsString(db));
  return ffi::Error::Success();
}

// Result `what` has `dtype` and `count` elements (its shape is described by `shape` in the message).
inline ffi::Error Result(const char* op, const char* what, const ffi::AnyBuffer& buffer, ffi::DataType dtype,
                         int64_t count, const char* shape) {
  if (buffer.element_type() != dtype || static_cast<int64_t>(buffer.element_count()) != count)
    return InvalidArgument(op, std::string("result ") + what + " must be " + DtypeName(dtype) + " " + shape +
                                   " (" + std::to_string(count) + " elements), got " +
                                   DtypeName(buffer.element_type()) + " " + DimsString(buffer.dimensions()));
  return ffi::Error::Success();
}

inline ffi::Error Positive(const char* op, const char* what, int64_t value) {
  if (value < 1) return InvalidArgument(op, std::string(what) + " must be >= 1, got " + std::to_string(value));
  return ffi::Error::Success();
}

// Every idx[i] (count entries, host memory) is in [0, n).
inline ffi::Error IndexRange(const char* op, const char* what, const int32_t* idx, int64_t count, int64_t n) {
  for (int64_t i = 0; i < count; ++i) {
    if (idx[i] < 0 || idx[i] >= n)
      return InvalidArgument(op, std::string(what) + " value " + std::to_string(idx[i]) + " at flat position " +
                                     std::to_string(i) + " is outside [0, " + std::to_string(n) + ")");
  }
  return ffi::Error::Success();
}

}  // namespace checks

// ---- one check per op ------------------------------------------------------------------------------
// Operand names are those of the Python wrappers; results are checked by element count.

// xyz f32 [..., N, 3]; 1 <= npoint <= N; idx s32 [..., npoint]; workspace f32 [..., N] (CUDA's running
// minimum distances; the CPU handler ignores it, but both check it so one call signature fits both).
inline ffi::Error CheckFarthestPointSample(const char* op, const ffi::AnyBuffer& xyz, int32_t npoint,
                                           const ffi::AnyBuffer& idx, const ffi::AnyBuffer& workspace,
                                           PointShape* s) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "xyz", xyz, ffi::F32, 3, 1, s));
  if (npoint < 1 || npoint > s->n)
    return InvalidArgument(op, "npoint must be in [1, N=" + std::to_string(s->n) + "], got " + std::to_string(npoint));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "idx", idx, ffi::S32, s->b * npoint, "[..., npoint]"));
  return checks::Result(op, "workspace", workspace, ffi::F32, s->b * s->n, "[..., N]");
}

// xyz f32 [..., N, 3], new_xyz f32 [..., M, 3] (same batch); radius > 0; nsample >= 1;
// idx s32 [..., M, nsample], count s32 [..., M].
inline ffi::Error CheckBallQuery(const char* op, const ffi::AnyBuffer& xyz, const ffi::AnyBuffer& new_xyz,
                                 float radius, int32_t nsample, const ffi::AnyBuffer& idx,
                                 const ffi::AnyBuffer& count, PointShape* sx, PointShape* sq) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "xyz", xyz, ffi::F32, 3, 0, sx));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "new_xyz", new_xyz, ffi::F32, 3, 0, sq));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "xyz", xyz, 2, "new_xyz", new_xyz, 2));
  if (!(radius > 0.0f) || !(radius < std::numeric_limits<float>::infinity()))
    return InvalidArgument(op, "radius must be a finite number > 0, got " + std::to_string(radius));
  XLA_OPS_RETURN_IF_ERROR(checks::Positive(op, "nsample", nsample));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "idx", idx, ffi::S32, sq->b * sq->n * nsample, "[..., M, nsample]"));
  return checks::Result(op, "count", count, ffi::S32, sq->b * sq->n, "[..., M]");
}

// points f32 [..., N, C], idx s32 [..., M, K] (same batch); out f32 [..., M, K, C]. `si` views idx as
// [B, M, K].
inline ffi::Error CheckGroupPoints(const char* op, const ffi::AnyBuffer& points, const ffi::AnyBuffer& idx,
                                   const ffi::AnyBuffer& out, PointShape* sp, PointShape* si) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "points", points, ffi::F32, -1, 1, sp));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "idx", idx, ffi::S32, -1, 0, si));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "points", points, 2, "idx", idx, 2));
  return checks::Result(op, "out", out, ffi::F32, si->b * si->n * si->c * sp->c, "[..., M, K, C]");
}

// grad_out f32 [..., M, K, C] with [..., M, K] == idx's shape, idx s32 [..., M, K]; npoints >= 1;
// grad_points f32 [..., npoints, C]. Fills idx's view [B, M, K] and the channel count C.
inline ffi::Error CheckGroupPointsGrad(const char* op, const ffi::AnyBuffer& grad_out, const ffi::AnyBuffer& idx,
                                       int32_t npoints, const ffi::AnyBuffer& grad_points, PointShape* si,
                                       int64_t* channels) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "idx", idx, ffi::S32, -1, 0, si));
  if (grad_out.element_type() != ffi::F32)
    return InvalidArgument(op, "grad_out must be float32, got " + checks::DtypeName(grad_out.element_type()));
  const auto gd = grad_out.dimensions(), id = idx.dimensions();
  bool same = gd.size() == id.size() + 1;
  for (size_t i = 0; same && i < id.size(); ++i) same = gd[i] == id[i];
  if (!same)
    return InvalidArgument(op, "grad_out must have shape idx.shape + [C] = " + checks::DimsString(id) +
                                   " + [C], got " + checks::DimsString(gd));
  XLA_OPS_RETURN_IF_ERROR(checks::Positive(op, "npoints", npoints));
  *channels = gd[gd.size() - 1];
  return checks::Result(op, "grad_points", grad_points, ffi::F32, si->b * npoints * *channels,
                        "[..., npoints, C]");
}

// query f32 [..., M, C], ref f32 [..., N, C] (same batch and C >= 1); 1 <= k <= N;
// dist f32 / idx s32 [..., M, k].
inline ffi::Error CheckKnn(const char* op, const ffi::AnyBuffer& query, const ffi::AnyBuffer& ref, int32_t k,
                           const ffi::AnyBuffer& dist, const ffi::AnyBuffer& idx, PointShape* sq, PointShape* sr) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "query", query, ffi::F32, -1, 0, sq));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "ref", ref, ffi::F32, -1, 1, sr));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "query", query, 2, "ref", ref, 2));
  if (sq->c != sr->c || sq->c < 1)
    return InvalidArgument(op, "query and ref must have the same channel count >= 1, got shapes " +
                                   checks::DimsString(query.dimensions()) + " and " +
                                   checks::DimsString(ref.dimensions()));
  if (k < 1 || k > sr->n)
    return InvalidArgument(op, "k must be in [1, N=" + std::to_string(sr->n) + "], got " + std::to_string(k));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "dist", dist, ffi::F32, sq->b * sq->n * k, "[..., M, k]"));
  return checks::Result(op, "idx", idx, ffi::S32, sq->b * sq->n * k, "[..., M, k]");
}

// a f32 [..., N, 3], b f32 [..., M, 3] (same batch, N, M >= 1); dist_ab f32 / idx_ab s32 [..., N],
// dist_ba f32 / idx_ba s32 [..., M].
inline ffi::Error CheckNnDistance(const char* op, const ffi::AnyBuffer& a, const ffi::AnyBuffer& b,
                                  const ffi::AnyBuffer& dist_ab, const ffi::AnyBuffer& idx_ab,
                                  const ffi::AnyBuffer& dist_ba, const ffi::AnyBuffer& idx_ba, PointShape* sa,
                                  PointShape* sb) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "a", a, ffi::F32, 3, 1, sa));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "b", b, ffi::F32, 3, 1, sb));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "a", a, 2, "b", b, 2));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "dist_ab", dist_ab, ffi::F32, sa->b * sa->n, "[..., N]"));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "idx_ab", idx_ab, ffi::S32, sa->b * sa->n, "[..., N]"));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "dist_ba", dist_ba, ffi::F32, sb->b * sb->n, "[..., M]"));
  return checks::Result(op, "idx_ba", idx_ba, ffi::S32, sb->b * sb->n, "[..., M]");
}

// unknown f32 [..., n, 3], known f32 [..., m, 3] (same batch, m >= 1); dist f32 / idx s32 [..., n, 3].
inline ffi::Error CheckThreeNn(const char* op, const ffi::AnyBuffer& unknown, const ffi::AnyBuffer& known,
                               const ffi::AnyBuffer& dist, const ffi::AnyBuffer& idx, PointShape* su,
                               PointShape* sk) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "unknown", unknown, ffi::F32, 3, 0, su));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "known", known, ffi::F32, 3, 1, sk));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "unknown", unknown, 2, "known", known, 2));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "dist", dist, ffi::F32, su->b * su->n * 3, "[..., n, 3]"));
  return checks::Result(op, "idx", idx, ffi::S32, su->b * su->n * 3, "[..., n, 3]");
}

namespace checks {
// idx s32 [..., n, 3] and weight f32 of idx's shape; fills idx's view [B, n, 3].
inline ffi::Error IdxAndWeight(const char* op, const ffi::AnyBuffer& idx, const ffi::AnyBuffer& weight,
                               PointShape* si) {
  XLA_OPS_RETURN_IF_ERROR(Points(op, "idx", idx, ffi::S32, 3, 0, si));
  if (weight.element_type() != ffi::F32)
    return InvalidArgument(op, "weight must be float32, got " + DtypeName(weight.element_type()));
  const auto di = idx.dimensions(), dw = weight.dimensions();
  bool same = di.size() == dw.size();
  for (size_t i = 0; same && i < di.size(); ++i) same = di[i] == dw[i];
  if (!same)
    return InvalidArgument(op, "weight must have the shape of idx " + DimsString(di) + ", got " + DimsString(dw));
  return ffi::Error::Success();
}
}  // namespace checks

// features f32 [..., m, C] (m >= 1), idx s32 [..., n, 3], weight f32 [..., n, 3] (same batch);
// out f32 [..., n, C].
inline ffi::Error CheckThreeInterpolate(const char* op, const ffi::AnyBuffer& features, const ffi::AnyBuffer& idx,
                                        const ffi::AnyBuffer& weight, const ffi::AnyBuffer& out, PointShape* sf,
                                        PointShape* si) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "features", features, ffi::F32, -1, 1, sf));
  XLA_OPS_RETURN_IF_ERROR(checks::IdxAndWeight(op, idx, weight, si));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "features", features, 2, "idx", idx, 2));
  return checks::Result(op, "out", out, ffi::F32, si->b * si->n * sf->c, "[..., n, C]");
}

// grad_out f32 [..., n, C], idx s32 / weight f32 [..., n, 3] (same batch and n); npoints >= 1;
// grad_features f32 [..., npoints, C].
inline ffi::Error CheckThreeInterpolateGrad(const char* op, const ffi::AnyBuffer& grad_out,
                                            const ffi::AnyBuffer& idx, const ffi::AnyBuffer& weight,
                                            int32_t npoints, const ffi::AnyBuffer& grad_features,
                                            PointShape* sg, PointShape* si) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "grad_out", grad_out, ffi::F32, -1, 0, sg));
  XLA_OPS_RETURN_IF_ERROR(checks::IdxAndWeight(op, idx, weight, si));
  XLA_OPS_RETURN_IF_ERROR(checks::SameBatch(op, "grad_out", grad_out, 2, "idx", idx, 2));
  if (sg->n != si->n)
    return InvalidArgument(op, "grad_out must have shape [..., n, C] for idx " +
                                   checks::DimsString(idx.dimensions()) + ", got " +
                                   checks::DimsString(grad_out.dimensions()));
  XLA_OPS_RETURN_IF_ERROR(checks::Positive(op, "npoints", npoints));
  return checks::Result(op, "grad_features", grad_features, ffi::F32, sg->b * npoints * sg->c,
                        "[..., npoints, C]");
}

// EMD ---------------------------------------------------------------------------------------------------

// xyz1 f32 [..., n, 3], xyz2 f32 [..., m, 3] (same batch, n, m >= 1).
inline ffi::Error CheckEmdPair(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                               PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "xyz1", xyz1, ffi::F32, 3, 1, s1));
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "xyz2", xyz2, ffi::F32, 3, 1, s2));
  return checks::SameBatch(op, "xyz1", xyz1, 2, "xyz2", xyz2, 2);
}

namespace checks {
// lengths1 / lengths2 s32 [...]: one point count per example of xyz1's batch (values are clamped to [0, n]
// by the handlers, as the Python wrappers document).
inline ffi::Error Lengths(const char* op, const char* what, const ffi::AnyBuffer& lengths, int64_t batch) {
  if (lengths.element_type() != ffi::S32 || static_cast<int64_t>(lengths.element_count()) != batch)
    return InvalidArgument(op, std::string(what) + " must be int32 [...] with the batch of xyz1 (" +
                                   std::to_string(batch) + " elements), got " + DtypeName(lengths.element_type()) +
                                   " " + DimsString(lengths.dimensions()));
  return ffi::Error::Success();
}
}  // namespace checks

// approx_match: xyz1, xyz2 as CheckEmdPair; lengths1, lengths2 as Lengths; match f32 [..., m, n]. (The CUDA
// workspace's layout is the CUDA handler's own business and is checked there.)
inline ffi::Error CheckApproxMatch(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                                   const ffi::AnyBuffer& lengths1, const ffi::AnyBuffer& lengths2,
                                   const ffi::AnyBuffer& match, PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckEmdPair(op, xyz1, xyz2, s1, s2));
  XLA_OPS_RETURN_IF_ERROR(checks::Lengths(op, "lengths1", lengths1, s1->b));
  XLA_OPS_RETURN_IF_ERROR(checks::Lengths(op, "lengths2", lengths2, s1->b));
  return checks::Result(op, "match", match, ffi::F32, s1->b * s2->n * s1->n, "[..., m, n]");
}

// emd (approx_match + match_cost and its gradient without the match): xyz1, xyz2, lengths1, lengths2 as
// CheckApproxMatch; cost f32 [...], grad1 f32 [..., n, 3], grad2 f32 [..., m, 3]. (CUDA workspace: as above.)
inline ffi::Error CheckEmd(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                           const ffi::AnyBuffer& lengths1, const ffi::AnyBuffer& lengths2, const ffi::AnyBuffer& cost,
                           const ffi::AnyBuffer& grad1, const ffi::AnyBuffer& grad2, PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckEmdPair(op, xyz1, xyz2, s1, s2));
  XLA_OPS_RETURN_IF_ERROR(checks::Lengths(op, "lengths1", lengths1, s1->b));
  XLA_OPS_RETURN_IF_ERROR(checks::Lengths(op, "lengths2", lengths2, s1->b));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "cost", cost, ffi::F32, s1->b, "[...]"));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "grad1", grad1, ffi::F32, s1->b * s1->n * 3, "[..., n, 3]"));
  return checks::Result(op, "grad2", grad2, ffi::F32, s2->b * s2->n * 3, "[..., m, 3]");
}

// match_cost and its gradient: xyz1, xyz2 as CheckEmdPair and match f32 [..., m, n] with their batch.
inline ffi::Error CheckMatchOperands(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                                     const ffi::AnyBuffer& match, PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckEmdPair(op, xyz1, xyz2, s1, s2));
  PointShape sm;
  XLA_OPS_RETURN_IF_ERROR(checks::Points(op, "match", match, ffi::F32, s1->n, 0, &sm));
  if (sm.n != s2->n)
    return InvalidArgument(op, "match must have shape [..., m=" + std::to_string(s2->n) + ", n=" +
                                   std::to_string(s1->n) + "], got " + checks::DimsString(match.dimensions()));
  return checks::SameBatch(op, "xyz1", xyz1, 2, "match", match, 2);
}

// match_cost: operands as CheckMatchOperands; cost f32 [...]; workspace f32 [..., m] (CUDA's row costs; the
// CPU handler ignores it).
inline ffi::Error CheckMatchCost(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                                 const ffi::AnyBuffer& match, const ffi::AnyBuffer& cost,
                                 const ffi::AnyBuffer& workspace, PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckMatchOperands(op, xyz1, xyz2, match, s1, s2));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "cost", cost, ffi::F32, s1->b, "[...]"));
  return checks::Result(op, "workspace", workspace, ffi::F32, s1->b * s2->n, "[..., m]");
}

// match_cost_grad: operands as CheckMatchOperands; grad1 f32 [..., n, 3], grad2 f32 [..., m, 3].
inline ffi::Error CheckMatchCostGrad(const char* op, const ffi::AnyBuffer& xyz1, const ffi::AnyBuffer& xyz2,
                                     const ffi::AnyBuffer& match, const ffi::AnyBuffer& grad1,
                                     const ffi::AnyBuffer& grad2, PointShape* s1, PointShape* s2) {
  XLA_OPS_RETURN_IF_ERROR(CheckMatchOperands(op, xyz1, xyz2, match, s1, s2));
  XLA_OPS_RETURN_IF_ERROR(checks::Result(op, "grad1", grad1, ffi::F32, s1->b * s1->n * 3, "[..., n, 3]"));
  return checks::Result(op, "grad2", grad2, ffi::F32, s2->b * s2->n * 3, "[..., m, 3]");
}

// A future that has already failed with `error` (the CPU handlers that return ffi::Future).
inline ffi::Future FailedFuture(ffi::Error error) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(std::move(error));
  return future;
}

}  // namespace xla_ops
