// The per-node constant inputs of SatWeightQuant(Grad) and LsqQuant(Grad), read and checked by the CPU and CUDA
// kernels alike: same order, same messages (host code; these inputs are in host memory on either provider).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/checks.h"
#include "common/ort_kernel.h"
#include "common/quant_math.h"

namespace onnxqat {

struct SatWeightArgs {
  float r;  // range R
  int64_t mode;
  int64_t fan_out;
};

// range, mode, scale_fan_out: inputs first, first + 1, first + 2.
inline SatWeightArgs read_sat_weight_args(const OrtKernelBase& k, Ort::KernelContext& ctx, size_t first) {
  SatWeightArgs a;
  a.r = k.float_scalar(ctx, first, "range");
  k.check(check_range(a.r));
  a.mode = k.int_scalar(ctx, first + 1, "mode");
  k.check(check_sat_mode(a.mode, a.r));
  a.fan_out = k.int_scalar(ctx, first + 2, "scale_fan_out");
  k.check(check_fan_out(a.fan_out));
  return a;
}

struct LsqConstants {
  LsqBounds bounds;
  float g;       // grad_scale
  int64_t axis;  // as given (checked against v and step by lsq_layout)
};

// range, signed, grad_scale, axis: inputs first .. first + 3 (the inputs after step).
inline LsqConstants read_lsq_constants(const OrtKernelBase& k, Ort::KernelContext& ctx, size_t first) {
  LsqConstants c;
  const float r = k.float_scalar(ctx, first, "range");
  k.check(check_range(r));
  const int64_t sgn = k.int_scalar(ctx, first + 1, "signed");
  k.check(check_signed(sgn));
  c.g = k.float_scalar(ctx, first + 2, "grad_scale");
  k.check(check_finite("grad_scale", c.g));
  c.axis = k.int_scalar(ctx, first + 3, "axis");
  c.bounds = lsq_bounds(r, sgn == 1);
  return c;
}

}  // namespace onnxqat
