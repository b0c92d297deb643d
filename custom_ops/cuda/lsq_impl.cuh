// LsqQuant / LsqQuantGrad launchers (no ORT types). Device pointers on `stream`'s device. The tensor v is viewed as
// [outer, channels, inner] around the channel axis; per tensor, the step is the host value `step_value` (checked by
// the caller); per channel, `step` points to `channels` device floats (checked by the caller).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/lsq_layout.h"

namespace onnxqat {
namespace cuda {

// y = s * round(clip(v / s, qn, qp)).
cudaError_t lsq_forward(cudaStream_t stream, const float* v, const LsqLayout& layout, float step_value,
                        const float* step, float qn, float qp, float* y);

size_t lsq_backward_scratch_bytes(const LsqLayout& layout);

// dv = dy * 1[qn <= v/s <= qp] (skipped when dv is null); dstep = float(g * sum dy * local) in double, one value
// per tensor or per channel (skipped when dstep is null). One pass over dy and v for both.
cudaError_t lsq_backward(cudaStream_t stream, const float* dy, const float* v, const LsqLayout& layout,
                         float step_value, const float* step, float qn, float qp, float grad_scale, float* dv,
                         float* dstep, void* scratch);

}  // namespace cuda
}  // namespace onnxqat
