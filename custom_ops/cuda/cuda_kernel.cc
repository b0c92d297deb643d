#include "cuda/cuda_kernel.h"

#include "cuda/cuda_ops.h"

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

void CudaKernel::cuda_check(cudaError_t err, const char* what) const {
  if (err == cudaSuccess) return;
  throw CudaCallError(std::string(op_name()) + " node '" + node_name() + "': CUDA error in " + what + ": " +
                      cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
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
