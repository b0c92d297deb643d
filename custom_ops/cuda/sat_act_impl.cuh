// SatActQuant / SatActQuantGrad launchers (no ORT types). Device pointers on `stream`'s device; a = |alpha| and
// range are host values the caller has checked (a finite and > 0, range R >= 1).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace onnxqat {
namespace cuda {

// y = a * round(R * clip(x, 0, a) / a) / R.
cudaError_t sat_act_forward(cudaStream_t stream, const float* x, int64_t n, float a, float range, float* y);

size_t sat_act_backward_scratch_bytes();

// dx = dy * 1[0 < x <= a] (skipped when dx is null); dalpha[0] = float(sum dy * local(x)) in double (skipped when
// dalpha is null). One pass over dy and x; scratch: sat_act_backward_scratch_bytes() bytes of device memory.
cudaError_t sat_act_backward(cudaStream_t stream, const float* dy, const float* x, int64_t n, float a, float range,
                             float* dx, float* dalpha, void* scratch);

}  // namespace cuda
}  // namespace onnxqat
