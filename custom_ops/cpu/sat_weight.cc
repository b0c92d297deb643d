// SatWeightQuant / SatWeightQuantGrad (SAT weight quantizer, N2D2 semantics; quantizer-math.md).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/op_inputs.h"
#include "common/quant_math.h"
#include "cpu/kernel_base.h"
#include "cpu/loops.h"

namespace onnxqat {
namespace cpu {
namespace {

struct SatParams {
  float r;
  float half;
  int64_t mode;
  int64_t fan_out;
};

SatParams read_params(const KernelBase& k, Ort::KernelContext& ctx, size_t first) {
  const SatWeightArgs a = read_sat_weight_args(k, ctx, first);
  return SatParams{a.r, std::floor(a.r / 2.0f), a.mode, a.fan_out};
}

// max|W| (NaN if some weight is NaN).
float max_abs_w(Ort::KernelContext& ctx, const float* w, size_t n) {
  const size_t tasks = num_chunks(n);
  std::vector<float> part(tasks, 0.0f);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
    part[c] = max_abs_loop(w + b, e - b);
  });
  float mx = 0.0f;
  for (float v : part) mx = (v > mx || v != v) ? v : mx;
  return mx;
}

// M = max|tanh W| = tanh(max|W|) (tanh_f32 is odd and increasing: the max pass needs no tanh); 1 when it is not
// > 0 (all weights 0, or a NaN weight): keeps t/M and dW finite, as the reference.
float max_tanh(float max_abs) {
  const float m = tanh_f32(max_abs);
  return m > 0.0f ? m : 1.0f;
}

bool scaled(const SatParams& p, size_t n) { return p.fan_out > 0 && n >= 2; }

// M * S is divided by it (1 except in the full-range and asymmetric modes: quant_math.h sat_weight_grad_gain).
float gain(const SatParams& p) { return sat_weight_grad_gain(SatWeightParams{p.r, p.half, p.mode}); }

// S = sqrt(fan_out * Var(Wq)) (Bessel) from the level sums, in the operations of reference.py sat_weight_scale:
// DoReFa and symmetric (R <= 65535) from the exact integer variance of the level indices, clamp (and R > 65535)
// from the shifted sums; 1 when it is not > 0 or a weight is NaN.
float scale_from(const std::vector<LevelSums>& part, size_t n, float max_abs, const SatParams& p) {
  if (max_abs != max_abs) return 1.0f;
  LevelSums t;
  for (const LevelSums& s : part) {
    t.j1 += s.j1;
    t.j2 += s.j2;
    t.d1 += s.d1;
    t.d2 += s.d2;
  }
  const double nd = static_cast<double>(n);
  double var;
  if (!sat_weight_index_sums(p.mode, p.r)) {
    var = (t.d2 - t.d1 * t.d1 / nd) / (nd - 1.0);
  } else {
    const __int128 num = static_cast<__int128>(n) * t.j2 - static_cast<__int128>(t.j1) * t.j1;
    const double var_j = static_cast<double>(num) / (nd * static_cast<double>(n - 1));
    const double r = p.r, half = p.half;
    var = sat_weight_dorefa_levels(p.mode) ? var_j * 4.0 / (r * r) : var_j / (half * half);
  }
  const float s = static_cast<float>(std::sqrt(static_cast<double>(p.fan_out) * var));
  return s > 0.0f ? s : 1.0f;
}

// ApplyScaling: t = tanh(W) into `t` (when not null) and sech^2(W) into `s2` (when not null) with the level sums (one
// exponential per element; the output pass reads them back), then S.
float tanh_and_scale(Ort::KernelContext& ctx, const float* w, float* t, float* s2, size_t n, float m, float max_abs,
                     const SatParams& p) {
  // shifted sums (clamp, large R): any level near the mean keeps the one-pass variance accurate
  const double shift = sat_weight_level(tanh_f32(w[0]) / m, SatWeightParams{p.r, p.half, p.mode});
  const size_t tasks = num_chunks(n);
  const size_t len = chunk_len(n);
  std::vector<LevelSums> part(tasks);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * len, e = std::min(n, b + len);
    sat_weight_tanh_sums(p.mode, w + b, t ? t + b : nullptr, s2 ? s2 + b : nullptr, e - b, m, p.r, p.half, shift,
                         &part[c]);
  });
  return scale_from(part, n, max_abs, p);
}

