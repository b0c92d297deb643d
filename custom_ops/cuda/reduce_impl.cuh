// Launchers shared by the ops: the final pass of the two-pass sums (no ORT types).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace onnxqat {
namespace cuda {

// partial holds doubles laid out [chunks][segments][kin]. For every segment s:
//   out[s] = float(scale * sum over chunk, k of partial[(chunk * segments + s) * kin + k])
// in a fixed order (deterministic). One warp per segment.
cudaError_t launch_segment_sums(cudaStream_t stream, const double* partial, int64_t chunks, int64_t segments,
                                int64_t kin, double scale, float* out);

}  // namespace cuda
}  // namespace onnxqat
