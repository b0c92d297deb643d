#include "cpu/loops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

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

OQ_CLONES float max_abs_loop(const float* OQ_R x, size_t n) { return max_abs(x, n); }

namespace {

// sat_weight_index / sat_weight_level (common/quant_math.h) with the mode a template argument: one branch-free body
// per mode, which gcc vectorises; the same operations in the same order. DoReFa rounds v = R (tn + 1) / 2 >= 0
// (|tn| <= 1): round_half_even without its sign handling (NaN stays NaN).
template <int64_t MODE>
inline float index(float tn, float r, float half) {
  if constexpr (MODE == kSatModeDorefa) {
    (void)half;
    const float two23 = 8388608.0f;
    const float v = r * ((tn + 1.0f) * 0.5f);
    const float rounded = (v + two23) - two23;
    return v < two23 ? rounded : v;
  } else if constexpr (MODE == kSatModeFullRange) {
    (void)half;
    return round_half_even(r * sat_fullrange_u(tn, r));
  } else if constexpr (MODE == kSatModeAsymmetric) {
    (void)r;
    return round_half_even(half * sat_asym_q(tn, half));
  } else {
    (void)r;
    return round_half_even(half * tn);
  }
}

template <int64_t MODE>
inline float level(float tn, float r, float half) {
  if constexpr (MODE == kSatModeDorefa || MODE == kSatModeFullRange) {
    return 2.0f * (index<MODE>(tn, r, half) / r) - 1.0f;
  } else if constexpr (MODE == kSatModeSymmetric || MODE == kSatModeAsymmetric) {
    return index<MODE>(tn, r, half) / half;
  } else if constexpr (MODE == kSatModeAsymmetricClamp) {
    (void)r;
    return sat_asym_q(tn, half);
  } else {
    (void)r;
    (void)half;
    return tn;
  }
}

// t = tanh_f32(w) over one block (len <= kBlock). Where every |w| of the block lies below the switch point (trained
// weights mostly do: |W| ~ 0.01-0.3), the polynomial alone: the same bits at a third of the cost.
// always_inline: inlined into each target clone of its caller (else compiled for the baseline target only).
__attribute__((always_inline)) inline void tanh_block(const float* OQ_R w, float* OQ_R t, size_t len) {
  if (max_abs(w, len) < kTanhSwitch) {
    for (size_t i = 0; i < len; ++i) t[i] = tanh_f32_small(w[i]);
  } else {
    for (size_t i = 0; i < len; ++i) t[i] = tanh_f32(w[i]);
  }
}

// t = tanh_f32(w) and s = sech2_f32(w) / ms over one block from one exponential per element (ms = 1: sech^2 itself);
// blocks below kTanhSwitch (trained weights) take the polynomial half alone.
__attribute__((always_inline)) inline void tanh_factor_block(const float* OQ_R w, float* OQ_R t, float* OQ_R s,
                                                             size_t len, float ms) {
  if (max_abs(w, len) < kTanhSwitch) {
    for (size_t i = 0; i < len; ++i) {
      t[i] = tanh_f32_small(w[i]);
      s[i] = (1.0f - t[i] * t[i]) / ms;
    }
  } else {
    for (size_t i = 0; i < len; ++i) {
      float s2;
      t[i] = tanh_sech2(w[i], &s2);
      s[i] = s2 / ms;
    }
  }
}

template <int64_t MODE, bool INDEX_SUMS>
__attribute__((always_inline)) inline void tanh_sums(const float* OQ_R w, float* OQ_R t, float* OQ_R s2, size_t n,
                                                     float m, float r, float half, double shift, LevelSums* acc) {
  float vb[kBlock];
  float local[kBlock];
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    float* OQ_R tb = t != nullptr ? t + k0 : local;
    if (s2 != nullptr) {
      tanh_factor_block(w + k0, tb, s2 + k0, len, 1.0f);
    } else {
      tanh_block(w + k0, tb, len);
    }
    for (size_t i = 0; i < len; ++i) {
      if constexpr (INDEX_SUMS) {
        vb[i] = index<MODE>(tb[i] / m, r, half);
      } else {
        vb[i] = level<MODE>(tb[i] / m, r, half);
      }
    }
    if constexpr (INDEX_SUMS) {
      int_sums(vb, len, &acc->j1, &acc->j2);
    } else {
      shifted_sums(vb, len, shift, &acc->d1, &acc->d2);
    }
  }
}

