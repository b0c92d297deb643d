// SatWeightQuant / SatWeightQuantGrad (SAT weight quantizer, N2D2 semantics; quantizer-math.md).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "common/checks.h"
#include "common/quant_math.h"
#include "cpu/kernel_base.h"
#include "cpu/reduce.h"

namespace onnxqat {
namespace cpu {
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
    return tn;
  }
}

template <class F>
inline void with_mode(int64_t mode, F&& f) {
  if (mode == kSatModeDorefa)
    f(std::integral_constant<int64_t, kSatModeDorefa>{});
  else if (mode == kSatModeSymmetric)
    f(std::integral_constant<int64_t, kSatModeSymmetric>{});
  else
    f(std::integral_constant<int64_t, kSatModeClamp>{});
}

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
    const size_t b = c * kChunk, e = std::min(n, b + kChunk);
    float m[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    size_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        float v = std::tanh(w[i + k]);
        t[i + k] = v;
        float a = std::fabs(v);
        m[k] = a > m[k] ? a : m[k];
      }
    }
    for (; i < e; ++i) {
      float v = std::tanh(w[i]);
      t[i] = v;
      float a = std::fabs(v);
      m[0] = a > m[0] ? a : m[0];
    }
    float mm = 0.0f;
    for (int k = 0; k < kLanes; ++k) mm = m[k] > mm ? m[k] : mm;
    part[c] = mm;
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
  with_mode(p.mode, [&](auto mode_c) {
    constexpr int64_t MODE = decltype(mode_c)::value;
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * kChunk, e = std::min(n, b + kChunk);
      const float* tb = t + b;
      part[c] = lane_sum(e - b, [&](size_t i) { return level<MODE>(tb[i] / m, p.r, p.half); });
    });
  });
  double sum = 0;
  for (double v : part) sum += v;
  const double mean = sum / static_cast<double>(n);
  with_mode(p.mode, [&](auto mode_c) {
    constexpr int64_t MODE = decltype(mode_c)::value;
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * kChunk, e = std::min(n, b + kChunk);
      const float* tb = t + b;
      part[c] = lane_sum(e - b, [&](size_t i) {
        double d = static_cast<double>(level<MODE>(tb[i] / m, p.r, p.half)) - mean;
        return d * d;
      });
    });
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
    with_mode(p.mode, [&](auto mode_c) {
      constexpr int64_t MODE = decltype(mode_c)::value;
      parallel_for(ctx, num_chunks(n), [&](size_t c) {
        const size_t b = c * kChunk, e = std::min(n, b + kChunk);
        float* yb = y + b;
        const size_t len = e - b;
        if (s == 1.0f) {
          for (size_t i = 0; i < len; ++i) yb[i] = level<MODE>(yb[i] / m, p.r, p.half);
        } else {
          for (size_t i = 0; i < len; ++i) yb[i] = level<MODE>(yb[i] / m, p.r, p.half) / s;
        }
      });
    });
  }
};

struct SatWeightGradKernel : StatusKernel<SatWeightGradKernel> {
  static constexpr const char* kName = "SatWeightQuantGrad";
  static constexpr size_t kNumInputs = 5;  // dWq, W, range, mode, scale_fan_out
  static constexpr size_t kNumOutputs = 1;  // dW
  static constexpr bool kOptionalOutputs = true;
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
      const size_t b = c * kChunk, e = std::min(n, b + kChunk);
      for (size_t i = b; i < e; ++i) dw[i] = sat_weight_grad(g[i], dw[i], ms);
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
