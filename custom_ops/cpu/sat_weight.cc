// SatWeightQuant / SatWeightQuantGrad (SAT weight quantizer, N2D2 semantics; quantizer-math.md).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

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

// M = max|tanh W| = tanh(max|W|): a correctly rounded tanh is odd and monotonic, so the max pass needs no tanh
// (1 when every weight is 0: keeps t/M and dW finite).
float max_tanh(Ort::KernelContext& ctx, const float* w, size_t n) {
  const size_t tasks = num_chunks(n);
  std::vector<float> part(tasks, 0.0f);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
    part[c] = max_abs_loop(w + b, e - b);
  });
  float mx = 0.0f;
  for (float v : part) mx = v > mx ? v : mx;
  const float m = tanh_f32(mx);
  return m > 0.0f ? m : 1.0f;
}

// S = sqrt(n * Var) (Bessel) from the sum of the levels and their squared deviations (double); 1 if not > 0.
float scale_from(double sq, size_t n, int64_t fan_out) {
  const double var = sq / static_cast<double>(n - 1);
  const float s = static_cast<float>(std::sqrt(static_cast<double>(fan_out) * var));
  return s > 0.0f ? s : 1.0f;
}

// S = sqrt(n * Var(Wq)) (Bessel), Wq = level(t/M); 1 without scaling, for fewer than 2 elements, or when Var is 0.
float scale_factor(Ort::KernelContext& ctx, const float* t, size_t n, float m, const SatParams& p) {
  if (p.fan_out <= 0 || n < 2) return 1.0f;
  const size_t tasks = num_chunks(n);
  std::vector<double> part(tasks, 0.0);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
    part[c] = sat_weight_level_sum(p.mode, t + b, e - b, m, p.r, p.half);
  });
  double sum = 0;
  for (double v : part) sum += v;
  const double mean = sum / static_cast<double>(n);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
    part[c] = sat_weight_level_sqdev(p.mode, t + b, e - b, m, p.r, p.half, mean);
  });
  double ss = 0;
  for (double v : part) ss += v;
  return scale_from(ss, n, p.fan_out);
}

// Outputs: Wq, and optionally the derivative factor dWq/dW = (1 - tanh(W)^2) / (M * S) (schema.py), which the
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
    const float m = max_tanh(ctx, w.data, n);
    const size_t tasks = num_chunks(n);
    const size_t len = chunk_len(n);
    if (p.fan_out <= 0 || n < 2) {  // S = 1: one pass, tanh once per element
      parallel_for(ctx, tasks, [&](size_t c) {
        const size_t b = c * len, e = std::min(n, b + len);
        sat_weight_forward_loop(p.mode, w.data + b, y + b, d ? d + b : nullptr, e - b, m, p.r, p.half);
      });
      return;
    }
    // ApplyScaling: unscaled levels into y (and t into d) with the level sums, the squared deviations, then y / S
    // and d = (1 - t^2) / (M S). Same chunks, blocks and summation order as scale_factor: the same S.
    std::vector<double> part(tasks, 0.0);
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      part[c] = sat_weight_levels_loop(p.mode, w.data + b, y + b, d ? d + b : nullptr, e - b, m, p.r, p.half);
    });
    double sum = 0;
    for (double v : part) sum += v;
    const double mean = sum / static_cast<double>(n);
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      part[c] = sqdev_loop(y + b, e - b, mean);
    });
    double ss = 0;
    for (double v : part) ss += v;
    const float s = scale_from(ss, n, p.fan_out);
    const float ms = m * s;
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      sat_weight_scale_loop(y + b, d ? d + b : nullptr, e - b, s, ms);
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
    const float m = max_tanh(ctx, w.data, n);
    parallel_for(ctx, tasks, [&](size_t c) {  // dw holds tanh(W) until the last pass
      const size_t b = c * len, e = std::min(n, b + len);
      tanh_loop(w.data + b, dw + b, e - b);
    });
    const float s = scale_factor(ctx, dw, n, m, p);
    const float ms = m * s;
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * len, e = std::min(n, b + len);
      sat_weight_grad_loop(g + b, dw + b, e - b, ms);
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