template <int64_t MODE, bool FACTOR>
__attribute__((always_inline)) inline void forward(const float* OQ_R w, float* OQ_R y, float* OQ_R d, size_t n, float m,
                                                   float ms, float r, float half) {
  float tb[kBlock];
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    if constexpr (FACTOR) {
      tanh_factor_block(w + k0, tb, d + k0, len, ms);
    } else {
      tanh_block(w + k0, tb, len);
    }
    float* OQ_R yb = y + k0;
    for (size_t i = 0; i < len; ++i) yb[i] = level<MODE>(tb[i] / m, r, half);
  }
}

// t held in y; sech^2 in d (FACTOR), which becomes sech^2 / ms.
template <int64_t MODE, bool FACTOR>
__attribute__((always_inline)) inline void output(float* OQ_R y, float* OQ_R d, size_t n, float m, float s, float ms,
                                                  float r, float half) {
  if constexpr (FACTOR) {
    for (size_t i = 0; i < n; ++i) {
      y[i] = level<MODE>(y[i] / m, r, half) / s;
      d[i] = d[i] / ms;
    }
  } else {
    (void)ms;
    for (size_t i = 0; i < n; ++i) y[i] = level<MODE>(y[i] / m, r, half) / s;
  }
}

}  // namespace

// Calls f<MODE, FLAG>(...) for the run-time mode and flag: one instantiation (vectorised for its case) each.
#define OQ_MODE_ONE(mode, flag, f, ...)                                                                  \
  do {                                                                                                   \
    if ((mode) == kSatModeDorefa) return f<kSatModeDorefa, flag>(__VA_ARGS__);                          \
    if ((mode) == kSatModeSymmetric) return f<kSatModeSymmetric, flag>(__VA_ARGS__);                    \
    if ((mode) == kSatModeFullRange) return f<kSatModeFullRange, flag>(__VA_ARGS__);                    \
    if ((mode) == kSatModeAsymmetric) return f<kSatModeAsymmetric, flag>(__VA_ARGS__);                  \
    if ((mode) == kSatModeAsymmetricClamp) return f<kSatModeAsymmetricClamp, flag>(__VA_ARGS__);        \
    return f<kSatModeClamp, flag>(__VA_ARGS__);                                                         \
  } while (0)
#define OQ_MODE_FLAG(mode, flag, f, ...)           \
  do {                                             \
    if (flag) OQ_MODE_ONE(mode, true, f, __VA_ARGS__);  \
    OQ_MODE_ONE(mode, false, f, __VA_ARGS__);      \
  } while (0)

OQ_CLONES void sat_weight_tanh_sums(int64_t mode, const float* w, float* t, float* s2, size_t n, float m, float r,
                                    float half, double shift, LevelSums* acc) {
  OQ_MODE_FLAG(mode, sat_weight_index_sums(mode, r), tanh_sums, w, t, s2, n, m, r, half, shift, acc);
}

OQ_CLONES void sat_weight_forward_loop(int64_t mode, const float* w, float* y, float* d, size_t n, float m, float ms,
                                       float r, float half) {
  OQ_MODE_FLAG(mode, d != nullptr, forward, w, y, d, n, m, ms, r, half);
}

OQ_CLONES void sat_weight_output_loop(int64_t mode, float* y, float* d, size_t n, float m, float s, float ms, float r,
                                      float half) {
  OQ_MODE_FLAG(mode, d != nullptr, output, y, d, n, m, s, ms, r, half);
}

#undef OQ_MODE_FLAG

OQ_CLONES void sat_weight_grad_loop(const float* OQ_R g, const float* OQ_R w, float* OQ_R dw, size_t n, float ms) {
  float tb[kBlock];
  float fb[kBlock];
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    tanh_factor_block(w + k0, tb, fb, len, ms);
    const float* OQ_R gb = g + k0;
    float* OQ_R db = dw + k0;
    for (size_t i = 0; i < len; ++i) db[i] = gb[i] * fb[i];
  }
}

OQ_CLONES void sat_weight_grad_from_sech2_loop(const float* OQ_R g, float* OQ_R dw, size_t n, float ms) {
  for (size_t i = 0; i < n; ++i) dw[i] = g[i] * (dw[i] / ms);
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