// Outputs: Wq, and optionally the derivative factor dWq/dW = sech^2(W) / (M * S) (schema.py), which the
// gradient definition hands to SatWeightQuantGrad so that the backward pass evaluates no tanh.
struct SatWeightKernel : StatusKernel<SatWeightKernel> {
  static constexpr const char* kName = "SatWeightQuant";
  static constexpr size_t kNumInputs = 4;
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // Wq, [dWq/dW]
  static constexpr size_t kNumRequiredOutputs = 1;
  // Only Wq's shape is inferred: ORT 1.19's ShapeInferContext_SetOutputTypeShape does not check the index against
  // the node's outputs (a node without the optional output would be written past its end); no input has index -1.
  static size_t ShapeSource(size_t k) { return k == 0 ? 0 : SIZE_MAX; }
  static ONNXTensorElementDataType InputType(size_t i) {
    return i >= 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit SatWeightKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn w = float_input(ctx, 0, "W");
    SatParams p = read_params(*this, ctx, 1);
    float* y = output(ctx, 0, w.shape);
    float* d = output(ctx, 1, w.shape);
    const size_t n = w.size;
    if (n == 0 || y == nullptr) return;
    const float mx = max_abs_w(ctx, w.data, n);
    const float m = max_tanh(mx);
    const size_t len = chunk_len(n);
    if (!scaled(p, n)) {  // S = 1: one pass
      parallel_for(ctx, num_chunks(n), [&](size_t c) {
        const size_t b = c * len, e = std::min(n, b + len);
        sat_weight_forward_loop(p.mode, w.data + b, y + b, d ? d + b : nullptr, e - b, m, m / gain(p), p.r, p.half);
      });
      return;
    }
    const float s = tanh_and_scale(ctx, w.data, y, d, n, m, mx, p);
    const float ms = (m * s) / gain(p);
    parallel_for(ctx, num_chunks(n), [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      sat_weight_output_loop(p.mode, y + b, d ? d + b : nullptr, e - b, m, s, ms, p.r, p.half);
    });
  }
};

// dW = dWq * dWq/dW. With the optional input 5 (the forward's second output) that is one product per element;
// without it the factor is computed here from W (tanh, M, S) as the forward does.
struct SatWeightGradKernel : StatusKernel<SatWeightGradKernel> {
  static constexpr const char* kName = "SatWeightQuantGrad";
  static constexpr size_t kNumInputs = 6;  // dWq, W, range, mode, scale_fan_out, [dWq/dW]
  static constexpr size_t kNumRequiredInputs = 5;
  static constexpr size_t kNumOutputs = 1;  // dW
  static constexpr size_t kNumRequiredOutputs = 0;
  static size_t ShapeSource(size_t k) { return k + 1; }  // GI(k) is shaped like forward input k
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i >= 3 && i <= 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit SatWeightGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn dy = float_input(ctx, 0, "dWq");
    FloatIn w = float_input(ctx, 1, "W");
    SatParams p = read_params(*this, ctx, 2);
    if (dy.shape != w.shape)
      fail("gradient dWq has shape " + shape_str(dy.shape) + " but W has shape " + shape_str(w.shape));
    const bool has_factor = ctx.GetInputCount() > 5 && ctx.GetInput(5) != nullptr;
    FloatIn f{nullptr, {}, 0};
    if (has_factor) {
      f = float_input(ctx, 5, "dWq_dW");
      if (f.shape != w.shape)
        fail("derivative factor dWq_dW has shape " + shape_str(f.shape) + " but W has shape " + shape_str(w.shape));
    }
    float* dw = output(ctx, 0, w.shape);
    const size_t n = w.size;
    if (n == 0 || dw == nullptr) return;
    const size_t tasks = num_chunks(n);
    const size_t len = chunk_len(n);
    const float* g = dy.data;
    if (has_factor) {
      parallel_for(ctx, tasks, [&](size_t c) {
        const size_t b = c * len, e = std::min(n, b + len);
        mul_loop(g + b, f.data + b, dw + b, e - b);
      });
      return;
    }
    const float mx = max_abs_w(ctx, w.data, n);
    const float m = max_tanh(mx);
    if (!scaled(p, n)) {
      parallel_for(ctx, tasks, [&](size_t c) {
        const size_t b = c * len, e = std::min(n, b + len);
        sat_weight_grad_loop(g + b, w.data + b, dw + b, e - b, m / gain(p));
      });
      return;
    }
    const float ms = (m * tanh_and_scale(ctx, w.data, nullptr, dw, n, m, mx, p)) / gain(p);  // dw: sech^2 until the end
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      sat_weight_grad_from_sech2_loop(g + b, dw + b, e - b, ms);
    });
  }
};

}  // namespace

void AddSatWeightOps(Ort::CustomOpDomain& domain) {
  static CpuOp<SatWeightKernel> fwd;
  static CpuOp<SatWeightGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cpu
}  // namespace onnxqat
