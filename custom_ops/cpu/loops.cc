#include "cpu/loops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "common/quant_math.h"
#include "cpu/reduce.h"

namespace onnxqat {
namespace cpu {

#define OQ_R __restrict__

// Every loop is compiled twice, for AVX2 (8 floats a vector) and for the baseline (SSE2), and the loader picks one
// (GNU ifunc). Only the vector width differs: no FMA, same IEEE operations, same results.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(ONNXQAT_NO_CLONES)
#define OQ_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OQ_CLONES
#endif

// t = tanh(w) over one block (len <= kBlock), correctly rounded (bit-equal to tanh_f32). Where the CPU has AVX2 and
// FMA: tanh_f32_fast, then tanh_f32 for the few elements (about 1 in 2000) whose rounding it leaves open.
namespace {

OQ_CLONES void tanh_block_plain(const float* OQ_R w, float* OQ_R t, size_t len) {
  for (size_t i = 0; i < len; ++i) t[i] = tanh_f32(w[i]);
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(ONNXQAT_NO_CLONES)
__attribute__((target("avx2,fma"))) void tanh_block_fma(const float* OQ_R w, float* OQ_R t, size_t len) {
  int32_t amb[kBlock];
  for (size_t i = 0; i < len; ++i) t[i] = tanh_f32_fast(w[i], &amb[i]);
  int32_t any = 0;
  for (size_t i = 0; i < len; ++i) any |= amb[i];
  if (any == 0) return;
  for (size_t i = 0; i < len; ++i)
    if (amb[i]) t[i] = tanh_f32(w[i]);
}

using TanhBlock = void (*)(const float*, float*, size_t);
TanhBlock pick_tanh_block() {
  if (const char* e = std::getenv("ONNXQAT_PLAIN_TANH"); e != nullptr && e[0] == '1') return tanh_block_plain;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? tanh_block_fma : tanh_block_plain;
}
const TanhBlock kTanhBlock = pick_tanh_block();
#else
constexpr void (*kTanhBlock)(const float*, float*, size_t) = tanh_block_plain;
#endif

inline void tanh_block(const float* w, float* t, size_t len) { kTanhBlock(w, t, len); }

}  // namespace

void tanh_loop(const float* w, float* t, size_t n) {
  for (size_t k0 = 0; k0 < n; k0 += kBlock) tanh_block(w + k0, t + k0, std::min(kBlock, n - k0));
}

OQ_CLONES float max_abs_loop(const float* OQ_R x, size_t n) { return max_abs(x, n); }

namespace {

// sat_weight_level (common/quant_math.h) with the mode a template argument: one branch-free body per mode, which
// gcc vectorises; the same operations in the same order.
template <int64_t MODE>
inline float level(float tn, float r, float half) {
  if constexpr (MODE == kSatModeDorefa) {
    float u = (tn + 1.0f) * 0.5f;
    float uq = round_half_even(r * u) / r;
    return 2.0f * uq - 1.0f;
  } else if constexpr (MODE == kSatModeSymmetric) {
    return round_half_even(half * tn) / half;
  } else {
    (void)r;
    (void)half;
    return tn;
  }
}

template <int64_t MODE>
__attribute__((always_inline)) inline double level_sum(const float* OQ_R t, size_t n, float m, float r, float half) {
  float buf[kBlock];
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R tb = t + k0;
    for (size_t i = 0; i < len; ++i) buf[i] = level<MODE>(tb[i] / m, r, half);
    sum += lane_sum(len, [&](size_t i) { return buf[i]; });
  }
  return sum;
}

template <int64_t MODE>
__attribute__((always_inline)) inline double level_sqdev(const float* OQ_R t, size_t n, float m, float r, float half, double mean) {
  float buf[kBlock];
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R tb = t + k0;
    for (size_t i = 0; i < len; ++i) buf[i] = level<MODE>(tb[i] / m, r, half);
    sum += lane_sum(len, [&](size_t i) {
      double d = static_cast<double>(buf[i]) - mean;
      return d * d;
    });
  }
  return sum;
}

}  // namespace

OQ_CLONES double sat_weight_level_sum(int64_t mode, const float* t, size_t n, float m, float r, float half) {
  if (mode == kSatModeDorefa) return level_sum<kSatModeDorefa>(t, n, m, r, half);
  if (mode == kSatModeSymmetric) return level_sum<kSatModeSymmetric>(t, n, m, r, half);
  return level_sum<kSatModeClamp>(t, n, m, r, half);
}

OQ_CLONES double sat_weight_level_sqdev(int64_t mode, const float* t, size_t n, float m, float r, float half, double mean) {
  if (mode == kSatModeDorefa) return level_sqdev<kSatModeDorefa>(t, n, m, r, half, mean);
  if (mode == kSatModeSymmetric) return level_sqdev<kSatModeSymmetric>(t, n, m, r, half, mean);
  return level_sqdev<kSatModeClamp>(t, n, m, r, half, mean);
}

OQ_CLONES void sat_weight_grad_loop(const float* OQ_R g, float* OQ_R dw, size_t n, float ms) {
  for (size_t i = 0; i < n; ++i) dw[i] = sat_weight_grad(g[i], dw[i], ms);
}

namespace {

// always_inline: inlined into each target clone of its caller (else compiled for the baseline target only).
template <int64_t MODE, bool FACTOR>
__attribute__((always_inline)) inline void forward_fused(const float* OQ_R w, float* OQ_R y, float* OQ_R d, size_t n, float m, float r, float half) {
  float tb[kBlock];
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R wb = w + k0;
    tanh_block(wb, tb, len);
    float* OQ_R yb = y + k0;
    for (size_t i = 0; i < len; ++i) yb[i] = level<MODE>(tb[i] / m, r, half);
    if constexpr (FACTOR) {
      float* OQ_R db = d + k0;
      for (size_t i = 0; i < len; ++i) db[i] = sat_weight_grad_factor(tb[i], m);
    }
  }
}

template <int64_t MODE>
__attribute__((always_inline)) inline double levels_fused(const float* OQ_R w, float* OQ_R y, float* OQ_R t, size_t n, float m, float r, float half) {
  float tb[kBlock];
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R wb = w + k0;
    tanh_block(wb, tb, len);
    float* OQ_R yb = y + k0;
    for (size_t i = 0; i < len; ++i) yb[i] = level<MODE>(tb[i] / m, r, half);
    if (t != nullptr) {
      float* OQ_R ob = t + k0;
      for (size_t i = 0; i < len; ++i) ob[i] = tb[i];
    }
    sum += lane_sum(len, [&](size_t i) { return yb[i]; });
  }
  return sum;
}

}  // namespace

