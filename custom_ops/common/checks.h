// Validation of the per-node constant inputs, shared by the CPU and CUDA kernels (host code).
// Each returns an empty string when the value is valid, else the problem in words.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace onnxqat {

inline std::string fmt_float(float v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
  return buf;
}

// "[2, 3]": a shape as the messages write it.
inline std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

inline std::string check_range(float r) {
  if (!std::isfinite(r) || !(r >= 1.0f) || r > 16777216.0f)
    return "range R must be finite and in [1, 2^24], got " + fmt_float(r);
  return {};
}

inline std::string check_positive(const char* what, float v) {
  if (!std::isfinite(v) || !(v > 0.0f)) return std::string(what) + " must be finite and > 0, got " + fmt_float(v);
  return {};
}

inline std::string check_sat_mode(int64_t mode, float r) {
  if (mode < 0 || mode > 5)
    return "unknown mode " + std::to_string(mode) +
           " (0 = clamp, 1 = quantize/DoReFa, 2 = symmetric, 3 = full range, 4 = asymmetric, 5 = asymmetric clamp)";
  if ((mode == 2 || mode == 4 || mode == 5) && std::floor(r / 2.0f) < 1.0f)
    return "mode " + std::to_string(mode) + " (symmetric/asymmetric) needs range R >= 2 (floor(R/2) levels each side), "
           "got " + fmt_float(r);
  return {};
}

inline std::string check_fan_out(int64_t n) {
  if (n < 0) return "scale_fan_out must be >= 0 (0 = no ApplyScaling), got " + std::to_string(n);
  return {};
}

inline std::string check_signed(int64_t s) {
  if (s != 0 && s != 1) return "signed must be 0 or 1, got " + std::to_string(s);
  return {};
}

inline std::string check_finite(const char* what, float v) {
  if (!std::isfinite(v)) return std::string(what) + " must be finite, got " + fmt_float(v);
  return {};
}

// SatWeightQuant's range, mode and scale_fan_out, in that order (c_api.cu; the kernels check each as they read it).
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

// LsqQuant's step values (per tensor or per channel).
inline std::string check_steps(const float* step, int64_t size) {
  for (int64_t c = 0; c < size; ++c) {
    if (!std::isfinite(step[c]) || !(step[c] > 0.0f))
      return "step must be finite and > 0, got " + fmt_float(step[c]) +
             (size > 1 ? " at channel " + std::to_string(c) : std::string());
  }
  return {};
}

}  // namespace onnxqat
