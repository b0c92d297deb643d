// Device-side building blocks shared by the kernels of custom_ops/cuda: launch geometry, warp/block reductions,
// alignment test. Kernels only (no ORT types, no host API beyond the CUDA runtime).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace onnxqat {
namespace cuda {

constexpr int kThreads = 256;     // threads per block of every kernel (a multiple of 32)
constexpr int kMaxBlocks = 1024;  // upper bound of a grid-stride grid = size of the per-block partial arrays

// Blocks of a grid-stride kernel over n elements (4 per thread per step): enough to fill the device
// (8 blocks of 256 per SM), never more than the work or kMaxBlocks. 0 when n == 0.
int grid_for(int64_t n);

// Whether p is 16-byte aligned (float4 loads and stores).
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Division by a fixed divisor d (1 <= d < 2^31) of numerators n < 2^31 by multiply-high and shift
// (Granlund-Montgomery, as PyTorch's IntDivider): the channel of a flat index without an integer divide.
struct FastDivider {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;
  FastDivider() = default;
  explicit FastDivider(uint32_t d) : divisor(d) {
    for (shift = 0; shift < 32; ++shift)
      if ((uint64_t{1} << shift) >= d) break;
    const uint64_t one = 1;
    magic = static_cast<uint32_t>(((one << 32) * ((one << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
};

// Flat index -> channel c = (i / inner) % channels, for a tensor viewed as [outer, channels, inner].
struct ChannelOf {
  int64_t inner = 1;
  int64_t channels = 1;
  bool fast = false;  // every index, inner and channels < 2^31: FastDivider
  FastDivider by_inner;
  FastDivider by_channels;
  ChannelOf() = default;
  ChannelOf(int64_t n, int64_t channels_, int64_t inner_) : inner(inner_), channels(channels_) {
    const int64_t lim = int64_t{1} << 31;
    fast = n < lim && inner < lim && channels < lim && inner > 0 && channels > 0;
    if (fast) {
      by_inner = FastDivider(static_cast<uint32_t>(inner));
      by_channels = FastDivider(static_cast<uint32_t>(channels));
    }
  }
  __device__ __forceinline__ int64_t operator()(int64_t i) const {
    if (fast) {
      const uint32_t q = by_inner.div(static_cast<uint32_t>(i));
      return static_cast<int64_t>(q - by_channels.div(q) * static_cast<uint32_t>(channels));
    }
    return (i / inner) % channels;
  }
};

// y[i] = f(i, x[i]) for every i < n, grid-stride, float4 loads/stores when vec (x and y 16-byte aligned).
// y may be null (f is then called for its side effects, e.g. a per-thread accumulator).
template <class F>
__device__ __forceinline__ void map1(const float* __restrict__ x, float* __restrict__ y, int64_t n, bool vec, F f) {
  const int64_t tid = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = n >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(x);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (int64_t i = tid; i < n4; i += stride) {
      const float4 a = x4[i];
      const int64_t b = i << 2;
      float4 r;
      r.x = f(b, a.x);
      r.y = f(b + 1, a.y);
      r.z = f(b + 2, a.z);
      r.w = f(b + 3, a.w);
      if (y != nullptr) y4[i] = r;
    }
    done = n4 << 2;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const float r = f(i, x[i]);
    if (y != nullptr) y[i] = r;
  }
}

// y[i] = f(i, a[i], b[i]); as map1 with two inputs.
template <class F>
__device__ __forceinline__ void map2(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                     int64_t n, bool vec, F f) {
  const int64_t tid = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  int64_t done = 0;
  if (vec) {
    const int64_t n4 = n >> 2;
    const float4* a4 = reinterpret_cast<const float4*>(a);
    const float4* b4 = reinterpret_cast<const float4*>(b);
    float4* y4 = reinterpret_cast<float4*>(y);
    for (int64_t i = tid; i < n4; i += stride) {
      const float4 p = a4[i];
      const float4 q = b4[i];
      const int64_t k = i << 2;
      float4 r;
      r.x = f(k, p.x, q.x);
      r.y = f(k + 1, p.y, q.y);
      r.z = f(k + 2, p.z, q.z);
      r.w = f(k + 3, p.w, q.w);
      if (y != nullptr) y4[i] = r;
    }
    done = n4 << 2;
  }
  for (int64_t i = done + tid; i < n; i += stride) {
    const float r = f(i, a[i], b[i]);
    if (y != nullptr) y[i] = r;
  }
}

struct SumOp {
  template <class T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// max that propagates NaN (as numpy's np.max does).
struct NanMaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return (a > b || a != a) ? a : b; }
};

template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Reduction over the block (blockDim.x a multiple of 32); the result is valid in thread 0. Every thread must call it.
// `identity` fills the lanes of warps the block does not have.
template <class T, class Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity) {
  __shared__ T warp_results[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // warp_results may still be read by a previous block_reduce call
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  if (warp == 0) {
    v = lane < nwarps ? warp_results[lane] : identity;
    v = warp_reduce(v, op);
  }
  return v;
}

}  // namespace cuda
}  // namespace onnxqat
