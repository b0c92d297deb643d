// SatWeightQuant / SatWeightQuantGrad for the CUDAExecutionProvider (kernels: sat_weight_impl.cu).
#include "common/op_inputs.h"
#include "cuda/cuda_kernel.h"
#include "cuda/sat_weight_impl.cuh"

namespace onnxqat {
namespace cuda {
namespace {

struct SatWeightKernel : StatusKernel<SatWeightKernel> {
  static constexpr const char* kName = "SatWeightQuant";
  static constexpr size_t kNumInputs = 4;  // W, range, mode, scale_fan_out
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // Wq, [dWq_dW] (schema.py; the same descriptor as the CPU kernel's)
  static constexpr size_t kNumRequiredOutputs = 1;
  static ONNXTensorElementDataType InputType(size_t i) {
    return i >= 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static bool OnHost(size_t i) { return i >= 1; }
  explicit SatWeightKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn w = float_input(ctx, 0, "W");
    const SatWeightArgs a = read_sat_weight_args(*this, ctx, 1);
    float* y = output(ctx, 0, w.shape);
    float* d = output(ctx, 1, w.shape);
    if (w.size == 0 || y == nullptr) return;
    cudaStream_t s = stream(ctx, w.device_id);
    Scratch scratch(ctx, w.device_id, s, sat_weight_scratch_bytes());
    cuda_check(scratch.error(), "scratch allocation");
    cuda_check(sat_weight_forward(s, w.data, w.size, a.r, a.mode, a.fan_out, y, d, scratch.get()), "kernel launch");
  }
};

struct SatWeightGradKernel : StatusKernel<SatWeightGradKernel> {
  static constexpr const char* kName = "SatWeightQuantGrad";
  static constexpr size_t kNumInputs = 6;  // dWq, W, range, mode, scale_fan_out, [dWq_dW]
  static constexpr size_t kNumRequiredInputs = 5;
  static constexpr size_t kNumOutputs = 1;  // dW
  static constexpr size_t kNumRequiredOutputs = 0;
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i >= 3 && i <= 4) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  static bool OnHost(size_t i) { return i >= 2 && i <= 4; }
  explicit SatWeightGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    DeviceIn dy = float_input(ctx, 0, "dWq");
    DeviceIn w = float_input(ctx, 1, "W");
    const SatWeightArgs a = read_sat_weight_args(*this, ctx, 2);
    if (dy.shape != w.shape)
      fail("gradient dWq has shape " + shape_str(dy.shape) + " but W has shape " + shape_str(w.shape));
    const bool has_factor = ctx.GetInputCount() > 5 && ctx.GetInput(5) != nullptr;
    DeviceIn f{};
    if (has_factor) {
      f = float_input(ctx, 5, "dWq_dW");
      if (f.shape != w.shape)
        fail("derivative factor dWq_dW has shape " + shape_str(f.shape) + " but W has shape " + shape_str(w.shape));
    }
    float* dw = output(ctx, 0, w.shape);
    if (w.size == 0 || dw == nullptr) return;
    cudaStream_t s = stream(ctx, w.device_id);
    if (has_factor) {
      cuda_check(sat_weight_backward_factor(s, dy.data, f.data, w.size, dw), "kernel launch");
      return;
    }
    Scratch scratch(ctx, w.device_id, s, sat_weight_scratch_bytes());
    cuda_check(scratch.error(), "scratch allocation");
    cuda_check(sat_weight_backward(s, dy.data, w.data, w.size, a.r, a.mode, a.fan_out, dw, scratch.get()),
               "kernel launch");
  }
};

}  // namespace

void AddSatWeightOps(Ort::CustomOpDomain& domain) {
  static CudaOp<SatWeightKernel> fwd;
  static CudaOp<SatWeightGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cuda
}  // namespace onnxqat
