#include "cpu/kernel_base.h"

namespace onnxqat {
namespace cpu {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

KernelBase::KernelBase(const OrtKernelInfo* info, const char* op_name) : op_(op_name) {
  try {
    node_ = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
    node_ = "?";
  }
}

void KernelBase::fail(const std::string& problem) const {
  throw OpError(std::string(op_) + " node '" + node_ + "': " + problem);
}

static const char* type_name_of(ONNXTensorElementDataType t) {
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

Ort::ConstValue KernelBase::input(Ort::KernelContext& ctx, size_t index, const char* name,
                                  ONNXTensorElementDataType type, const char* type_name) const {
  if (index >= ctx.GetInputCount()) fail(std::string("input '") + name + "' is missing");
  Ort::ConstValue v = ctx.GetInput(index);
  if (!v) fail(std::string("input '") + name + "' is missing");
  if (!v.IsTensor()) fail(std::string("input '") + name + "' must be a tensor");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementType() != type)
    fail(std::string("input '") + name + "' must be " + type_name + ", got " + type_name_of(info.GetElementType()));
  return v;
}

KernelBase::FloatIn KernelBase::float_input(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  auto info = v.GetTensorTypeAndShapeInfo();
  FloatIn in;
  in.shape = info.GetShape();
  in.size = info.GetElementCount();
  in.data = v.GetTensorData<float>();
  return in;
}

float KernelBase::float_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementCount() != 1)
    fail(std::string("input '") + name + "' must be a scalar (one element), got shape " + shape_str(info.GetShape()));
  return v.GetTensorData<float>()[0];
}

int64_t KernelBase::int_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementCount() != 1)
    fail(std::string("input '") + name + "' must be a scalar (one element), got shape " + shape_str(info.GetShape()));
  return v.GetTensorData<int64_t>()[0];
}

float* KernelBase::output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) const {
  if (index >= ctx.GetOutputCount()) return nullptr;
  Ort::UnownedValue v = ctx.GetOutput(index, shape.data(), shape.size());
  if (!v) return nullptr;
  return v.GetTensorMutableData<float>();
}

}  // namespace cpu
}  // namespace onnxqat
