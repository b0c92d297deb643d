// Reductions for the CPU kernels: several independent accumulators per loop so that the latency of the
// floating-point add does not bound the throughput (strict IEEE arithmetic forbids the compiler to reassociate),
// written so that gcc vectorises the lanes (SLP).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace onnxqat {
namespace cpu {

constexpr int kLanes = 8;

// Elements of the stack blocks in which the kernels stage per-element factors before a dot product.
constexpr size_t kBlock = 512;

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

// Adds the sum of d and of d^2, d = double(x[i]) - shift, over [0, n) to *sum and *sumsq: the variance in one pass
// without the cancellation of the plain sum of squares, given a shift near the mean (any element will do).
inline void shifted_sums(const float* x, size_t n, double shift, double* sum, double* sumsq) {
  double a[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  double b[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const double d = static_cast<double>(x[i + k]) - shift;
      a[k] += d;
      b[k] += d * d;
    }
  }
  for (int k = 0; i < n; ++i, ++k) {
    const double d = static_cast<double>(x[i]) - shift;
    a[k] += d;
    b[k] += d * d;
  }
  double s1 = 0, s2 = 0;
  for (int k = 0; k < kLanes; ++k) {
    s1 += a[k];
    s2 += b[k];
  }
  *sum += s1;
  *sumsq += s2;
}

// Adds the sum of j and of j^2 over [0, n) to *sum and *sumsq, j = x[i] (integers as float, |j| < 2^31).
inline void int_sums(const float* x, size_t n, int64_t* sum, int64_t* sumsq) {
  int64_t a = 0, b = 0;
  for (size_t i = 0; i < n; ++i) {
    const int64_t j = static_cast<int32_t>(x[i]);
    a += j;
    b += j * j;
  }
  *sum += a;
  *sumsq += b;
}

// Max of |x| over [0, n) (0 for n == 0), NaN if any element is NaN (as numpy's max). Taken on the bit patterns of
// |x| as integers: for non-negative floats the integer order is the float order, and every NaN pattern lies above
// inf's, so one integer max does both (gcc vectorises it; exact: max does not round).
inline float max_abs(const float* x, size_t n) {
  int32_t m = 0;  // integer max is associative: gcc vectorises the reduction itself
  for (size_t i = 0; i < n; ++i) {
    int32_t v;
    std::memcpy(&v, x + i, sizeof v);
    v &= 0x7fffffff;
    m = v > m ? v : m;
  }
  float r;
  std::memcpy(&r, &m, sizeof r);
  return r;
}

}  // namespace cpu
}  // namespace onnxqat
