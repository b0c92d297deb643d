// LsqQuant: the tensor v viewed as [outer, channels, inner] around the channel axis, from the shapes of v and step
// and the axis input; shared by the CPU and CUDA kernels (host code, no ORT types).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"

namespace onnxqat {

struct LsqLayout {
  int64_t outer = 1;
  int64_t channels = 1;  // 1 per tensor
  int64_t inner = 1;     // prod(v.shape[axis+1:]); all of v per tensor
  bool per_channel = false;
  int64_t size() const { return outer * channels * inner; }
};

// The layout for v and step, or the problem in words. The values of step are check_steps' (checks.h).
inline std::string lsq_layout(const std::vector<int64_t>& v_shape, const std::vector<int64_t>& step_shape,
                              int64_t axis_in, LsqLayout* out) {
  int64_t step_size = 1;
  for (int64_t d : step_shape) step_size *= d;
  int64_t n = 1;
  for (int64_t d : v_shape) n *= d;
  if (step_shape.size() > 1 || step_size == 0)
    return "step must have shape [] or [1] (per tensor) or [C] with C = v.shape[axis] (per channel), got shape " +
           shape_str(step_shape);
  LsqLayout l;
  if (step_size == 1) {
    l.outer = 1;
    l.channels = 1;
    l.inner = n;
    l.per_channel = false;
  } else {
    const int64_t rank = static_cast<int64_t>(v_shape.size());
    if (axis_in < -rank || axis_in >= rank || rank == 0)
      return "axis " + std::to_string(axis_in) + " is out of range for v of shape " + shape_str(v_shape);
    const int64_t axis = axis_in < 0 ? axis_in + rank : axis_in;
    if (step_size != v_shape[axis])
      return "per-channel step has " + std::to_string(step_size) + " elements but v.shape[" + std::to_string(axis) +
             "] = " + std::to_string(v_shape[axis]) + " (v shape " + shape_str(v_shape) + ")";
    l.outer = 1;
    for (int64_t d = 0; d < axis; ++d) l.outer *= v_shape[d];
    l.channels = step_size;
    l.inner = 1;
    for (int64_t d = axis + 1; d < rank; ++d) l.inner *= v_shape[d];
    l.per_channel = true;
  }
  *out = l;
  return {};
}

}  // namespace onnxqat
