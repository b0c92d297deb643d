// ORT-facing infrastructure of the CUDA kernels: errors that name op and node (CUDA errors included), inputs on the
// device or (per-node constants) in host memory, the compute stream, scratch memory from ORT's CUDA allocator, and
// the OrtCustomOp descriptor (CUDAExecutionProvider, op version 19). Mirrors cpu/kernel_base.h; what both share is common/ort_kernel.h.
#pragma once

#include <cuda_runtime.h>
#include <onnxruntime_cxx_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/ort_kernel.h"

namespace onnxqat {
namespace cuda {

struct CudaCallError : OpError {  // a CUDA call failed: ORT_EP_FAIL
  explicit CudaCallError(const std::string& message) : OpError(message, ORT_EP_FAIL) {}
};

// Device scratch memory for one Compute call: from ORT's allocator of the device (its arena), else
// cudaMallocAsync on the stream. Freed at scope exit; stream order makes that safe for the queued kernels.
class Scratch {
 public:
  Scratch(Ort::KernelContext& ctx, int device_id, cudaStream_t stream, size_t bytes);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  void* get() const { return ptr_; }
  cudaError_t error() const { return error_; }

 private:
  OrtAllocator* ort_ = nullptr;
  cudaStream_t stream_ = nullptr;
  void* ptr_ = nullptr;
  cudaError_t error_ = cudaSuccess;
};

// OrtKernelBase (common/ort_kernel.h) with float tensor inputs on the device, CUDA errors and the stream.
class CudaKernel : public OrtKernelBase {
 public:
  using OrtKernelBase::OrtKernelBase;

  // Throws CudaCallError "<Op> node '<name>': CUDA error in <what>: <cuda message>" unless err is cudaSuccess.
  void cuda_check(cudaError_t err, const char* what) const;

  struct DeviceIn {
    const float* data;
    std::vector<int64_t> shape;
    int64_t size;
    int device_id;
  };
  DeviceIn float_input(Ort::KernelContext& ctx, size_t index, const char* name) const;
  // The compute stream ORT hands the kernel; makes the input's device current.
  cudaStream_t stream(Ort::KernelContext& ctx, int device_id) const;
  // Copies n device floats to the host (waits for the stream: alpha/step values are checked on the host).
  std::vector<float> to_host(const float* device, size_t n, cudaStream_t stream) const;
};

template <class Derived>
struct StatusKernel : CudaKernel {
  using CudaKernel::CudaKernel;
  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return compute_with_status(static_cast<Derived*>(this), context);
  }
};

// CUDA descriptor of kernel K: OpDescriptor (common/ort_kernel.h) for the CUDAExecutionProvider, with
// K::OnHost(i): whether input i is a per-node constant read on the host. K's required counts must equal the CPU
// kernel's: both register the same op in one domain.
template <class K>
struct CudaOp : OpDescriptor<CudaOp<K>, K> {
  static constexpr const char* kProviderLabel = " (CUDA)";
  const char* GetExecutionProviderType() const { return "CUDAExecutionProvider"; }
  OrtMemType GetInputMemoryType(size_t i) const { return K::OnHost(i) ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
};

// Registration of the three op families (*_def.cc).
void AddSatWeightOps(Ort::CustomOpDomain& domain);
void AddSatActOps(Ort::CustomOpDomain& domain);
void AddLsqOps(Ort::CustomOpDomain& domain);

}  // namespace cuda
}  // namespace onnxqat
