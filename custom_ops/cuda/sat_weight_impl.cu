// SAT weight quantizer kernels, with the CPU kernels' arithmetic (common/quant_math.h, onnxqat's tanh_f32; nvcc
// -fmad=false), so that they equal the numpy reference bit for bit. Passes: (1) M = max|tanh W| = tanh(max|W|)
// (tanh_f32 is odd and increasing: the pass is a plain max|W|, no tanh per element) as per-block partial maxima + a
// one-block final pass; (2) only with ApplyScaling: the variance of the levels as per-block sums + a final pass
// (DoReFa and symmetric: exact integer sums of the level indices; clamp, R > 65535: shifted double sums);
// (3) the elementwise output (and, when asked for, the derivative factor (1 - t^2) / (M S) in a second pass).
// M, S and M*S stay on the device (no host round trip). The backward with the forward's factor is one product.
#include "cuda/sat_weight_impl.cuh"

#include <cmath>

#include "common/quant_math.h"
#include "cuda/common.cuh"

namespace onnxqat {
namespace cuda {

namespace {

// Scratch layout: double stats[2 * kMaxBlocks] (int64 for the index sums) | float maxima[kMaxBlocks] | float consts[5].
// consts: [0] M, [1] K = level of W[0] (shift of the clamp-mode sums), [2] S, [3] M * S, [4] max|W| (NaN if any is).
struct Scratch {
  double* stats;
  float* maxima;
  float* consts;
  explicit Scratch(void* p)
      : stats(static_cast<double*>(p)),
        maxima(reinterpret_cast<float*>(stats + 2 * kMaxBlocks)),
        consts(maxima + kMaxBlocks) {}
};

SatWeightParams make_params(float range, int64_t mode) {
  SatWeightParams p;
  p.r = range;
  p.half = std::floor(range / 2.0f);
  p.mode = mode;
  return p;
}

__global__ void max_abs_kernel(const float* __restrict__ w, int64_t n, bool vec, float* __restrict__ maxima) {
  NanMaxOp op;
  float m = 0.0f;
  map1(w, nullptr, n, vec, [&](int64_t, float v) {
    m = op(m, fabsf(v));
    return 0.0f;
  });
  m = block_reduce(m, op, 0.0f);
  if (threadIdx.x == 0) maxima[blockIdx.x] = m;
}

// One block: M = tanh(max|W|) from the partial maxima of |W| (NaN stays NaN, then M = 1 as in the reference);
// K; S = 1 and M * S = M until the variance pass says otherwise.
__global__ void max_final_kernel(const float* __restrict__ maxima, int parts, const float* __restrict__ w,
                                 SatWeightParams p, float* __restrict__ consts) {
  NanMaxOp op;
  float m = 0.0f;
  for (int i = threadIdx.x; i < parts; i += blockDim.x) m = op(m, maxima[i]);
  m = block_reduce(m, op, 0.0f);
  if (threadIdx.x == 0) {
    const float t = tanh_f32(m);
    const float M = t > 0.0f ? t : 1.0f;  // reference: 1 when every weight is zero (or NaN)
    consts[0] = M;
    consts[1] = sat_weight_level(tanh_f32(w[0]) / M, p);
    consts[2] = 1.0f;
    consts[3] = M / sat_weight_grad_gain(p);
    consts[4] = m;
  }
}

// Per-block level sums: DoReFa and symmetric (R <= 65535) sum j and j^2 over the level indices j (int64, exact);
// clamp (and larger R) sums x - K and (x - K)^2 over the levels x in double (K = the first level keeps the sums small: no cancellation for a
// constant tensor).
__global__ void level_stats_kernel(const float* __restrict__ w, int64_t n, bool vec, SatWeightParams p,
                                   const float* __restrict__ consts, double* __restrict__ stats) {
  const float M = consts[0];
  if (sat_weight_index_sums(p.mode, p.r)) {
    long long j1 = 0;
    long long j2 = 0;
    map1(w, nullptr, n, vec, [&](int64_t, float v) {
      const long long j = static_cast<long long>(sat_weight_index(tanh_f32(v) / M, p));
      j1 += j;
      j2 += j * j;
      return 0.0f;
    });
    j1 = block_reduce(j1, SumOp{}, 0LL);
    j2 = block_reduce(j2, SumOp{}, 0LL);
    if (threadIdx.x == 0) {
      long long* out = reinterpret_cast<long long*>(stats);
      out[2 * blockIdx.x] = j1;
      out[2 * blockIdx.x + 1] = j2;
    }
    return;
  }
  const double K = consts[1];
  double s1 = 0.0;
  double s2 = 0.0;
  map1(w, nullptr, n, vec, [&](int64_t, float v) {
    const double d = static_cast<double>(sat_weight_level(tanh_f32(v) / M, p)) - K;
    s1 += d;
    s2 += d * d;
    return 0.0f;
  });
  s1 = block_reduce(s1, SumOp{}, 0.0);
  s2 = block_reduce(s2, SumOp{}, 0.0);
  if (threadIdx.x == 0) {
    stats[2 * blockIdx.x] = s1;
    stats[2 * blockIdx.x + 1] = s2;
  }
}

// One block: S = sqrt(fan_out * Var) with Bessel's correction in the operations of reference.py sat_weight_scale
// (DoReFa: Var(j) 4 / R^2, symmetric: Var(j) / floor(R/2)^2, Var(j) from the exact integer n sum j^2 - (sum j)^2;
// clamp and R > 65535: from the shifted sums); 1 if not > 0 or a weight is NaN.
__global__ void stats_final_kernel(const double* __restrict__ stats, int parts, int64_t n, int64_t fan_out,
                                   SatWeightParams p, float* __restrict__ consts) {
  const double nn = static_cast<double>(n);
  double var;
  if (sat_weight_index_sums(p.mode, p.r)) {
    const long long* in = reinterpret_cast<const long long*>(stats);
    long long j1 = 0;
    long long j2 = 0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) {
      j1 += in[2 * i];
      j2 += in[2 * i + 1];
    }
    j1 = block_reduce(j1, SumOp{}, 0LL);
    j2 = block_reduce(j2, SumOp{}, 0LL);
    const __int128 num = static_cast<__int128>(n) * j2 - static_cast<__int128>(j1) * j1;
    const double var_j = static_cast<double>(num) / (nn * static_cast<double>(n - 1));
    const double r = p.r, half = p.half;
    var = sat_weight_dorefa_levels(p.mode) ? var_j * 4.0 / (r * r) : var_j / (half * half);
  } else {
    double s1 = 0.0;
    double s2 = 0.0;
    for (int i = threadIdx.x; i < parts; i += blockDim.x) {
      s1 += stats[2 * i];
      s2 += stats[2 * i + 1];
    }
    s1 = block_reduce(s1, SumOp{}, 0.0);
    s2 = block_reduce(s2, SumOp{}, 0.0);
    var = (s2 - s1 * s1 / nn) / (nn - 1.0);
  }
  if (threadIdx.x == 0) {
    const float s = static_cast<float>(sqrt(static_cast<double>(fan_out) * var));
    const float S = (s > 0.0f && consts[4] == consts[4]) ? s : 1.0f;
    consts[2] = S;
    consts[3] = (consts[0] * S) / sat_weight_grad_gain(p);
  }
}

__global__ void sat_weight_forward_kernel(const float* __restrict__ w, float* __restrict__ wq, int64_t n, bool vec,
                                          SatWeightParams p, const float* __restrict__ consts) {
  const float M = consts[0];
  const float S = consts[2];
  map1(w, wq, n, vec, [&](int64_t, float v) { return sat_weight_level(tanh_f32(v) / M, p) / S; });
}

__global__ void sat_weight_factor_kernel(const float* __restrict__ w, float* __restrict__ d, int64_t n, bool vec,
                                         const float* __restrict__ consts) {
  const float ms = consts[3];
  map1(w, d, n, vec, [&](int64_t, float v) { return sat_weight_grad_factor(v, ms); });
}

__global__ void mul_kernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y, int64_t n,
                           bool vec) {
  map2(a, b, y, n, vec, [&](int64_t, float x, float f) { return x * f; });
}

__global__ void sat_weight_backward_kernel(const float* __restrict__ dwq, const float* __restrict__ w,
                                           float* __restrict__ dw, int64_t n, bool vec,
                                           const float* __restrict__ consts) {
  const float ms = consts[3];
  map2(dwq, w, dw, n, vec, [&](int64_t, float g, float v) { return sat_weight_grad(g, v, ms); });
}

// Passes (1) and (2): consts filled on the device.
cudaError_t compute_constants(cudaStream_t stream, const float* w, int64_t n, const SatWeightParams& p,
                              int64_t fan_out, const Scratch& s) {
  const int grid = grid_for(n);
  const bool vec = aligned16(w);
  max_abs_kernel<<<grid, kThreads, 0, stream>>>(w, n, vec, s.maxima);
  max_final_kernel<<<1, kThreads, 0, stream>>>(s.maxima, grid, w, p, s.consts);
  if (fan_out > 0 && n >= 2) {
    level_stats_kernel<<<grid, kThreads, 0, stream>>>(w, n, vec, p, s.consts, s.stats);
    stats_final_kernel<<<1, kThreads, 0, stream>>>(s.stats, grid, n, fan_out, p, s.consts);
  }
  return cudaGetLastError();
}

}  // namespace

