// Elementwise math of the quantizer ops (../../../shared/reference/quantizer-math.md), shared by the CPU and CUDA
// kernels. Every function evaluates in float32 in the same order as onnxqat/ops/reference.py, so results equal
// numpy's bit for bit (given the same tanh). Compile without -ffast-math and without FMA contraction.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define OQ_HD __host__ __device__ __forceinline__
#else
#define OQ_HD inline
#endif

namespace onnxqat {

// SatWeightQuant mode input values (schema.py SAT_MODE_*).
constexpr int64_t kSatModeClamp = 0;
constexpr int64_t kSatModeDorefa = 1;
constexpr int64_t kSatModeSymmetric = 2;

// Round half to even (numpy np.round / C nearbyint in the default rounding mode).
// On the host: |x| + 2^23 - 2^23 rounds |x| < 2^23 to an integer, ties to even, in plain SSE2 arithmetic that gcc
// vectorises (nearbyintf is a libm call without SSE4.1); |x| >= 2^23 (and inf) is already an integer; NaN stays NaN.
OQ_HD float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  const float two23 = 8388608.0f;
  float ax = std::fabs(x);
  float rounded = (ax + two23) - two23;  // computed unconditionally: a select, not a branch, vectorises
  float r = ax < two23 ? rounded : ax;
  return std::copysign(r, x);
#endif
}

// tanh in float32, computed in double: exp by range reduction (2^k * Taylor polynomial of degree 11, relative
// error < 1e-14), then (e - 1)/(e + 1); the result is float32's correctly rounded tanh except within ~1e-13 of a
// rounding midpoint (compare: glibc's tanhf and numpy's SIMD tanh are within 1-2 ulps of it). Branch-free so that
// gcc vectorises it (libm's tanhf is a scalar call); |x| < 2^-12 uses x (1 - x^2/3), |x| >= 10 gives +-1.
OQ_HD float tanh_f32(float xf) {
#if defined(__CUDA_ARCH__)
  return tanhf(xf);
#else
  const double x = static_cast<double>(xf);
  const double ax = std::fabs(x);
  const double y = 2.0 * (ax < 10.0 ? ax : 10.0);
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double inv_ln2 = 1.4426950408889634;
  const double ln2_hi = 0.693147180369123816490;   // high bits of ln 2 (k * ln2_hi exact for |k| < 2^11)
  const double ln2_lo = 1.90821492927058770002e-10;
  double kd = y * inv_ln2 + shifter;
  int64_t kbits;
  std::memcpy(&kbits, &kd, sizeof kbits);
  int64_t sbits;
  std::memcpy(&sbits, &shifter, sizeof sbits);
  kd = kd - shifter;
  const double r = (y - kd * ln2_hi) - kd * ln2_lo;  // |r| <= ln2/2
  double p = 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t ebits = (kbits - sbits + 1023) << 52;  // 2^k
  double two_k;
  std::memcpy(&two_k, &ebits, sizeof two_k);
  const double e = p * two_k;
  const double big = (e - 1.0) / (e + 1.0);
  const double small = ax * (1.0 - ax * ax * (1.0 / 3.0));
  const float t = static_cast<float>(ax < 0.000244140625 ? small : big);
  const float res = std::copysign(t, xf);
  return xf != xf ? xf : res;  // NaN stays NaN
#endif
}

#if !defined(__CUDACC__)
// A faster float32 tanh for hosts with FMA, used with tanh_f32 as the fallback (cpu/loops.cc tanh_block): in double,
// expm1(2|x|) = 2^k (1 + s) - 1 = fma(2^k, s, 2^k - 1) with k = round(2|x|/ln2), |r| <= ln2/2, s = r P(r), P a
// degree-8 fit of expm1(r)/r (relative error 2^-43; no cancellation near 0), then tanh = em1 / (em1 + 2): relative
// error below 2^-41. *ambiguous is set where q (1 - 2^-38) and q (1 + 2^-38) round to different floats, i.e. where
// the correctly rounded tanh cannot be read off q; everywhere else the result is the correctly rounded tanh (the
// value tanh_f32 gives). std::fma: compile the caller for a target with FMA (else it is a libm call).
inline float tanh_f32_fast(float xf, int32_t* ambiguous) {
  const double x = static_cast<double>(xf);
  const double ax = std::fabs(x);
  const double y = 2.0 * (ax < 10.0 ? ax : 10.0);
  const double shifter = 6755399441055744.0;  // 1.5 * 2^52
  const double inv_ln2 = 1.4426950408889634;
  const double ln2_hi = 0.693147180369123816490;
  const double ln2_lo = 1.90821492927058770002e-10;
  double kd = std::fma(y, inv_ln2, shifter);
  int64_t kbits;
  std::memcpy(&kbits, &kd, sizeof kbits);
  int64_t sbits;
  std::memcpy(&sbits, &shifter, sizeof sbits);
  kd = kd - shifter;
  const double r = std::fma(-kd, ln2_lo, std::fma(-kd, ln2_hi, y));
  double p = 2.763265721400509e-06;
  p = std::fma(p, r, 2.487618084657186e-05);
  p = std::fma(p, r, 0.00019841190612344197);
  p = std::fma(p, r, 0.0013888821646749574);
  p = std::fma(p, r, 0.008333333367334628);
  p = std::fma(p, r, 0.041666666891115534);
  p = std::fma(p, r, 0.166666666666156);
  p = std::fma(p, r, 0.4999999999979774);
  p = std::fma(p, r, 1.0000000000000013);
  const double s = r * p;
  const int64_t ebits = (kbits - sbits + 1023) << 52;  // 2^k
  double two_k;
  std::memcpy(&two_k, &ebits, sizeof two_k);
  const double em1 = std::fma(two_k, s, two_k - 1.0);
  const double q = em1 / (em1 + 2.0);
  const float lo = static_cast<float>(q * (1.0 - 0x1p-38));
  const float hi = static_cast<float>(q * (1.0 + 0x1p-38));
  *ambiguous = lo != hi ? 1 : 0;
  const float res = std::copysign(static_cast<float>(q), xf);
  return xf != xf ? xf : res;  // NaN stays NaN
}
#endif

