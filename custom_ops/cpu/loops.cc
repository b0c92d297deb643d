#include "cpu/loops.h"

#include <algorithm>
#include <cmath>

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

OQ_CLONES void tanh_loop(const float* OQ_R w, float* OQ_R t, size_t n) {
  for (size_t i = 0; i < n; ++i) t[i] = tanh_f32(w[i]);
}

OQ_CLONES float tanh_max_loop(const float* OQ_R w, float* OQ_R t, size_t n) {
  // t = tanh(w) and max|t| in one pass, blockwise: the tanh loop vectorises, the max runs over a cached block
  float m = 0.0f;
  for (size_t k0 = 0; k0 < n; k0 += kBlock) {
    const size_t len = std::min(kBlock, n - k0);
    float* OQ_R tb = t + k0;
    const float* OQ_R wb = w + k0;
    for (size_t i = 0; i < len; ++i) tb[i] = tanh_f32(wb[i]);
    const float bm = max_abs(tb, len);
    m = bm > m ? bm : m;
  }
  return m;
}

OQ_CLONES float max_abs_loop(const float* OQ_R x, size_t n) { return max_abs(x, n); }

namespace {

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
void level_loop(float* OQ_R y, size_t n, float m, float r, float half, float s) {
  if (s == 1.0f) {
    for (size_t i = 0; i < n; ++i) y[i] = level<MODE>(y[i] / m, r, half);
  } else {
    for (size_t i = 0; i < n; ++i) y[i] = level<MODE>(y[i] / m, r, half) / s;
  }
}

template <int64_t MODE>
double level_sum(const float* OQ_R t, size_t n, float m, float r, float half) {
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
double level_sqdev(const float* OQ_R t, size_t n, float m, float r, float half, double mean) {
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

OQ_CLONES void sat_weight_level_loop(int64_t mode, float* y, size_t n, float m, float r, float half, float s) {
  if (mode == kSatModeDorefa)
    level_loop<kSatModeDorefa>(y, n, m, r, half, s);
  else if (mode == kSatModeSymmetric)
    level_loop<kSatModeSymmetric>(y, n, m, r, half, s);
  else
    level_loop<kSatModeClamp>(y, n, m, r, half, s);
}

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
