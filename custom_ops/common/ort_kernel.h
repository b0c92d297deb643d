// ORT-facing parts shared by the CPU and CUDA kernels (host code, ORT C++ API): errors that name op and node, the
// checks every input gets (present, a tensor, the declared element type), scalar inputs, outputs, and the status a
// Compute call returns. Header-only so that the CUDA part still builds on its own (custom_ops/cuda/CMakeLists.txt).
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/checks.h"

namespace onnxqat {

// The ORT API version this library asks for and announces on every op: the runtime's (1.19), not the headers'
// (which may be newer; ORT 1.19 refuses an op that announces 21: "Unsupported version '21'").
constexpr uint32_t kOrtApiVersion = 19;

// An error whose message already names op and node; compute_with_status turns it into a status with `code`
// (invalid input unless said otherwise, e.g. a failed CUDA call).
struct OpError : std::runtime_error {
  explicit OpError(const std::string& message, OrtErrorCode error_code = ORT_INVALID_ARGUMENT)
      : std::runtime_error(message), code(error_code) {}
  OrtErrorCode code;
};

inline const char* element_type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return "bfloat16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    default: return "another type";
  }
}

// Base of cpu::KernelBase and cuda::CudaKernel, which add the float tensor input of their memory.
class OrtKernelBase {
 public:
  OrtKernelBase(const OrtKernelInfo* info, const char* op_name) : op_(op_name) {
    try {
      node_ = Ort::ConstKernelInfo(info).GetNodeName();
    } catch (const Ort::Exception&) {
      node_ = "?";
    }
  }

  // "<Op> node '<name>': <problem>" as an OpError.
  [[noreturn]] void fail(const std::string& problem) const {
    throw OpError(std::string(op_) + " node '" + node_ + "': " + problem);
  }
  void check(const std::string& problem) const {
    if (!problem.empty()) fail(problem);
  }

  // Scalars of the per-node constant inputs (host memory on either provider).
  float float_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
    return scalar<float>(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  }
  int64_t int_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
    return scalar<int64_t>(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64");
  }
  // Output `index` with `shape`, or nullptr when the node leaves that (optional) output out.
  float* output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) const {
    if (index >= ctx.GetOutputCount()) return nullptr;
    Ort::UnownedValue v = ctx.GetOutput(index, shape.data(), shape.size());
    if (!v) return nullptr;
    return v.GetTensorMutableData<float>();
  }

  const std::string& node_name() const { return node_; }
  const char* op_name() const { return op_; }

 protected:
  Ort::ConstValue input(Ort::KernelContext& ctx, size_t index, const char* name, ONNXTensorElementDataType type,
                        const char* type_name) const {
    if (index >= ctx.GetInputCount()) fail(std::string("input '") + name + "' is missing");
    Ort::ConstValue v = ctx.GetInput(index);
    if (!v) fail(std::string("input '") + name + "' is missing");
    if (!v.IsTensor()) fail(std::string("input '") + name + "' must be a tensor");
    const ONNXTensorElementDataType got = v.GetTensorTypeAndShapeInfo().GetElementType();
    if (got != type)
      fail(std::string("input '") + name + "' must be " + type_name + ", got " + element_type_name(got));
    return v;
  }

 private:
  template <class T>
  T scalar(Ort::KernelContext& ctx, size_t index, const char* name, ONNXTensorElementDataType type,
           const char* type_name) const {
    Ort::ConstValue v = input(ctx, index, name, type, type_name);
    auto info = v.GetTensorTypeAndShapeInfo();
    if (info.GetElementCount() != 1)
      fail(std::string("input '") + name + "' must be a scalar (one element), got shape " + shape_str(info.GetShape()));
    return v.GetTensorData<T>()[0];
  }

  std::string node_;
  const char* op_;
};

// ComputeV2 body: runs kernel->Compute and turns any exception into an ORT status naming op and node (the prefix
// is built only on the error paths: Compute runs once per node and step).
template <class K>
OrtStatusPtr compute_with_status(K* kernel, OrtKernelContext* context) {
  const OrtApi& api = Ort::GetApi();
  auto named = [kernel](const char* problem) {
    return std::string(kernel->op_name()) + " node '" + kernel->node_name() + "': " + problem;
  };
  try {
    Ort::KernelContext ctx(context);
    kernel->Compute(ctx);
    return nullptr;
  } catch (const OpError& e) {
    return api.CreateStatus(e.code, e.what());
  } catch (const Ort::Exception& e) {
    return api.CreateStatus(e.GetOrtErrorCode(), named(e.what()).c_str());
  } catch (const std::exception& e) {
    return api.CreateStatus(ORT_RUNTIME_EXCEPTION, named(e.what()).c_str());
  } catch (...) {
    return api.CreateStatus(ORT_RUNTIME_EXCEPTION, named("unknown error").c_str());
  }
}

// What the CPU and CUDA descriptors of a kernel K (cpu::CpuOp, cuda::CudaOp) share: name, input and output counts
// and types, which of them are required, and kernel creation. Op is the final descriptor (Ort::CustomOpBase calls
// its methods) and names its provider in kernel-creation errors with Op::kProviderLabel. K provides kName,
// kNumInputs, kNumOutputs, kNumRequiredInputs and kNumRequiredOutputs (inputs/outputs [0, n) are required, the rest
// optional), static InputType(i), a constructor (const OrtKernelInfo*) and ComputeV2 (StatusKernel).
template <class Op, class K>
struct OpDescriptor : Ort::CustomOpBase<Op, K, /*WithStatus=*/true> {
  OpDescriptor() {
    OrtCustomOp::version = kOrtApiVersion;
    OrtCustomOp::CreateKernel = nullptr;
    OrtCustomOp::KernelCompute = nullptr;
  }
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const {
    try {
      *kernel = new K(info);
      return nullptr;
    } catch (const std::exception& e) {
      std::string msg = std::string(K::kName) + Op::kProviderLabel + ": cannot create kernel: " + e.what();
      return api.CreateStatus(ORT_RUNTIME_EXCEPTION, msg.c_str());
    }
  }
  const char* GetName() const { return K::kName; }
  size_t GetInputTypeCount() const { return K::kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return K::InputType(i); }
  size_t GetOutputTypeCount() const { return K::kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return i < K::kNumRequiredInputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t i) const {
    return i < K::kNumRequiredOutputs ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  }
};

}  // namespace onnxqat
