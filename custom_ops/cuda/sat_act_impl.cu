// SAT activation (CG-PACT) kernels: an elementwise forward; a backward that writes dx and the per-block partial sums
// of dalpha in the same pass, then a one-warp final sum.
#include "cuda/sat_act_impl.cuh"

#include "common/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/reduce_impl.cuh"

namespace onnxqat {
namespace cuda {

namespace {

__global__ void sat_act_forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t n, bool vec,
                                       float a, float r) {
  map1(x, y, n, vec, [&](int64_t, float v) { return ::onnxqat::sat_act_forward(v, a, r); });
}

__global__ void sat_act_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x,
                                        float* __restrict__ dx, int64_t n, bool vec, float a, float r,
                                        double* __restrict__ partial) {
  double acc = 0.0;
  map2(dy, x, dx, n, vec, [&](int64_t, float g, float v) {
    acc += static_cast<double>(g) * static_cast<double>(sat_act_dalpha_local(v, a, r));
    return sat_act_dx(g, v, a);
  });
  if (partial != nullptr) {  // uniform over the grid
    acc = block_reduce(acc, SumOp{}, 0.0);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

}  // namespace

cudaError_t sat_act_forward(cudaStream_t stream, const float* x, int64_t n, float a, float range, float* y) {
  if (n <= 0) return cudaSuccess;
  sat_act_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(x, y, n, aligned16(x) && aligned16(y), a, range);
  return cudaGetLastError();
}

size_t sat_act_backward_scratch_bytes() { return sizeof(double) * kMaxBlocks; }

cudaError_t sat_act_backward(cudaStream_t stream, const float* dy, const float* x, int64_t n, float a, float range,
                             float* dx, float* dalpha, void* scratch) {
  if (dx == nullptr && dalpha == nullptr) return cudaSuccess;
  if (n <= 0) {
    // a sum over no element
    return dalpha != nullptr ? cudaMemsetAsync(dalpha, 0, sizeof(float), stream) : cudaSuccess;
  }
  const int grid = grid_for(n);
  double* partial = dalpha != nullptr ? static_cast<double*>(scratch) : nullptr;
  const bool vec = aligned16(dy) && aligned16(x) && (dx == nullptr || aligned16(dx));
  sat_act_backward_kernel<<<grid, kThreads, 0, stream>>>(dy, x, dx, n, vec, a, range, partial);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dalpha == nullptr) return err;
  return launch_segment_sums(stream, partial, 1, 1, grid, 1.0, dalpha);
}

}  // namespace cuda
}  // namespace onnxqat