// ---- SAT weights: tn = tanh(W) / max|tanh(W)| -> unscaled quantized weight.
struct SatWeightParams {
  float r;      // range R
  float half;   // floor(R/2) (symmetric mode)
  int64_t mode;
};

OQ_HD float sat_weight_level(float tn, const SatWeightParams& p) {
  if (p.mode == kSatModeDorefa) {
    float u = (tn + 1.0f) * 0.5f;
    float uq = round_half_even(p.r * u) / p.r;
    return 2.0f * uq - 1.0f;
  }
  if (p.mode == kSatModeSymmetric) {
    return round_half_even(p.half * tn) / p.half;
  }
  return tn;  // clamp
}

// The derivative factor dWq/dW = (1 - t^2) / (M * S), ms = M * S (float32 product): SatWeightQuant's optional second
// output, which SatWeightQuantGrad multiplies by dWq.
OQ_HD float sat_weight_grad_factor(float t, float ms) { return (1.0f - t * t) / ms; }

// dW = dWq * ((1 - t^2) / (M * S)).
OQ_HD float sat_weight_grad(float dy, float t, float ms) { return dy * sat_weight_grad_factor(t, ms); }

// ---- SAT activations (CG-PACT), a = |alpha| > 0.
OQ_HD float sat_act_forward(float x, float a, float r) {
  float xc = x < 0.0f ? 0.0f : x;
  xc = xc > a ? a : xc;
  return a * (round_half_even(r * xc / a) / r);
}

// Two selects (no && and no bool arithmetic): gcc vectorises them.
OQ_HD float sat_act_dx(float dy, float x, float a) {
  float t = x > 0.0f ? dy : 0.0f;
  return x <= a ? t : 0.0f;
}

// Per-element factor of dalpha: 1 if x >= a; round(R x/a)/R - x/a if 0 < x < a; 0 if x <= 0.
OQ_HD float sat_act_dalpha_local(float x, float a, float r) {
  float xa = x / a;
  float middle = round_half_even(r * x / a) / r - xa;
  return x >= a ? 1.0f : (x > 0.0f ? middle : 0.0f);
}

// ---- LSQ, bounds Qn <= 0 < ... Qp (integers stored as float).
struct LsqBounds {
  float qn;
  float qp;
};

// R rounded half to even (Python round), signed: [-(R+1)//2, (R-1)//2]; unsigned: [0, R].
OQ_HD LsqBounds lsq_bounds(float range, bool is_signed) {
  int64_t r = static_cast<int64_t>(round_half_even(range));
  if (is_signed) return {static_cast<float>(-((r + 1) / 2)), static_cast<float>((r - 1) / 2)};
  return {0.0f, static_cast<float>(r)};
}

OQ_HD float lsq_forward(float v, float s, LsqBounds b) {
  float q = v / s;
  q = q < b.qn ? b.qn : q;
  q = q > b.qp ? b.qp : q;
  return round_half_even(q) * s;
}

OQ_HD float lsq_dv(float dy, float v, float s, LsqBounds b) {
  float vs = v / s;
  float t = vs >= b.qn ? dy : 0.0f;  // two selects (no && and no bool arithmetic): gcc vectorises them
  return vs <= b.qp ? t : 0.0f;
}

// Per-element factor of dstep: Qn if v/s <= Qn; Qp if v/s >= Qp; round(v/s) - v/s otherwise.
OQ_HD float lsq_dstep_local(float v, float s, LsqBounds b) {
  float vs = v / s;
  float middle = round_half_even(vs) - vs;
  return vs <= b.qn ? b.qn : (vs >= b.qp ? b.qp : middle);
}

}  // namespace onnxqat
