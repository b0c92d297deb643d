// Elementwise math of the quantizer ops (../../../shared/reference/quantizer-math.md), shared by the CPU and CUDA
// kernels. Every function evaluates in float32 in the same order as onnxqat/ops/reference.py, so results equal
// numpy's bit for bit (tanh included: tanh_f32 below). Compile without -ffast-math and without FMA contraction.
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
// N2D2's SAT cell QuantMode=FullRange (quantized) and QuantMode=Asymmetric (quantized / ApplyQuantization=0).
constexpr int64_t kSatModeFullRange = 3;
constexpr int64_t kSatModeAsymmetric = 4;
constexpr int64_t kSatModeAsymmetricClamp = 5;

// ApplyScaling's variance from exact integer sums of the level indices up to this R (16 bits): the int64 sums of
// j^2 cannot overflow below 2^31 elements. Above it (and in clamp mode), shifted double sums of the levels.
constexpr float kSatExactVarianceMaxRange = 65535.0f;

OQ_HD bool sat_weight_index_sums(int64_t mode, float r) {
  return mode != kSatModeClamp && mode != kSatModeAsymmetricClamp && r <= kSatExactVarianceMaxRange;
}

// Levels 2 j / R - 1 with j in [0, R] (DoReFa, full range); else j / floor(R/2) (symmetric, asymmetric).
OQ_HD bool sat_weight_dorefa_levels(int64_t mode) { return mode == kSatModeDorefa || mode == kSatModeFullRange; }

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

// onnxqat's float32 tanh, defined by onnxqat/ops/reference.py `tanh_f32`: the same IEEE float32 operations in the
// same order on the host and the device (no FMA contraction: -ffp-contract=off, nvcc -fmad=false), so the CPU and
// CUDA kernels equal numpy bit for bit. At most 1.82 ulp from the exact tanh on every float32, increasing and odd
// (so max|tanh W| = tanh(max|W|)). Branch-free (both halves computed, one selected): gcc vectorises it.
//   |x| < 0.55: x + x^3 P(x^2), P a degree-4 minimax fit (Estrin: short dependency chains);
//   else 1 - 2 / (e^{2|x|} + 1), e^y = 2^k e^r with k = round(y / ln 2), r by a two-constant (Cody-Waite) reduction,
//   e^r = 1 + r + r^2 Q(r) (degree-6 minimax); |x| is clamped to 44 (tanh is 1.0f from |x| ~ 9; the clamp keeps
//   e^{2|x|} finite for sech2_f32). NaN stays NaN.
constexpr float kTanhSwitch = 0x1.19999ap-1f;  // 0.55: below, the polynomial; from it on, the exp form
constexpr float kTanhClamp = 44.0f;  // e^88 < FLT_MAX; sech^2(44) ~ 3e-38, the smallest normal float32 is 1.2e-38

// tanh's polynomial half on ax = |x| < kTanhSwitch: ax + ax^3 P(ax^2), P a degree-4 minimax fit (Estrin).
OQ_HD float tanh_poly(float ax) {
  const float z = ax * ax;
  const float z2 = z * z;
  const float p = (-0x1.55554ap-2f + 0x1.110d26p-3f * z) + z2 * ((-0x1.b9287ap-5f + 0x1.593d08p-6f * z) + z2 * -0x1.9b304cp-8f);
  return ax + (ax * z) * p;
}

// tanh_f32 for |x| < kTanhSwitch (the same bits as tanh_f32 there, at a third of the cost).
OQ_HD float tanh_f32_small(float x) { return std::copysign(tanh_poly(std::fabs(x)), x); }

// e^y for y = 2|x| in [0, 88]: 2^k e^r, k = round(y / ln 2), r by a two-constant (Cody-Waite) reduction.
OQ_HD float exp_f32(float y) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: (v + shifter) - shifter rounds v to an integer
  const float kf = (y * 0x1.715476p+0f + shifter) - shifter;
  const float r = (y - kf * 0x1.62e400p-1f) - kf * 0x1.7f7d1cp-20f;  // ln 2 = hi + lo, k * hi exact for k <= 127
  const float r2 = r * r;
  const float r4 = r2 * r2;
  const float q = ((1.0f + r) + r2 * (0x1.fffffap-2f + 0x1.5553f0p-3f * r)) +
                  r4 * ((0x1.5558e0p-5f + 0x1.127b12p-7f * r) + r2 * 0x1.6aab3cp-10f);
  const int32_t ebits = (static_cast<int32_t>(kf) + 127) << 23;  // 2^k
#if defined(__CUDA_ARCH__)
  const float two_k = __int_as_float(ebits);
#else
  float two_k;
  std::memcpy(&two_k, &ebits, sizeof two_k);
#endif
  return q * two_k;
}

// 1 - tanh on the exp half: 2 / (e^{2|x|} + 1), exact to a few ulp where 1 - tanh_f32 would cancel.
OQ_HD float tanh_complement(float ax) {
  const float e = exp_f32(2.0f * (ax < kTanhClamp ? ax : kTanhClamp));
  return 2.0f / (e + 1.0f);
}

OQ_HD float tanh_f32(float x) {
  const float ax = std::fabs(x);
  const float small = tanh_poly(ax);
  const float large = 1.0f - tanh_complement(ax);
  const float t = ax < kTanhSwitch ? small : large;
  const float res = std::copysign(t, x);
  return x != x ? x : res;
}

