// Entry point of the CUDA kernels, called by RegisterCustomOps (custom_ops/register.cc) when the library is built
// with ONNXQAT_WITH_CUDA: adds the six quantizer ops for the CUDAExecutionProvider to the com.onnxqat domain, beside
// the CPU kernels of the same names.
#pragma once

namespace Ort {
struct CustomOpDomain;
}

void AddCudaOps(Ort::CustomOpDomain& domain);