OQ_CLONES void sat_weight_forward_loop(int64_t mode, const float* w, float* y, float* d, size_t n, float m, float r,
                                       float half) {
  if (d != nullptr) {
    if (mode == kSatModeDorefa) return forward_fused<kSatModeDorefa, true>(w, y, d, n, m, r, half);
    if (mode == kSatModeSymmetric) return forward_fused<kSatModeSymmetric, true>(w, y, d, n, m, r, half);
    return forward_fused<kSatModeClamp, true>(w, y, d, n, m, r, half);
  }
  if (mode == kSatModeDorefa) return forward_fused<kSatModeDorefa, false>(w, y, d, n, m, r, half);
  if (mode == kSatModeSymmetric) return forward_fused<kSatModeSymmetric, false>(w, y, d, n, m, r, half);
  return forward_fused<kSatModeClamp, false>(w, y, d, n, m, r, half);
}

OQ_CLONES double sat_weight_levels_loop(int64_t mode, const float* w, float* y, float* t, size_t n, float m, float r,
                                        float half) {
  if (mode == kSatModeDorefa) return levels_fused<kSatModeDorefa>(w, y, t, n, m, r, half);
  if (mode == kSatModeSymmetric) return levels_fused<kSatModeSymmetric>(w, y, t, n, m, r, half);
  return levels_fused<kSatModeClamp>(w, y, t, n, m, r, half);
}

OQ_CLONES double sqdev_loop(const float* OQ_R y, size_t n, double mean) {
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R yb = y + k0;
    sum += lane_sum(len, [&](size_t i) {
      double d = static_cast<double>(yb[i]) - mean;
      return d * d;
    });
  }
  return sum;
}

OQ_CLONES void sat_weight_scale_loop(float* OQ_R y, float* OQ_R td, size_t n, float s, float ms) {
  for (size_t i = 0; i < n; ++i) y[i] = y[i] / s;
  if (td != nullptr)
    for (size_t i = 0; i < n; ++i) td[i] = sat_weight_grad_factor(td[i], ms);
}

