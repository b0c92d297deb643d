// Reductions for the CPU kernels: several independent accumulators per loop so that the latency of the
// floating-point add does not bound the throughput (strict IEEE arithmetic forbids the compiler to reassociate).
#pragma once

#include <cmath>
#include <cstddef>

namespace onnxqat {
namespace cpu {

constexpr int kLanes = 8;

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

}  // namespace cpu
}  // namespace onnxqat
