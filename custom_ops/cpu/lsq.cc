// LsqQuant / LsqQuantGrad (LSQ, per-tensor or per-channel step; quantizer-math.md).
#include <algorithm>
#include <cmath>

#include "common/checks.h"
#include "common/lsq_layout.h"
#include "common/op_inputs.h"
#include "common/quant_math.h"
#include "cpu/kernel_base.h"
#include "cpu/loops.h"

namespace onnxqat {
namespace cpu {
namespace {

struct LsqParams {
  const float* step;
  std::vector<int64_t> step_shape;
  size_t channels;  // 1 per tensor
  size_t inner;     // elements of one channel row: prod(v.shape[axis+1:]) (n per tensor)
  LsqBounds bounds;
  float g;
};

LsqParams read_params(const KernelBase& k, Ort::KernelContext& ctx, size_t first, const KernelBase::FloatIn& v) {
  LsqParams p;
  KernelBase::FloatIn step = k.float_input(ctx, first, "step");
  const LsqConstants c = read_lsq_constants(k, ctx, first + 1);
  p.bounds = c.bounds;
  p.g = c.g;
  p.step = step.data;
  p.step_shape = step.shape;
  LsqLayout layout;
  k.check(lsq_layout(v.shape, step.shape, c.axis, &layout));
  p.channels = static_cast<size_t>(layout.channels);
  p.inner = static_cast<size_t>(layout.inner);
  k.check(check_steps(step.data, static_cast<int64_t>(step.size)));
  return p;
}

// Calls seg(begin, end, channel) for the runs of one channel inside the flat range [b, e) (inner > 1 or one
// channel; the channel-last layout goes through the *_rows loops).
template <class Seg>
inline void for_segments(size_t b, size_t e, const LsqParams& p, Seg&& seg) {
  if (p.channels == 1) {
    seg(b, e, size_t{0});
    return;
  }
  size_t i = b;
  while (i < e) {
    const size_t row = i / p.inner;
    const size_t end = std::min(e, (row + 1) * p.inner);
    seg(i, end, row % p.channels);
    i = end;
  }
}

// LsqQuantGrad keeps C double partial sums of dstep per task. For large C, fewer (longer) tasks keep them under
// 2^22 doubles (32 MiB): `items` (rows or elements) are split into *tasks tasks of *per items each.
void bound_partials(size_t items, size_t C, size_t* tasks, size_t* per) {
  constexpr size_t max_partials = size_t{1} << 22;
  if (*tasks <= 1 || *tasks * C <= max_partials) return;
  *tasks = std::max<size_t>(1, max_partials / C);
  *per = (items + *tasks - 1) / *tasks;
  *tasks = (items + *per - 1) / *per;
}

// dstep[ch] = float(g * sum of the tasks' partials of channel ch), summed in task order (thread-count independent).
void reduce_dstep(const std::vector<double>& part, size_t tasks, size_t C, float g, float* dstep) {
  const double gs = static_cast<double>(g);
  for (size_t ch = 0; ch < C; ++ch) {
    double s = 0;
    for (size_t t = 0; t < tasks; ++t) s += part[t * C + ch];
    dstep[ch] = static_cast<float>(gs * s);
  }
}

struct LsqKernel : StatusKernel<LsqKernel> {
  static constexpr const char* kName = "LsqQuant";
  static constexpr size_t kNumInputs = 6;
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 1;
  static constexpr size_t kNumRequiredOutputs = kNumOutputs;
  static size_t ShapeSource(size_t) { return 0; }
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i == 3 || i == 5) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit LsqKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn v = float_input(ctx, 0, "v");
    LsqParams p = read_params(*this, ctx, 1, v);
    float* y = output(ctx, 0, v.shape);
    const size_t n = v.size;
    if (n == 0 || y == nullptr) return;
    const float* vd = v.data;
    const LsqBounds bd = p.bounds;
    if (p.channels > 1 && p.inner == 1) {  // channel axis last: whole rows, step indexed by column
      const size_t C = p.channels, rows = n / C;
      const size_t per_task = std::max<size_t>(1, chunk_len(n) / C);
      parallel_for(ctx, (rows + per_task - 1) / per_task, [&](size_t t) {
        const size_t r0 = t * per_task, r1 = std::min(rows, r0 + per_task);
        lsq_forward_rows(vd + r0 * C, y + r0 * C, r1 - r0, C, p.step, bd.qn, bd.qp);
      });
      return;
    }
    parallel_for(ctx, num_chunks(n), [&](size_t c) {
      const size_t b = c * chunk_len(n), e = std::min(n, b + chunk_len(n));
      for_segments(b, e, p, [&](size_t sb, size_t se, size_t ch) {
        lsq_forward_loop(vd + sb, y + sb, se - sb, p.step[ch], bd.qn, bd.qp);
      });
    });
  }
};

struct LsqGradKernel : StatusKernel<LsqGradKernel> {
  static constexpr const char* kName = "LsqQuantGrad";
  static constexpr size_t kNumInputs = 7;   // dy, v, step, range, signed, grad_scale, axis
  static constexpr size_t kNumRequiredInputs = kNumInputs;
  static constexpr size_t kNumOutputs = 2;  // dv, dstep
  static constexpr size_t kNumRequiredOutputs = 0;
  static size_t ShapeSource(size_t k) { return k + 1; }  // GI(k) is shaped like forward input k
  static ONNXTensorElementDataType InputType(size_t i) {
    return (i == 4 || i == 6) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  explicit LsqGradKernel(const OrtKernelInfo* info) : StatusKernel(info, kName) {}

  void Compute(Ort::KernelContext& ctx) {
    FloatIn dy = float_input(ctx, 0, "dy");
    FloatIn v = float_input(ctx, 1, "v");
    LsqParams p = read_params(*this, ctx, 2, v);
    if (dy.shape != v.shape)
      fail("gradient dy has shape " + shape_str(dy.shape) + " but v has shape " + shape_str(v.shape));
    float* dv = output(ctx, 0, v.shape);
    float* dstep = output(ctx, 1, p.step_shape);
    if (dv == nullptr && dstep == nullptr) return;
    const size_t n = v.size;
    const size_t C = p.channels;
    const float* vd = v.data;
    const float* g = dy.data;
    const LsqBounds bd = p.bounds;

    if (C > 1 && p.inner == 1) {  // channel axis last: whole rows, step indexed by column
      const size_t rows = n / C;
      size_t per_task = std::max<size_t>(1, chunk_len(n) / C);
      size_t tasks = (rows + per_task - 1) / per_task;
      if (dstep != nullptr) bound_partials(rows, C, &tasks, &per_task);
      std::vector<double> part(dstep != nullptr ? tasks * C : 0, 0.0);
      parallel_for(ctx, tasks, [&](size_t t) {
        const size_t r0 = t * per_task, r1 = std::min(rows, r0 + per_task);
        lsq_grad_rows(g + r0 * C, vd + r0 * C, dv != nullptr ? dv + r0 * C : nullptr, r1 - r0, C, p.step, bd.qn,
                      bd.qp, dstep != nullptr ? part.data() + t * C : nullptr);
      });
      if (dstep != nullptr) reduce_dstep(part, tasks, C, p.g, dstep);
      return;
    }

    size_t tasks = num_chunks(n);
    size_t chunk = chunk_len(n);
    if (dstep != nullptr) bound_partials(n, C, &tasks, &chunk);
    std::vector<double> part(dstep != nullptr ? tasks * C : 0, 0.0);
    parallel_for(ctx, tasks, [&](size_t t) {
      const size_t b = t * chunk, e = std::min(n, b + chunk);
      double* acc = dstep != nullptr ? part.data() + t * C : nullptr;
      for_segments(b, e, p, [&](size_t sb, size_t se, size_t ch) {
        const float s = p.step[ch];
        if (acc == nullptr) {
          lsq_dv_loop(g + sb, vd + sb, dv + sb, se - sb, s, bd.qn, bd.qp);
          return;
        }
        acc[ch] += lsq_grad_loop(g + sb, vd + sb, dv != nullptr ? dv + sb : nullptr, se - sb, s, bd.qn, bd.qp);
      });
    });
    if (dstep != nullptr) reduce_dstep(part, tasks, C, p.g, dstep);
  }
};

}  // namespace

void AddLsqOps(Ort::CustomOpDomain& domain) {
  static CpuOp<LsqKernel> fwd;
  static CpuOp<LsqGradKernel> bwd;
  domain.Add(&fwd);
  domain.Add(&bwd);
}

}  // namespace cpu
}  // namespace onnxqat
