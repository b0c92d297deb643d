// Host-side checks and geometry of the CUDA ops' arguments, shared by the ORT-facing kernels (*_def.cc) and the
// test entry point (c_api.cu). No ORT types. Messages are the CPU kernels' (common/checks.h, cpu/*.cc), so an
// invalid node fails with the same words on either provider. Each returns "" when the arguments are valid.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/checks.h"
#include "cuda/lsq_impl.cuh"

namespace onnxqat {
namespace cuda {

inline std::string check_sat_weight_args(float range, int64_t mode, int64_t fan_out) {
  std::string e = check_range(range);
  if (e.empty()) e = check_sat_mode(mode, range);
  if (e.empty()) e = check_fan_out(fan_out);
  return e;
}

inline std::string check_alpha_shape(const std::vector<int64_t>& shape, int64_t size) {
  if (size != 1 || shape.size() > 1) return "alpha must be a scalar of shape [] or [1], got shape " + shape_str(shape);
  return {};
}

// LSQ: step shape, axis and channel count -> layout of v. Values of step are checked by check_steps.
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

inline std::string check_steps(const float* step, int64_t size) {
  for (int64_t c = 0; c < size; ++c) {
    if (!std::isfinite(step[c]) || !(step[c] > 0.0f))
      return "step must be finite and > 0, got " + fmt_float(step[c]) +
             (size > 1 ? " at channel " + std::to_string(c) : std::string());
  }
  return {};
}

}  // namespace cuda
}  // namespace onnxqat
