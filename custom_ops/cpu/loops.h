// The elementwise hot loops of the CPU kernels, as plain functions over restrict pointers so that gcc vectorises
// each of them (check: -fopt-info-vec on cpu/loops.cc). Arithmetic: common/quant_math.h, exactly numpy's order.
#pragma once

#include <cstddef>
#include <cstdint>

namespace onnxqat {
namespace cpu {

// SAT weights: t = tanh(W) first, then in-place passes over the same buffer.
void tanh_loop(const float* w, float* t, size_t n);
// sum of level(t / m), and of (level(t / m) - mean)^2 (t holds tanh(W))
double sat_weight_level_sum(int64_t mode, const float* t, size_t n, float m, float r, float half);
double sat_weight_level_sqdev(int64_t mode, const float* t, size_t n, float m, float r, float half, double mean);
// dw[i] = g[i] * ((1 - t^2) / ms), in place (dw holds t = tanh(W) on entry)
void sat_weight_grad_loop(const float* g, float* dw, size_t n, float ms);
// Fused SatWeightQuant passes (M = tanh(max|W|) known beforehand, so tanh is evaluated once per element):
// without scaling (S = 1): y = level(tanh(w) / m); d (when not null) = (1 - t^2) / m.
void sat_weight_forward_loop(int64_t mode, const float* w, float* y, float* d, size_t n, float m, float r, float half);
// with scaling: y = level(tanh(w) / m) (unscaled); t (when not null) = tanh(w); returns the sum of the levels, in
// the order of sat_weight_level_sum.
double sat_weight_levels_loop(int64_t mode, const float* w, float* y, float* t, size_t n, float m, float r,
                              float half);
// sum of (y - mean)^2 in the order of sat_weight_level_sqdev (y holds the levels)
double sqdev_loop(const float* y, size_t n, double mean);
// y /= s; td (when not null) = (1 - td^2) / ms in place (td holds t on entry)
void sat_weight_scale_loop(float* y, float* td, size_t n, float s, float ms);
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
