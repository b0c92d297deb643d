// Reductions for the CPU kernels: several independent accumulators per loop so that the latency of the
// floating-point add does not bound the throughput (strict IEEE arithmetic forbids the compiler to reassociate),
// written so that gcc vectorises the lanes (SLP).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>

namespace onnxqat {
namespace cpu {

constexpr int kLanes = 8;

// Elements of the stack blocks in which the kernels stage per-element factors before a dot product.
constexpr size_t kBlock = 512;

// Sum of double(f(i)) over [0, n).
template <class F>
inline double lane_sum(size_t n, F&& f) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(f(i + k));
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += static_cast<double>(f(i));
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// Sum of double(a[i]) * double(b[i]) over [0, n) (each product exact in double).
inline double dot_lanes(const float* a, const float* b, size_t n) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += static_cast<double>(a[i + k]) * static_cast<double>(b[i + k]);
  }
  for (int k = 0; i < n; ++i, ++k) acc[k] += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  double s = 0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

// Max of |x| over [0, n) (0 for n == 0); NaN elements are skipped (a > m is false). Written with GCC vector types:
// gcc does not vectorise the lane arrays of this reduction by itself (exact either way: max does not round).
inline float max_abs(const float* x, size_t n) {
#if defined(__GNUC__)
  typedef float v8f __attribute__((vector_size(32)));
  typedef int v8i __attribute__((vector_size(32)));
  const v8i mask = {0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff};
  v8f m0 = {0, 0, 0, 0, 0, 0, 0, 0};
  v8f m1 = m0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8i a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, x + i + 8, sizeof b);
    const v8f fa = reinterpret_cast<v8f>(a & mask);
    const v8f fb = reinterpret_cast<v8f>(b & mask);
    m0 = fa > m0 ? fa : m0;
    m1 = fb > m1 ? fb : m1;
  }
  float mm = 0.0f;
  for (int k = 0; k < 8; ++k) {
    mm = m0[k] > mm ? m0[k] : mm;
    mm = m1[k] > mm ? m1[k] : mm;
  }
  for (; i < n; ++i) {
    float a = std::fabs(x[i]);
    mm = a > mm ? a : mm;
  }
  return mm;
#else
  float m[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    float a[kLanes];
    for (int k = 0; k < kLanes; ++k) a[k] = std::fabs(x[i + k]);
    for (int k = 0; k < kLanes; ++k) m[k] = a[k] > m[k] ? a[k] : m[k];
  }
  for (; i < n; ++i) {
    float a = std::fabs(x[i]);
    m[0] = a > m[0] ? a : m[0];
  }
  float mm = 0.0f;
  for (int k = 0; k < kLanes; ++k) mm = m[k] > mm ? m[k] : mm;
  return mm;
#endif
}

}  // namespace cpu
}  // namespace onnxqat
