// SatActQuant / SatActQuantGrad (SAT activation quantizer, CG-PACT; quantizer-math.md).
#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "common/quant_math.h"
#include "cpu/kernel_base.h"
#include "cpu/loops.h"

namespace onnxqat {
namespace cpu {
namespace {

struct ActParams {
  float a;  // alpha (> 0, so |alpha| == alpha)
  float r;
  std::vector<int64_t> alpha_shape;
};

ActParams read_params(const KernelBase& k, Ort::KernelContext& ctx, size_t first) {
  ActParams p;
  KernelBase::FloatIn alpha = k.float_input(ctx, first, "alpha");
  k.check(check_alpha_shape(alpha.shape, static_cast<int64_t>(alpha.size)));
  p.a = alpha.data[0];
  k.check(check_positive("alpha", p.a));
  p.alpha_shape = alpha.shape;
  p.r = k.float_scalar(ctx, first + 1, "range");
  k.check(check_range(p.r));
  return p;
}

struct SatActKernel : StatusKernel<SatActKernel> {
  static constexpr const char* kName = "SatActQuant";
  static constexpr size_t kNumInputs = 3;
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 1;
  static constexpr size_t kNumRequiredOutputs = kNumOutputs;
  static size_t ShapeSource(size_t) { return 0; }
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  explicit SatActKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn x = float_input(ctx, 0, "x");
    ActParams p = read_params(*this, ctx, 1);
    float* y = output(ctx, 0, x.shape);
    const size_t n = x.size;
    if (n == 0 || y == nullptr) return;
    const float a = p.a, r = p.r;
    const float* xd = x.data;
    parallel_for(ctx, num_chunks(n), [&](size_t c) {
      const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
      sat_act_forward_loop(xd + b, y + b, e - b, a, r);
    });
  }
};

struct SatActGradKernel : StatusKernel<SatActGradKernel> {
  static constexpr const char* kName = "SatActQuantGrad";
  static constexpr size_t kNumInputs = 4;   // dy, x, alpha, range
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // dx, dalpha
  static constexpr size_t kNumRequiredOutputs = 0;
  static size_t ShapeSource(size_t k) { return k + 1; }  // GI(k) is shaped like forward input k
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  explicit SatActGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn dy = float_input(ctx, 0, "dy");
    FloatIn x = float_input(ctx, 1, "x");
    ActParams p = read_params(*this, ctx, 2);
    if (dy.shape != x.shape)
      fail("gradient dy has shape " + shape_str(dy.shape) + " but x has shape " + shape_str(x.shape));
    float* dx = output(ctx, 0, x.shape);
    float* dalpha = output(ctx, 1, p.alpha_shape);
    const size_t n = x.size;
    const float a = p.a, r = p.r;
    const float* xd = x.data;
    const float* g = dy.data;
    const size_t tasks = num_chunks(n);
    std::vector<double> part(tasks, 0.0);
    parallel_for(ctx, tasks, [&](size_t c) {
      const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
      if (dalpha == nullptr) {
        if (dx != nullptr) sat_act_dx_loop(g + b, xd + b, dx + b, e - b, a);
        return;
      }
      part[c] = sat_act_grad_loop(g + b, xd + b, dx != nullptr ? dx + b : nullptr, e - b, a, r);
    });
    if (dalpha != nullptr) {
      double s = 0;
      for (double v : part) s += v;
      dalpha[0] = static_cast<float>(s);
    }
  }
};

}  // namespace

void AddSatActOps(Ort::CustomOpDomain& domain) {
  static CpuOp<SatActKernel> fwd;
  static CpuOp<SatActGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cpu
}  // namespace onnxqat
