// SatWeightQuant / SatWeightQuantGrad launchers (no ORT types). All pointers are device pointers on `stream`'s device;
// `scratch` is device memory of sat_weight_scratch_bytes() bytes, used by this call only (stream-ordered).
// Arguments are assumed valid (the callers check them with common/checks.h).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace onnxqat {
namespace cuda {

size_t sat_weight_scratch_bytes();

// Wq = level(tanh(W) / M) / S, M = max|tanh W| (1 if 0), S = sqrt(fan_out * Var(level)) (1 without scaling);
// dfactor (when not null) = the derivative factor (1 - tanh(W)^2) / (M * S) (SatWeightQuant's optional output).
cudaError_t sat_weight_forward(cudaStream_t stream, const float* w, int64_t n, float range, int64_t mode,
                               int64_t fan_out, float* wq, float* dfactor, void* scratch);
inline cudaError_t sat_weight_forward(cudaStream_t stream, const float* w, int64_t n, float range, int64_t mode,
                                      int64_t fan_out, float* wq, void* scratch) {
  return sat_weight_forward(stream, w, n, range, mode, fan_out, wq, nullptr, scratch);
}

// dW = dWq * ((1 - tanh(W)^2) / (M * S)), the factor computed from W.
cudaError_t sat_weight_backward(cudaStream_t stream, const float* dwq, const float* w, int64_t n, float range,
                                int64_t mode, int64_t fan_out, float* dw, void* scratch);

// dW = dWq * dfactor (the forward's derivative factor): one product per element.
cudaError_t sat_weight_backward_factor(cudaStream_t stream, const float* dwq, const float* dfactor, int64_t n,
                                       float* dw);

}  // namespace cuda
}  // namespace onnxqat
