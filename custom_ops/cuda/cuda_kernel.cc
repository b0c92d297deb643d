#include "cuda/cuda_kernel.h"

#include "cuda/cuda_ops.h"
#include "cuda/params.h"

namespace onnxqat {
namespace cuda {

Scratch::Scratch(Ort::KernelContext& ctx, int device_id, cudaStream_t stream, size_t bytes) : stream_(stream) {
  if (bytes == 0) return;
  try {
    Ort::MemoryInfo info("Cuda", OrtDeviceAllocator, device_id, OrtMemTypeDefault);
    const OrtMemoryInfo* mem = info;
    ort_ = ctx.GetAllocator(*mem);
    if (ort_ != nullptr) ptr_ = ort_->Alloc(ort_, bytes);
  } catch (const Ort::Exception&) {
    ort_ = nullptr;
  }
  if (ptr_ == nullptr) {
    if (ort_ != nullptr) {
      Ort::GetApi().ReleaseAllocator(ort_);
      ort_ = nullptr;
    }
    error_ = cudaMallocAsync(&ptr_, bytes, stream);
    if (error_ != cudaSuccess) ptr_ = nullptr;
  }
}

Scratch::~Scratch() {
  if (ptr_ == nullptr) return;
  if (ort_ != nullptr) {
    ort_->Free(ort_, ptr_);
    Ort::GetApi().ReleaseAllocator(ort_);
  } else {
    (void)cudaFreeAsync(ptr_, stream_);
  }
}

CudaKernel::CudaKernel(const OrtKernelInfo* info, const char* op_name) : op_(op_name) {
  try {
    node_ = Ort::ConstKernelInfo(info).GetNodeName();
  } catch (const Ort::Exception&) {
    node_ = "?";
  }
}

void CudaKernel::fail(const std::string& problem) const {
  throw OpError(std::string(op_) + " node '" + node_ + "': " + problem);
}

void CudaKernel::cuda_check(cudaError_t err, const char* what) const {
  if (err == cudaSuccess) return;
  throw CudaCallError(std::string(op_) + " node '" + node_ + "': CUDA error in " + what + ": " +
                      cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
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

Ort::ConstValue CudaKernel::input(Ort::KernelContext& ctx, size_t index, const char* name,
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

CudaKernel::DeviceIn CudaKernel::float_input(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  auto info = v.GetTensorTypeAndShapeInfo();
  DeviceIn in;
  in.shape = info.GetShape();
  in.size = static_cast<int64_t>(info.GetElementCount());
  in.data = v.GetTensorData<float>();
  in.device_id = v.GetTensorMemoryInfo().GetDeviceId();
  return in;
}

float CudaKernel::float_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, "float32");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementCount() != 1)
    fail(std::string("input '") + name + "' must be a scalar (one element), got shape " + shape_str(info.GetShape()));
  return v.GetTensorData<float>()[0];
}

int64_t CudaKernel::int_scalar(Ort::KernelContext& ctx, size_t index, const char* name) const {
  Ort::ConstValue v = input(ctx, index, name, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64, "int64");
  auto info = v.GetTensorTypeAndShapeInfo();
  if (info.GetElementCount() != 1)
    fail(std::string("input '") + name + "' must be a scalar (one element), got shape " + shape_str(info.GetShape()));
  return v.GetTensorData<int64_t>()[0];
}

float* CudaKernel::output(Ort::KernelContext& ctx, size_t index, const std::vector<int64_t>& shape) const {
  if (index >= ctx.GetOutputCount()) return nullptr;
  Ort::UnownedValue v = ctx.GetOutput(index, shape.data(), shape.size());
  if (!v) return nullptr;
  return v.GetTensorMutableData<float>();
}

cudaStream_t CudaKernel::stream(Ort::KernelContext& ctx, int device_id) const {
  int current = -1;
  cuda_check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device_id) cuda_check(cudaSetDevice(device_id), "cudaSetDevice");
  return static_cast<cudaStream_t>(ctx.GetGPUComputeStream());
}

std::vector<float> CudaKernel::to_host(const float* device, size_t n, cudaStream_t stream) const {
  std::vector<float> host(n);
  if (n == 0) return host;
  cuda_check(cudaMemcpyAsync(host.data(), device, n * sizeof(float), cudaMemcpyDeviceToHost, stream),
             "cudaMemcpyAsync (device to host)");
  cuda_check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  return host;
}

}  // namespace cuda
}  // namespace onnxqat

void AddCudaOps(Ort::CustomOpDomain& domain) {
  onnxqat::cuda::AddSatWeightOps(domain);
  onnxqat::cuda::AddSatActOps(domain);
  onnxqat::cuda::AddLsqOps(domain);
}