size_t sat_weight_scratch_bytes() { return sizeof(double) * 2 * kMaxBlocks + sizeof(float) * (kMaxBlocks + 5); }

cudaError_t sat_weight_forward(cudaStream_t stream, const float* w, int64_t n, float range, int64_t mode,
                               int64_t fan_out, float* wq, float* dfactor, void* scratch) {
  if (n <= 0) return cudaSuccess;
  const SatWeightParams p = make_params(range, mode);
  const Scratch s(scratch);
  cudaError_t err = compute_constants(stream, w, n, p, fan_out, s);
  if (err != cudaSuccess) return err;
  sat_weight_forward_kernel<<<grid_for(n), kThreads, 0, stream>>>(w, wq, n, aligned16(w) && aligned16(wq), p,
                                                                   s.consts);
  if (dfactor != nullptr)
    sat_weight_factor_kernel<<<grid_for(n), kThreads, 0, stream>>>(w, dfactor, n, aligned16(w) && aligned16(dfactor),
                                                                    s.consts);
  return cudaGetLastError();
}

cudaError_t sat_weight_backward_factor(cudaStream_t stream, const float* dwq, const float* dfactor, int64_t n,
                                       float* dw) {
  if (n <= 0) return cudaSuccess;
  const bool vec = aligned16(dwq) && aligned16(dfactor) && aligned16(dw);
  mul_kernel<<<grid_for(n), kThreads, 0, stream>>>(dwq, dfactor, dw, n, vec);
  return cudaGetLastError();
}

cudaError_t sat_weight_backward(cudaStream_t stream, const float* dwq, const float* w, int64_t n, float range,
                                int64_t mode, int64_t fan_out, float* dw, void* scratch) {
  if (n <= 0) return cudaSuccess;
  const SatWeightParams p = make_params(range, mode);
  const Scratch s(scratch);
  cudaError_t err = compute_constants(stream, w, n, p, fan_out, s);
  if (err != cudaSuccess) return err;
  const bool vec = aligned16(dwq) && aligned16(w) && aligned16(dw);
  sat_weight_backward_kernel<<<grid_for(n), kThreads, 0, stream>>>(dwq, w, dw, n, vec, s.consts);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace onnxqat
