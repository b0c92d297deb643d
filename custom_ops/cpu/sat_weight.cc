// SatWeightQuant / SatWeightQuantGrad (SAT weight quantizer, N2D2 semantics; quantizer-math.md).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/checks.h"
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
  SatParams p;
  p.r = k.float_scalar(ctx, first, "range");
  k.check(check_range(p.r));
  p.mode = k.int_scalar(ctx, first + 1, "mode");
  k.check(check_sat_mode(p.mode, p.r));
  p.fan_out = k.int_scalar(ctx, first + 2, "scale_fan_out");
  k.check(check_fan_out(p.fan_out));
  p.half = std::floor(p.r / 2.0f);
  return p;
}

// t[i] = tanh(w[i]); returns M = max|t| (1 when every t is 0: keeps t/M and dW finite).
float tanh_and_max(Ort::KernelContext& ctx, const float* w, float* t, size_t n) {
  const size_t tasks = num_chunks(n);
  std::vector<float> part(tasks, 0.0f);
  parallel_for(ctx, tasks, [&](size_t c) {
    const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
    part[c] = tanh_max_loop(w + b, t + b, e - b);
  });
  float mx = 0.0f;
  for (float v : part) mx = v > mx ? v : mx;
  return mx > 0.0f ? mx : 1.0f;
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
  const double var = ss / static_cast<double>(n - 1);
  const float s = static_cast<float>(std::sqrt(static_cast<double>(p.fan_out) * var));
  return s > 0.0f ? s : 1.0f;
}

struct SatWeightKernel : StatusKernel<SatWeightKernel> {
  static constexpr const char* kName = "SatWeightQuant";
  static constexpr size_t kNumInputs = 4;
  static constexpr size_t kNumOutputs = 1;
  static constexpr bool kOptionalOutputs = false;
  static size_t ShapeSource(size_t) { return 0; }
  static ONNXTensorElementDataType InputType(size_t i) {
    return i >= 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit SatWeightKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn w = float_input(ctx, 0, "W");
    SatParams p = read_params(*this, ctx, 1);
    float* y = output(ctx, 0, w.shape);
    const size_t n = w.size;
    if (n == 0 || y == nullptr) return;
    const float m = tanh_and_max(ctx, w.data, y, n);
    const float s = scale_factor(ctx, y, n, m, p);
    parallel_for(ctx, num_chunks(n), [&](size_t c) {
      const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
      sat_weight_level_loop(p.mode, y + b, e - b, m, p.r, p.half, s);
    });
  }
};

struct SatWeightGradKernel : StatusKernel<SatWeightGradKernel> {
  static constexpr const char* kName = "SatWeightQuantGrad";
  static constexpr size_t kNumInputs = 5;  // dWq, W, range, mode, scale_fan_out
  static constexpr size_t kNumOutputs = 1;  // dW
  static constexpr bool kOptionalOutputs = true;
  static size_t ShapeSource(size_t k) { return k + 1; }  // GI(k) is shaped like forward input k
  static ONNXTensorElementDataType InputType(size_t i) {
    return i >= 3 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit SatWeightGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn dy = float_input(ctx, 0, "dWq");
    FloatIn w = float_input(ctx, 1, "W");
    SatParams p = read_params(*this, ctx, 2);
    if (dy.shape != w.shape)
      fail("gradient dWq has shape " + shape_str(dy.shape) + " but W has shape " + shape_str(w.shape));
    float* dw = output(ctx, 0, w.shape);
    const size_t n = w.size;
    if (n == 0 || dw == nullptr) return;
    const float m = tanh_and_max(ctx, w.data, dw, n);  // dw holds tanh(W) until the last pass
    const float s = scale_factor(ctx, dw, n, m, p);
    const float ms = m * s;
    const float* g = dy.data;
    parallel_for(ctx, num_chunks(n), [&](size_t c) {
      const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
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
