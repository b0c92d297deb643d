// SatActQuant / SatActQuantGrad for the CUDAExecutionProvider (kernels: sat_act_impl.cu). alpha is a trainable
// parameter and lives on the device: its value is copied to the host and checked there (finite, > 0), as the CPU
// kernel checks it; range is a per-node constant read from host memory.
#include "common/checks.h"
#include "cuda/cuda_kernel.h"
#include "cuda/sat_act_impl.cuh"

namespace onnxqat {
namespace cuda {
namespace {

struct ActArgs {
  float a;
  float r;
  std::vector<int64_t> alpha_shape;
};

ActArgs read_args(const CudaKernel& k, Ort::KernelContext& ctx, size_t first, cudaStream_t s) {
  ActArgs p;
  CudaKernel::DeviceIn alpha = k.float_input(ctx, first, "alpha");
  k.check(check_alpha_shape(alpha.shape, alpha.size));
  p.alpha_shape = alpha.shape;
  p.r = k.float_scalar(ctx, first + 1, "range");
  p.a = k.to_host(alpha.data, 1, s)[0];
  k.check(check_positive("alpha", p.a));
  k.check(check_range(p.r));
  return p;
}

struct SatActKernel : StatusKernel<SatActKernel> {
  static constexpr const char* kName = "SatActQuant";
  static constexpr size_t kNumInputs = 3;  // x, alpha, range
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 1;
  static constexpr size_t kNumRequiredOutputs = kNumOutputs;
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static bool OnHost(size_t i) { return i == 2; }
  explicit SatActKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn x = float_input(ctx, 0, "x");
    cudaStream_t s = stream(ctx, x.device_id);
    const ActArgs p = read_args(*this, ctx, 1, s);
    float* y = output(ctx, 0, x.shape);
    if (x.size == 0 || y == nullptr) return;
    cuda_check(sat_act_forward(s, x.data, x.size, p.a, p.r, y), "kernel launch");
  }
};

struct SatActGradKernel : StatusKernel<SatActGradKernel> {
  static constexpr const char* kName = "SatActQuantGrad";
  static constexpr size_t kNumInputs = 4;   // dy, x, alpha, range
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // dx, dalpha
  static constexpr size_t kNumRequiredOutputs = 0;
  static ONNXTensorElementDataType InputType(size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  static bool OnHost(size_t i) { return i == 3; }
  explicit SatActGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn dy = float_input(ctx, 0, "dy");
    DeviceIn x = float_input(ctx, 1, "x");
    cudaStream_t s = stream(ctx, x.device_id);
    const ActArgs p = read_args(*this, ctx, 2, s);
    if (dy.shape != x.shape)
      fail("gradient dy has shape " + shape_str(dy.shape) + " but x has shape " + shape_str(x.shape));
    float* dx = output(ctx, 0, x.shape);
    float* dalpha = output(ctx, 1, p.alpha_shape);
    if (dx == nullptr && dalpha == nullptr) return;
    Scratch scratch(ctx, x.device_id, s, dalpha != nullptr ? sat_act_backward_scratch_bytes() : 0);
    cuda_check(scratch.error(), "scratch allocation");
    cuda_check(sat_act_backward(s, dy.data, x.data, x.size, p.a, p.r, dx, dalpha, scratch.get()), "kernel launch");
  }
};

}  // namespace

void AddSatActOps(Ort::CustomOpDomain& domain) {
  static CudaOp<SatActKernel> fwd;
  static CudaOp<SatActGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cuda
}  // namespace onnxqat
