// The elementwise hot loops of the CPU kernels, as plain functions over restrict pointers so that gcc vectorises
// each of them (check: -fopt-info-vec on cpu/loops.cc). Arithmetic: common/quant_math.h, exactly numpy's order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace onnxqat {
namespace cpu {

// SAT weights (tanh: common/quant_math.h tanh_f32; M = tanh(max|W|) known beforehand; ms = M * S).
// Level sums for ApplyScaling's variance: DoReFa and symmetric sum the level indices j (exact integers) when
// R <= 65535 (sat_weight_index_sums), else and in clamp mode the levels shifted by `shift` (double).
struct LevelSums {
  int64_t j1 = 0;  // sum of j
  int64_t j2 = 0;  // sum of j^2
  double d1 = 0;   // sum of (level - shift)
  double d2 = 0;   // sum of (level - shift)^2
};
// t = tanh(w) (t may be null: not kept), s2 = sech^2(w) when s2 is not null; *acc += the level sums of t / m.
void sat_weight_tanh_sums(int64_t mode, const float* w, float* t, float* s2, size_t n, float m, float r, float half,
                          double shift, LevelSums* acc);
// Without scaling (S = 1): y = level(tanh(w) / m); d (when not null) = sech^2(w) / ms.
void sat_weight_forward_loop(int64_t mode, const float* w, float* y, float* d, size_t n, float m, float ms, float r,
                             float half);
// With scaling, from t = tanh(w) held in y and sech^2(w) in d (when not null, which becomes sech^2 / ms):
// y = level(t / m) / s.
void sat_weight_output_loop(int64_t mode, float* y, float* d, size_t n, float m, float s, float ms, float r,
                            float half);
// dw = g * (sech^2 / ms) from sech^2(w) held in dw.
void sat_weight_grad_from_sech2_loop(const float* g, float* dw, size_t n, float ms);
// dw = g * (sech^2(w) / ms)
void sat_weight_grad_loop(const float* g, const float* w, float* dw, size_t n, float ms);
// dw = g * ((1 - t^2) / ms), dw holding t on entry

// out = a * b
void mul_loop(const float* a, const float* b, float* out, size_t n);

// SAT activations.
void sat_act_forward_loop(const float* x, float* y, size_t n, float a, float r);
void sat_act_dx_loop(const float* g, const float* x, float* dx, size_t n, float a);
// dx (when not null) and sum of dy * dalpha-factor.
double sat_act_grad_loop(const float* g, const float* x, float* dx, size_t n, float a, float r);

// LSQ.
void lsq_forward_loop(const float* v, float* y, size_t n, float s, float qn, float qp);
void lsq_dv_loop(const float* g, const float* v, float* dv, size_t n, float s, float qn, float qp);
// dv (when not null) and sum of dy * dstep-factor (without g).
double lsq_grad_loop(const float* g, const float* v, float* dv, size_t n, float s, float qn, float qp);

// LSQ with the channel axis last (v viewed as [rows, C], step[c] per column).
void lsq_forward_rows(const float* v, float* y, size_t rows, size_t C, const float* step, float qn, float qp);
// dv (when not null); acc[c] += sum over the rows of dy * dstep-factor (when acc is not null).
void lsq_grad_rows(const float* g, const float* v, float* dv, size_t rows, size_t C, const float* step, float qn,
                   float qp, double* acc);

// max |x|
float max_abs_loop(const float* x, size_t n);

}  // namespace cpu
}  // namespace onnxqat
