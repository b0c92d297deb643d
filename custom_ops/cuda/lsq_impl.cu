// LSQ kernels. Forward: elementwise (per channel: the channel of a flat index by multiply-high division).
// Backward: dv and the dstep partial sums in one pass, then a final per-segment sum:
//   per tensor   grid-stride over the flat tensor, one partial per block;
//   per channel  inner >= 32: blocks (bx, channel) sweep the channel's [outer, inner] elements (coalesced rows),
//                one partial per (channel, bx); inner < 32: a thread per column of the [outer, channels*inner]
//                matrix sums a chunk of rows (coalesced across threads), one partial per (row chunk, column).
#include "cuda/lsq_impl.cuh"

#include <algorithm>

#include "common/quant_math.h"
#include "cuda/common.cuh"
#include "cuda/reduce_impl.cuh"

namespace onnxqat {
namespace cuda {

namespace {

constexpr int64_t kRowsLayoutMinInner = 32;
constexpr int64_t kTargetBlocks = kMaxBlocks;
constexpr int64_t kTargetThreads = int64_t{kMaxBlocks} * kThreads;
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-channel backward geometry (also sizes the scratch).
struct ChannelPlan {
  bool rows = false;    // the inner >= 32 layout
  int64_t blocks_x = 1; // rows: blocks per channel; cols: blocks over the columns
  int64_t chunks = 1;   // cols: row chunks (grid y)
  int64_t partials = 0; // doubles of scratch
};

ChannelPlan plan_channels(const LsqLayout& l) {
  ChannelPlan p;
  const int64_t per_channel = l.outer * l.inner;
  if (per_channel == 0) return p;
  if (l.inner >= kRowsLayoutMinInner) {
    p.rows = true;
    const int64_t cy = std::min(l.channels, kMaxGridY);
    p.blocks_x = std::max<int64_t>(1, std::min(ceil_div(kTargetBlocks, cy), ceil_div(per_channel, kThreads)));
    p.partials = l.channels * p.blocks_x;
  } else {
    const int64_t cols = l.channels * l.inner;
    p.blocks_x = ceil_div(cols, kThreads);
    p.chunks = std::max<int64_t>(1, std::min({ceil_div(kTargetThreads, cols), l.outer, kMaxGridY}));
    p.partials = p.chunks * cols;
  }
  return p;
}

// n / d for 0 <= n < limit, by multiply-high when everything fits in 31 bits.
struct Divider {
  int64_t d = 1;
  bool fast = false;
  FastDivider f;
  Divider(int64_t d_, int64_t limit) : d(d_) {
    const int64_t lim = int64_t{1} << 31;
    fast = d_ > 0 && d_ < lim && limit < lim;
    if (fast) f = FastDivider(static_cast<uint32_t>(d_));
  }
  __device__ __forceinline__ int64_t operator()(int64_t n) const {
    return fast ? static_cast<int64_t>(f.div(static_cast<uint32_t>(n))) : n / d;
  }
};

__global__ void lsq_forward_tensor_kernel(const float* __restrict__ v, float* __restrict__ y, int64_t n, bool vec,
                                          float s, LsqBounds b) {
  map1(v, y, n, vec, [&](int64_t, float x) { return ::onnxqat::lsq_forward(x, s, b); });
}

__global__ void lsq_forward_channel_kernel(const float* __restrict__ v, float* __restrict__ y, int64_t n, bool vec,
                                           const float* __restrict__ step, ChannelOf channel, LsqBounds b) {
  map1(v, y, n, vec, [&](int64_t i, float x) { return ::onnxqat::lsq_forward(x, step[channel(i)], b); });
}

__global__ void lsq_backward_tensor_kernel(const float* __restrict__ dy, const float* __restrict__ v,
                                           float* __restrict__ dv, int64_t n, bool vec, float s, LsqBounds b,
                                           double* __restrict__ partial) {
  double acc = 0.0;
  map2(dy, v, dv, n, vec, [&](int64_t, float g, float x) {
    acc += static_cast<double>(g) * static_cast<double>(lsq_dstep_local(x, s, b));
    return lsq_dv(g, x, s, b);
  });
  if (partial != nullptr) {
    acc = block_reduce(acc, SumOp{}, 0.0);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

// grid (blocks_x, min(channels, 65535)); partial[c * gridDim.x + bx].
__global__ void lsq_backward_rows_kernel(const float* __restrict__ dy, const float* __restrict__ v,
                                         float* __restrict__ dv, const float* __restrict__ step, int64_t outer,
                                         int64_t channels, int64_t inner, Divider by_inner, LsqBounds b,
                                         double* __restrict__ partial) {
  const int64_t m = outer * inner;
  const int64_t first = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t c = blockIdx.y; c < channels; c += gridDim.y) {
    const float s = step[c];
    double acc = 0.0;
    for (int64_t j = first; j < m; j += stride) {
      const int64_t o = by_inner(j);
      const int64_t idx = (o * channels + c) * inner + (j - o * inner);
      const float g = dy[idx];
      const float x = v[idx];
      if (dv != nullptr) dv[idx] = lsq_dv(g, x, s, b);
      acc += static_cast<double>(g) * static_cast<double>(lsq_dstep_local(x, s, b));
    }
    acc = block_reduce(acc, SumOp{}, 0.0);
    if (threadIdx.x == 0 && partial != nullptr) partial[c * gridDim.x + blockIdx.x] = acc;
  }
}

// grid (ceil(cols / 256), chunks); a thread per column; partial[chunk * cols + col].
__global__ void lsq_backward_cols_kernel(const float* __restrict__ dy, const float* __restrict__ v,
                                         float* __restrict__ dv, const float* __restrict__ step, int64_t outer,
                                         int64_t cols, int64_t inner, LsqBounds b, double* __restrict__ partial) {
  const int64_t col = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (col >= cols) return;  // no block-wide step below
  const float s = step[col / inner];
  double acc = 0.0;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t idx = o * cols + col;
    const float g = dy[idx];
    const float x = v[idx];
    if (dv != nullptr) dv[idx] = lsq_dv(g, x, s, b);
    acc += static_cast<double>(g) * static_cast<double>(lsq_dstep_local(x, s, b));
  }
  if (partial != nullptr) partial[int64_t{blockIdx.y} * cols + col] = acc;
}

}  // namespace

cudaError_t lsq_forward(cudaStream_t stream, const float* v, const LsqLayout& l, float step_value, const float* step,
                        float qn, float qp, float* y) {
  const int64_t n = l.size();
  if (n <= 0) return cudaSuccess;
  const LsqBounds b{qn, qp};
  const bool vec = aligned16(v) && aligned16(y);
  if (l.per_channel) {
    lsq_forward_channel_kernel<<<grid_for(n), kThreads, 0, stream>>>(v, y, n, vec, step,
                                                                     ChannelOf(n, l.channels, l.inner), b);
  } else {
    lsq_forward_tensor_kernel<<<grid_for(n), kThreads, 0, stream>>>(v, y, n, vec, step_value, b);
  }
  return cudaGetLastError();
}

size_t lsq_backward_scratch_bytes(const LsqLayout& l) {
  const int64_t doubles = l.per_channel ? plan_channels(l).partials : int64_t{kMaxBlocks};
  return sizeof(double) * static_cast<size_t>(std::max<int64_t>(doubles, 1));
}

cudaError_t lsq_backward(cudaStream_t stream, const float* dy, const float* v, const LsqLayout& l, float step_value,
                         const float* step, float qn, float qp, float grad_scale, float* dv, float* dstep,
                         void* scratch) {
  if (dv == nullptr && dstep == nullptr) return cudaSuccess;
  const int64_t n = l.size();
  const int64_t nstep = l.per_channel ? l.channels : 1;
  if (n <= 0) {
    return dstep != nullptr ? cudaMemsetAsync(dstep, 0, sizeof(float) * static_cast<size_t>(nstep), stream)
                            : cudaSuccess;
  }
  const LsqBounds b{qn, qp};
  const double g = static_cast<double>(grad_scale);
  double* partial = dstep != nullptr ? static_cast<double*>(scratch) : nullptr;
  cudaError_t err = cudaSuccess;
  if (!l.per_channel) {
    const int grid = grid_for(n);
    const bool vec = aligned16(dy) && aligned16(v) && (dv == nullptr || aligned16(dv));
    lsq_backward_tensor_kernel<<<grid, kThreads, 0, stream>>>(dy, v, dv, n, vec, step_value, b, partial);
    err = cudaGetLastError();
    if (err == cudaSuccess && dstep != nullptr) err = launch_segment_sums(stream, partial, 1, 1, grid, g, dstep);
    return err;
  }
  const ChannelPlan p = plan_channels(l);
  if (p.rows) {
    const dim3 grid(static_cast<unsigned>(p.blocks_x), static_cast<unsigned>(std::min(l.channels, kMaxGridY)));
    lsq_backward_rows_kernel<<<grid, kThreads, 0, stream>>>(dy, v, dv, step, l.outer, l.channels, l.inner,
                                                            Divider(l.inner, l.outer * l.inner), b, partial);
    err = cudaGetLastError();
    if (err == cudaSuccess && dstep != nullptr)
      err = launch_segment_sums(stream, partial, 1, l.channels, p.blocks_x, g, dstep);
  } else {
    const int64_t cols = l.channels * l.inner;
    const dim3 grid(static_cast<unsigned>(p.blocks_x), static_cast<unsigned>(p.chunks));
    lsq_backward_cols_kernel<<<grid, kThreads, 0, stream>>>(dy, v, dv, step, l.outer, cols, l.inner, b, partial);
    err = cudaGetLastError();
    if (err == cudaSuccess && dstep != nullptr)
      err = launch_segment_sums(stream, partial, p.chunks, l.channels, l.inner, g, dstep);
  }
  return err;
}

}  // namespace cuda
}  // namespace onnxqat