OQ_CLONES void mul_loop(const float* OQ_R a, const float* OQ_R b, float* OQ_R out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

OQ_CLONES void sat_act_forward_loop(const float* OQ_R x, float* OQ_R y, size_t n, float a, float r) {
  for (size_t i = 0; i < n; ++i) y[i] = sat_act_forward(x[i], a, r);
}

OQ_CLONES void sat_act_dx_loop(const float* OQ_R g, const float* OQ_R x, float* OQ_R dx, size_t n, float a) {
  for (size_t i = 0; i < n; ++i) dx[i] = sat_act_dx(g[i], x[i], a);
}

OQ_CLONES double sat_act_grad_loop(const float* OQ_R g, const float* OQ_R x, float* OQ_R dx, size_t n, float a, float r) {
  float local[kBlock];
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R xb = x + k0;
    const float* OQ_R gb = g + k0;
    if (dx != nullptr) {
      float* OQ_R dxb = dx + k0;
      for (size_t i = 0; i < len; ++i) {
        dxb[i] = sat_act_dx(gb[i], xb[i], a);
        local[i] = sat_act_dalpha_local(xb[i], a, r);
      }
    } else {
      for (size_t i = 0; i < len; ++i) local[i] = sat_act_dalpha_local(xb[i], a, r);
    }
    sum += dot_lanes(gb, local, len);
  }
  return sum;
}

OQ_CLONES void lsq_forward_loop(const float* OQ_R v, float* OQ_R y, size_t n, float s, float qn, float qp) {
  const LsqBounds b{qn, qp};
  for (size_t i = 0; i < n; ++i) y[i] = lsq_forward(v[i], s, b);
}

OQ_CLONES void lsq_dv_loop(const float* OQ_R g, const float* OQ_R v, float* OQ_R dv, size_t n, float s, float qn, float qp) {
  const LsqBounds b{qn, qp};
  for (size_t i = 0; i < n; ++i) dv[i] = lsq_dv(g[i], v[i], s, b);
}

OQ_CLONES double lsq_grad_loop(const float* OQ_R g, const float* OQ_R v, float* OQ_R dv, size_t n, float s, float qn,
                     float qp) {
  const LsqBounds b{qn, qp};
  float local[kBlock];
  double sum = 0;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    const float* OQ_R vb = v + k0;
    const float* OQ_R gb = g + k0;
    if (dv != nullptr) {
      float* OQ_R dvb = dv + k0;
      for (size_t i = 0; i < len; ++i) {  // one division v/s for both (common subexpression)
        dvb[i] = lsq_dv(gb[i], vb[i], s, b);
        local[i] = lsq_dstep_local(vb[i], s, b);
      }
    } else {
      for (size_t i = 0; i < len; ++i) local[i] = lsq_dstep_local(vb[i], s, b);
    }
    sum += dot_lanes(gb, local, len);
  }
  return sum;
}

OQ_CLONES void lsq_forward_rows(const float* OQ_R v, float* OQ_R y, size_t rows, size_t C,
                                const float* OQ_R step, float qn, float qp) {
  const LsqBounds b{qn, qp};
  for (size_t r = 0; r < rows; ++r) {
    const float* OQ_R vr = v + r * C;
    float* OQ_R yr = y + r * C;
    for (size_t c = 0; c < C; ++c) yr[c] = lsq_forward(vr[c], step[c], b);
  }
}

OQ_CLONES void lsq_grad_rows(const float* OQ_R g, const float* OQ_R v, float* OQ_R dv, size_t rows, size_t C,
                             const float* OQ_R step, float qn, float qp, double* OQ_R acc) {
  const LsqBounds b{qn, qp};
  for (size_t r = 0; r < rows; ++r) {
    const float* OQ_R vr = v + r * C;
    const float* OQ_R gr = g + r * C;
    if (dv != nullptr) {
      float* OQ_R dvr = dv + r * C;
      for (size_t c = 0; c < C; ++c) dvr[c] = lsq_dv(gr[c], vr[c], step[c], b);
    }
    if (acc != nullptr) {
      for (size_t c = 0; c < C; ++c)
        acc[c] += static_cast<double>(gr[c]) * static_cast<double>(lsq_dstep_local(vr[c], step[c], b));
    }
  }
}

}  // namespace cpu
}  // namespace onnxqat
