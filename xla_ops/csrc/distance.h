// The float32 squared distances of the index-selecting ops (FPS, ball query, knn, three_nn, nn_distance),
// defined once for both backends: cpu/*.cc and cuda/*.cu include this header, so the two platforms compute
// the same bits and resolve near-ties the same way (tests/test_cuda.py compares them with ==).
//
// Exact definitions (a, b: float32 points, d_c = a_c - b_c, products and sums rounded to float32, no FMA):
//  * 3-D (SqDist3): (d_x^2 + d_y^2) + d_z^2.
//  * C channels (SqDistC, knn): channel c is added into partial sum s[c % 8] (in channel order, each s
//    starting at +0), then the partials are combined pairwise: ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)).
//    For C <= 3 this equals the plain in-order sum (adding +0 is exact), so knn at C = 3 agrees with SqDist3.
//    The 8 independent partial sums are what the CPU handler's SIMD code computes; the CUDA kernel keeps them
//    in registers (AddSquare into s[ch % 8], then CombinePartials).
//
// No contraction: a fused multiply-add rounds once instead of twice and changes the bits. Device code uses
// the round-to-nearest intrinsics, which nvcc never contracts. Host code relies on -ffp-contract=off, which
// CMakeLists.txt sets for every C++ source (GCC's default, -ffp-contract=fast, fuses on aarch64 / with
// -mfma); the SIMD CPU loops that restate these formulas (vector types) depend on the same flag.
// Approximate distances that only filter candidates (cpu/grouping.cc's expansion tiles) are not bound by
// this header.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define XLA_OPS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define XLA_OPS_HOST_DEVICE inline
#endif

namespace xla_ops {

// a * b and a + b rounded to float32, never fused.
XLA_OPS_HOST_DEVICE float MulNoFma(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
XLA_OPS_HOST_DEVICE float AddNoFma(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Squared distance of two 3-D points: (dx^2 + dy^2) + dz^2.
XLA_OPS_HOST_DEVICE float SqDist3(float ax, float ay, float az, float bx, float by, float bz) {
  const float dx = ax - bx, dy = ay - by, dz = az - bz;
  return AddNoFma(AddNoFma(MulNoFma(dx, dx), MulNoFma(dy, dy)), MulNoFma(dz, dz));
}

constexpr int kDistPartials = 8;  // partial sums of SqDistC

// acc += (a - b)^2: one channel's term, added into its partial sum (s[ch % 8] for channel ch).
XLA_OPS_HOST_DEVICE void AddSquare(float& acc, float a, float b) {
  const float d = a - b;
  acc = AddNoFma(acc, MulNoFma(d, d));
}

// The pairwise combination of the 8 partial sums.
XLA_OPS_HOST_DEVICE float CombinePartials(const float (&s)[kDistPartials]) {
  return AddNoFma(AddNoFma(AddNoFma(s[0], s[1]), AddNoFma(s[2], s[3])),
                  AddNoFma(AddNoFma(s[4], s[5]), AddNoFma(s[6], s[7])));
}

// Squared distance of two C-channel points (knn's definition, see above). NaN is returned as NaN.
XLA_OPS_HOST_DEVICE float SqDistC(const float* a, const float* b, int64_t c) {
  float s[kDistPartials] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t ch = 0;
  for (; ch + kDistPartials <= c; ch += kDistPartials) {  // full groups of 8 (vectorisable on the host)
    for (int l = 0; l < kDistPartials; ++l) AddSquare(s[l], a[ch + l], b[ch + l]);
  }
  for (int l = 0; ch < c; ++ch, ++l) AddSquare(s[l], a[ch], b[ch]);
  return CombinePartials(s);
}

}  // namespace xla_ops
