// Entry point of libonnxqat_ops.so: RegisterCustomOps adds the quantizer ops (domain com.onnxqat) to a session.
#include <onnxruntime_cxx_api.h>

#include <mutex>
#include <string>

#include "cpu/kernel_base.h"

#ifdef ONNXQAT_WITH_CUDA
#include "cuda/cuda_ops.h"
#endif

namespace {
constexpr const char* kDomain = "com.onnxqat";
}

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(onnxqat::kOrtApiVersion);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    std::string msg = std::string("libonnxqat_ops needs onnxruntime >= 1.19 (ORT API 19), this runtime is ") +
                      api_base->GetVersionString();
    return api1->CreateStatus(ORT_FAIL, msg.c_str());
  }
  Ort::InitApi(api);
  // The domain and its ops live for the whole process: ORT keeps pointers to them.
  static Ort::CustomOpDomain* domain = nullptr;
  static std::once_flag once;
  try {
    std::call_once(once, [] {
      auto* d = new Ort::CustomOpDomain(kDomain);
      onnxqat::cpu::AddSatWeightOps(*d);
      onnxqat::cpu::AddSatActOps(*d);
      onnxqat::cpu::AddLsqOps(*d);
#ifdef ONNXQAT_WITH_CUDA
      AddCudaOps(*d);
#endif
      domain = d;
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return api->CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return api->CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
