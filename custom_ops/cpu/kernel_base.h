// Infrastructure of the CPU kernels: input access (over common/ort_kernel.h), chunked parallel loops on ORT's
// intra-op thread pool, and the OrtCustomOp descriptor template.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/ort_kernel.h"

namespace onnxqat {
namespace cpu {

// Elements per parallel task: n/8 clamped to [16K, 64K] floats (64-256 KiB), a multiple of 64: mid-size tensors
// (an MLP's activations) still split across threads, large ones keep the scheduling overhead negligible. It
// depends on n only, so the results (the order of the partial sums) do not depend on the number of threads.
inline size_t chunk_len(size_t n) {
  constexpr size_t lo = size_t{1} << 14, hi = size_t{1} << 16;
  size_t c = (n / 8 + 63) & ~size_t{63};
  return c < lo ? lo : (c > hi ? hi : c);
}

// OrtKernelBase (common/ort_kernel.h) with the float tensor input in host memory.
class KernelBase : public OrtKernelBase {
 public:
  using OrtKernelBase::OrtKernelBase;

  struct FloatIn {
    const float* data;
    std::vector<int64_t> shape;
    size_t size;
  };
  FloatIn float_input(Ort::KernelContext& ctx, size_t index, const char* name) const {
    Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
    auto info = v.GetTensorTypeAndShapeInfo();
    return FloatIn{v.GetTensorData<float>(), info.GetShape(), info.GetElementCount()};
  }
};

// Number of tasks for n elements.
inline size_t num_chunks(size_t n) { return n == 0 ? 0 : (n + chunk_len(n) - 1) / chunk_len(n); }

// Runs f(task) for task in [0, tasks) on ORT's intra-op pool (KernelContext_ParallelFor, API 17+), serially where
// the pool or the API entry is missing. f must not throw.
template <class F>
void parallel_for(Ort::KernelContext& ctx, size_t tasks, F&& f) {
  if (tasks == 0) return;
#if ORT_API_VERSION >= 17
  if (tasks > 1 && Ort::GetApi().KernelContext_ParallelFor != nullptr) {
    using Fn = std::remove_reference_t<F>;
    auto trampoline = [](void* data, size_t i) { (*static_cast<Fn*>(data))(i); };
    ctx.ParallelFor(trampoline, tasks, 0, static_cast<void*>(&f));
    return;
  }
#endif
  (void)ctx;
  for (size_t i = 0; i < tasks; ++i) f(i);
}

// Shape inference (API 17+): output k has the shape of input K::ShapeSource(k) (SIZE_MAX: none), when that shape is known (rank >= 1,
// every dimension a value or a name). An input without shape information looks like a scalar through this API,
// so rank 0 is left unset (unknown) rather than claimed. Never throws.
template <class K>
OrtStatusPtr ORT_API_CALL infer_output_shapes(const OrtCustomOp*, OrtShapeInferContext* ctx) {
#if ORT_API_VERSION >= 17
  const OrtApi& api = Ort::GetApi();
  if (api.ShapeInferContext_GetInputCount == nullptr) return nullptr;
  try {
    size_t n_in = 0;
    if (OrtStatus* st = api.ShapeInferContext_GetInputCount(ctx, &n_in)) {
      api.ReleaseStatus(st);
      return nullptr;
    }
    for (size_t k = 0; k < K::kNumOutputs; ++k) {
      const size_t src = K::ShapeSource(k);
      if (src >= n_in) continue;
      OrtTensorTypeAndShapeInfo* info = nullptr;
      if (OrtStatus* st = api.ShapeInferContext_GetInputTypeShape(ctx, src, &info)) {
        api.ReleaseStatus(st);
        continue;
      }
      // info belongs to the context: read it through the C API, never release it
      size_t rank = 0;
      if (OrtStatus* st = api.GetDimensionsCount(info, &rank)) {
        api.ReleaseStatus(st);
        continue;
      }
      if (rank == 0) continue;
      std::vector<int64_t> dims(rank);
      std::vector<const char*> names(rank, nullptr);
      OrtStatus* rd = api.GetDimensions(info, dims.data(), rank);
      if (!rd) rd = api.GetSymbolicDimensions(info, names.data(), rank);
      if (rd) {
        api.ReleaseStatus(rd);
        continue;
      }
      bool known = true;
      for (size_t d = 0; d < dims.size(); ++d) {
        const bool named = names[d] != nullptr && names[d][0] != '\0';
        if (!named && dims[d] < 0) known = false;
        if (!named) names[d] = "";
      }
      if (!known) continue;
      OrtTensorTypeAndShapeInfo* out = nullptr;
      if (OrtStatus* st = api.CreateTensorTypeAndShapeInfo(&out)) {
        api.ReleaseStatus(st);
        continue;
      }
      Ort::TensorTypeAndShapeInfo out_info(out);
      OrtStatus* st = api.SetTensorElementType(out, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
      if (!st) st = api.SetDimensions(out, dims.data(), dims.size());
      if (!st) st = api.SetSymbolicDimensions(out, names.data(), names.size());
      if (!st) st = api.ShapeInferContext_SetOutputTypeShape(ctx, k, out);
      if (st) api.ReleaseStatus(st);
    }
  } catch (...) {
  }
#else
  (void)ctx;
#endif
  return nullptr;
}

// CPU descriptor of kernel K: OpDescriptor (common/ort_kernel.h) with shape inference from K::ShapeSource.
template <class K>
struct CpuOp : OpDescriptor<CpuOp<K>, K> {
  static constexpr const char* kProviderLabel = "";
  CpuOp() {
#if ORT_API_VERSION >= 17
    OrtCustomOp::InferOutputShapeFn = &infer_output_shapes<K>;
#endif
  }
};

// Kernel mix-in: the ComputeV2 entry CustomOpBase<..., true> calls.
template <class Derived>
struct StatusKernel : KernelBase {
  using KernelBase::KernelBase;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return compute_with_status(static_cast<Derived*>(this), context);
  }
};

// Registration entry points of the three op families (cpu/*.cc).
void AddSatWeightOps(Ort::CustomOpDomain& domain);
void AddSatActOps(Ort::CustomOpDomain& domain);
void AddLsqOps(Ort::CustomOpDomain& domain);

}  // namespace cpu
}  // namespace onnxqat
