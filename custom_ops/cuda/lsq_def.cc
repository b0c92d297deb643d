// LsqQuant / LsqQuantGrad for the CUDAExecutionProvider (kernels: lsq_impl.cu). The step (per tensor or per
// channel) is a trainable parameter on the device: its values are copied to the host and checked there, as the CPU
// kernel checks them; range, signed, grad_scale and axis are per-node constants read from host memory.
#include "common/quant_math.h"
#include "common/op_inputs.h"
#include "cuda/cuda_kernel.h"
#include "cuda/lsq_impl.cuh"

namespace onnxqat {
namespace cuda {
namespace {

struct LsqArgs {
  const float* step;  // device
  float step_value;   // per tensor: the step on the host
  std::vector<int64_t> step_shape;
  LsqLayout layout;
  LsqBounds bounds;
  float g;
};

LsqArgs read_args(const CudaKernel& k, Ort::KernelContext& ctx, size_t first, const CudaKernel::DeviceIn& v,
                  cudaStream_t s) {
  LsqArgs p;
  CudaKernel::DeviceIn step = k.float_input(ctx, first, "step");
  const LsqConstants c = read_lsq_constants(k, ctx, first + 1);
  p.bounds = c.bounds;
  p.g = c.g;
  p.step = step.data;
  p.step_shape = step.shape;
  k.check(lsq_layout(v.shape, step.shape, c.axis, &p.layout));
  const std::vector<float> host = k.to_host(step.data, static_cast<size_t>(step.size), s);
  k.check(check_steps(host.data(), step.size));
  p.step_value = host[0];
  return p;
}

struct LsqKernel : StatusKernel<LsqKernel> {
  static constexpr const char* kName = "LsqQuant";
  static constexpr size_t kNumInputs = 6;  // v, step, range, signed, grad_scale, axis
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 1;
  static constexpr size_t kNumRequiredOutputs = kNumOutputs;
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i == 3 || i == 5) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static bool OnHost(size_t i) { return i >= 2; }
  explicit LsqKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn v = float_input(ctx, 0, "v");
    cudaStream_t s = stream(ctx, v.device_id);
    const LsqArgs p = read_args(*this, ctx, 1, v, s);
    float* y = output(ctx, 0, v.shape);
    if (v.size == 0 || y == nullptr) return;
    cuda_check(lsq_forward(s, v.data, p.layout, p.step_value, p.step, p.bounds.qn, p.bounds.qp, y), "kernel launch");
  }
};

struct LsqGradKernel : StatusKernel<LsqGradKernel> {
  static constexpr const char* kName = "LsqQuantGrad";
  static constexpr size_t kNumInputs = 7;   // dy, v, step, range, signed, grad_scale, axis
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // dv, dstep
  static constexpr size_t kNumRequiredOutputs = 0;
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i == 4 || i == 6) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static bool OnHost(size_t i) { return i >= 3; }
  explicit LsqGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn dy = float_input(ctx, 0, "dy");
    DeviceIn v = float_input(ctx, 1, "v");
    cudaStream_t s = stream(ctx, v.device_id);
    const LsqArgs p = read_args(*this, ctx, 2, v, s);
    if (dy.shape != v.shape)
      fail("gradient dy has shape " + shape_str(dy.shape) + " but v has shape " + shape_str(v.shape));
    float* dv = output(ctx, 0, v.shape);
    float* dstep = output(ctx, 1, p.step_shape);
    if (dv == nullptr && dstep == nullptr) return;
    Scratch scratch(ctx, v.device_id, s, dstep != nullptr ? lsq_backward_scratch_bytes(p.layout) : 0);
    cuda_check(scratch.error(), "scratch allocation");
    cuda_check(lsq_backward(s, dy.data, v.data, p.layout, p.step_value, p.step, p.bounds.qn, p.bounds.qp, p.g, dv,
                            dstep, scratch.get()),
               "kernel launch");
  }
};

}  // namespace

void AddLsqOps(Ort::CustomOpDomain& domain) {
  static CudaOp<LsqKernel> fwd;
  static CudaOp<LsqGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cuda
}  // namespace onnxqat