// tanh'(x) = 1 - tanh(x)^2 = sech^2(x): 1 - t^2 on the polynomial half (t <= 0.5: no cancellation); on the exp half
// u (2 - u) with u = 1 - tanh, which keeps its precision where 1 - t^2 cancels (6 % off at |x| = 8, 0 from |x| ~ 9;
// N2D2 uses 1 / cosh^2); 0 beyond the clamp (below float32's normal range). Same operations on host and device.
OQ_HD float sech2_f32(float x) {
  const float ax = std::fabs(x);
  const float t = tanh_poly(ax);
  const float near = 1.0f - t * t;
  const float u = tanh_complement(ax);
  const float far = ax < kTanhClamp ? u * (2.0f - u) : 0.0f;
  const float res = ax < kTanhSwitch ? near : far;
  return x != x ? x : res;
}

// tanh_f32(x), and sech2_f32(x) into *s2, from one exponential: the same bits as the two functions.
OQ_HD float tanh_sech2(float x, float* s2) {
  const float ax = std::fabs(x);
  const float p = tanh_poly(ax);
  const float u = tanh_complement(ax);
  const float far = ax < kTanhClamp ? u * (2.0f - u) : 0.0f;
  const bool small = ax < kTanhSwitch;
  const float res = std::copysign(small ? p : 1.0f - u, x);
  *s2 = x != x ? x : (small ? 1.0f - p * p : far);
  return x != x ? x : res;
}

// sech2_f32 for |x| < kTanhSwitch (the same bits there, without the exp half).
OQ_HD float sech2_f32_small(float x) {
  const float t = tanh_poly(std::fabs(x));
  return 1.0f - t * t;
}

// ---- SAT weights: tn = tanh(W) / max|tanh(W)| -> unscaled quantized weight.
struct SatWeightParams {
  float r;      // range R
  float half;   // floor(R/2) (symmetric and asymmetric modes)
  int64_t mode;
};

// Full range: u = (tn + 1) / 2 stretched to (1 + 0.9998/R) u - 0.4999/R, so that the end levels 0 and R get bins as
// wide as the others (N2D2 quantize_weight_fullrange_propagate).
OQ_HD float sat_fullrange_u(float tn, float r) { return (1.0f + 0.9998f / r) * ((tn + 1.0f) * 0.5f) - 0.4999f / r; }

// Asymmetric: tn shifted to (1 + 1/(2h)) tn - 1/(2h), whose rounding gives 2h + 2 levels j / h, j in [-h - 1, h]
// (N2D2 quantize_weight_asymrange_propagate; ApplyQuantization=0: the shifted value itself).
OQ_HD float sat_asym_q(float tn, float half) {
  return (1.0f + 1.0f / (2.0f * half)) * tn - 1.0f / (2.0f * half);
}

// d level / d tn of the modes that stretch tn: N2D2 multiplies its weight gradient by it.
OQ_HD float sat_weight_grad_gain(const SatWeightParams& p) {
  if (p.mode == kSatModeFullRange) return 1.0f + 0.9998f / p.r;
  if (p.mode == kSatModeAsymmetric || p.mode == kSatModeAsymmetricClamp) return 1.0f + 1.0f / (2.0f * p.half);
  return 1.0f;
}

// The level index j (an integer as float): DoReFa round(R (tn + 1) / 2) in [0, R], symmetric round(floor(R/2) tn) in
// [-floor(R/2), floor(R/2)]; the level is then 2 j / R - 1 (DoReFa) or j / floor(R/2) (symmetric), evaluated as
// sat_weight_level does. ApplyScaling's variance is taken over the indices (exact integer sums).
OQ_HD float sat_weight_index(float tn, const SatWeightParams& p) {
  if (p.mode == kSatModeDorefa) return round_half_even(p.r * ((tn + 1.0f) * 0.5f));
  if (p.mode == kSatModeFullRange) return round_half_even(p.r * sat_fullrange_u(tn, p.r));
  if (p.mode == kSatModeAsymmetric) return round_half_even(p.half * sat_asym_q(tn, p.half));
  return round_half_even(p.half * tn);
}

OQ_HD float sat_weight_level(float tn, const SatWeightParams& p) {
  if (sat_weight_dorefa_levels(p.mode)) return 2.0f * (sat_weight_index(tn, p) / p.r) - 1.0f;
  if (p.mode == kSatModeSymmetric || p.mode == kSatModeAsymmetric) return sat_weight_index(tn, p) / p.half;
  if (p.mode == kSatModeAsymmetricClamp) return sat_asym_q(tn, p.half);
  return tn;  // clamp
}

// The derivative factor dWq/dW = sech^2(W) / (M * S), ms = M * S (float32 product; divided by sat_weight_grad_gain in
// the modes that stretch tn, exactly M * S in the others), from the weight w: SatWeightQuant's optional second output,
// which SatWeightQuantGrad multiplies by dWq.
OQ_HD float sat_weight_grad_factor(float w, float ms) { return sech2_f32(w) / ms; }

// dW = dWq * (sech^2(W) / (M * S)).
OQ_HD float sat_weight_grad(float dy, float w, float ms) { return dy * sat_weight_grad_factor(w, ms); }

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

// dv = dy strictly inside (Qn, Qp), 0 at and beyond the bounds: the LSQ paper's Eq. 3 and N2D2 (CPU and CUDA), and
// the same partition as lsq_dstep_local (a value at a bound moves the step, not itself)
OQ_HD float lsq_dv(float dy, float v, float s, LsqBounds b) {
  float vs = v / s;
  float t = vs > b.qn ? dy : 0.0f;  // two selects (no && and no bool arithmetic): gcc vectorises them
  return vs < b.qp ? t : 0.0f;
}

// Per-element factor of dstep: Qn if v/s <= Qn; Qp if v/s >= Qp; round(v/s) - v/s otherwise.
OQ_HD float lsq_dstep_local(float v, float s, LsqBounds b) {
  float vs = v / s;
  float middle = round_half_even(vs) - vs;
  return vs <= b.qn ? b.qn : (vs >= b.qp ? b.qp : middle);
}

}  // namespace onnxqat
