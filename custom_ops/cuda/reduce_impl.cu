#include "cuda/reduce_impl.cuh"

#include <algorithm>

#include "cuda/common.cuh"

namespace onnxqat {
namespace cuda {

int grid_for(int64_t n) {
  if (n <= 0) return 0;
  int dev = 0;
  int sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0) {
    sms = 16;  // the launch that follows reports the error, if the device is unusable
  }
  const int64_t want = (n + int64_t{kThreads} * 4 - 1) / (int64_t{kThreads} * 4);
  const int64_t cap = std::min<int64_t>(int64_t{sms} * 8, kMaxBlocks);
  return static_cast<int>(std::max<int64_t>(1, std::min(want, cap)));
}

namespace {

constexpr int kWarpsPerBlock = kThreads / 32;

__global__ void segment_sums_kernel(const double* __restrict__ partial, int64_t chunks, int64_t segments, int64_t kin,
                                    double scale, float* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t first = (int64_t{blockIdx.x} * kWarpsPerBlock) + (threadIdx.x >> 5);
  const int64_t stride = int64_t{gridDim.x} * kWarpsPerBlock;
  const int64_t terms = chunks * kin;
  for (int64_t s = first; s < segments; s += stride) {
    double acc = 0.0;
    for (int64_t k = lane; k < terms; k += 32) {
      const int64_t chunk = k / kin;
      const int64_t i = k - chunk * kin;
      acc += partial[(chunk * segments + s) * kin + i];
    }
    acc = warp_reduce(acc, SumOp{});
    if (lane == 0) out[s] = static_cast<float>(scale * acc);
  }
}

}  // namespace

cudaError_t launch_segment_sums(cudaStream_t stream, const double* partial, int64_t chunks, int64_t segments,
                                int64_t kin, double scale, float* out) {
  if (segments <= 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((segments + kWarpsPerBlock - 1) / kWarpsPerBlock, 65535);
  segment_sums_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partial, chunks, segments, kin, scale,
                                                                               out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace onnxqat
