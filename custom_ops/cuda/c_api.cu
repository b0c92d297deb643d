// libonnxqat_cuda_kernels.so (c_api.h): host-pointer harness and benchmark around the launchers, no onnxruntime.
#include "cuda/c_api.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "common/checks.h"
#include "common/quant_math.h"
#include "cuda/lsq_impl.cuh"
#include "cuda/sat_act_impl.cuh"
#include "cuda/sat_weight_impl.cuh"

namespace {

using namespace onnxqat;
using namespace onnxqat::cuda;

thread_local std::string g_error;
bool g_misaligned = false;

struct Failure {
  int code;
};

[[noreturn]] void invalid(const char* op, const std::string& problem) {
  g_error = std::string(op) + ": " + problem;
  throw Failure{OQC_INVALID_ARGUMENT};
}
void check(const char* op, const std::string& problem) {
  if (!problem.empty()) invalid(op, problem);
}
void cuda_ok(const char* op, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  g_error = std::string(op) + ": CUDA error in " + what + ": " + cudaGetErrorName(err) + " (" +
            cudaGetErrorString(err) + ")";
  throw Failure{OQC_CUDA_ERROR};
}

// Device memory for the duration of one call (optionally 4 bytes past a 16-byte boundary).
class DeviceBuffer {
 public:
  DeviceBuffer(const char* op, size_t bytes, bool misalign) {
    cuda_ok(op, cudaMalloc(&base_, bytes + 16), "cudaMalloc");
    ptr_ = static_cast<char*>(base_) + (misalign ? 4 : 0);
  }
  ~DeviceBuffer() { cudaFree(base_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  float* f() const { return reinterpret_cast<float*>(ptr_); }
  void* get() const { return ptr_; }

 private:
  void* base_ = nullptr;
  void* ptr_ = nullptr;
};

class Stream {
 public:
  explicit Stream(const char* op) { cuda_ok(op, cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking), "stream"); }
  ~Stream() { cudaStreamDestroy(s_); }
  operator cudaStream_t() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

size_t bytes_of(int64_t n) { return sizeof(float) * static_cast<size_t>(n > 0 ? n : 0); }

void upload(const char* op, const DeviceBuffer& d, const float* h, int64_t n, cudaStream_t s) {
  if (n > 0) cuda_ok(op, cudaMemcpyAsync(d.get(), h, bytes_of(n), cudaMemcpyHostToDevice, s), "cudaMemcpyAsync");
}
void download(const char* op, float* h, const DeviceBuffer& d, int64_t n, cudaStream_t s) {
  if (n > 0 && h != nullptr)
    cuda_ok(op, cudaMemcpyAsync(h, d.get(), bytes_of(n), cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync");
}

std::vector<int64_t> shape_of(const int64_t* p, int32_t ndim) {
  return ndim > 0 ? std::vector<int64_t>(p, p + ndim) : std::vector<int64_t>{};
}

template <class F>
int guarded(F&& f) {
  g_error.clear();
  try {
    f();
    return OQC_OK;
  } catch (const Failure& e) {
    return e.code;
  } catch (const std::exception& e) {
    g_error = e.what();
    return OQC_CUDA_ERROR;
  }
}

int sat_weight_call(const char* op, const float* dwq, const float* w, int64_t n, float range, int64_t mode,
                    int64_t fan_out, float* out) {
  return guarded([&] {
    check(op, check_sat_weight_args(range, mode, fan_out));
    if (n <= 0) return;
    Stream s(op);
    DeviceBuffer dw_in(op, bytes_of(n), g_misaligned), dd(op, bytes_of(n), g_misaligned),
        dout(op, bytes_of(n), g_misaligned), scratch(op, sat_weight_scratch_bytes(), false);
    upload(op, dw_in, w, n, s);
    if (dwq != nullptr) {
      upload(op, dd, dwq, n, s);
      cuda_ok(op, sat_weight_backward(s, dd.f(), dw_in.f(), n, range, mode, fan_out, dout.f(), scratch.get()),
              "kernel launch");
    } else {
      cuda_ok(op, sat_weight_forward(s, dw_in.f(), n, range, mode, fan_out, dout.f(), scratch.get()),
              "kernel launch");
    }
    download(op, out, dout, n, s);
    cuda_ok(op, cudaStreamSynchronize(s), "kernel execution");
  });
}

}  // namespace

extern "C" {

const char* oqc_last_error(void) { return g_error.c_str(); }

int oqc_device_count(int* count) {
  return guarded([&] {
    *count = 0;
    int c = 0;
    cuda_ok("oqc_device_count", cudaGetDeviceCount(&c), "cudaGetDeviceCount");
    *count = c;
  });
}

int oqc_device_name(char* buf, int32_t size) {
  return guarded([&] {
    cudaDeviceProp prop;
    cuda_ok("oqc_device_name", cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
    std::snprintf(buf, static_cast<size_t>(size), "%s (sm_%d%d, %d SMs)", prop.name, prop.major, prop.minor,
                  prop.multiProcessorCount);
  });
}

void oqc_set_misaligned(int32_t on) { g_misaligned = on != 0; }

int oqc_sat_weight_forward(const float* w, int64_t n, float range, int64_t mode, int64_t fan_out, float* wq) {
  return sat_weight_call("SatWeightQuant", nullptr, w, n, range, mode, fan_out, wq);
}

int oqc_sat_weight_backward(const float* dwq, const float* w, int64_t n, float range, int64_t mode, int64_t fan_out,
                            float* dw) {
  return sat_weight_call("SatWeightQuantGrad", dwq, w, n, range, mode, fan_out, dw);
}

int oqc_sat_act_forward(const float* x, int64_t n, const float* alpha, const int64_t* alpha_shape, int32_t alpha_ndim,
                        float range, float* y) {
  const char* op = "SatActQuant";
  return guarded([&] {
    const std::vector<int64_t> ashape = shape_of(alpha_shape, alpha_ndim);
    int64_t asize = 1;
    for (int64_t d : ashape) asize *= d;
    check(op, check_alpha_shape(ashape, asize));
    check(op, check_positive("alpha", alpha[0]));
    check(op, check_range(range));
    if (n <= 0) return;
    Stream s(op);
    DeviceBuffer dx(op, bytes_of(n), g_misaligned), dy(op, bytes_of(n), g_misaligned);
    upload(op, dx, x, n, s);
    cuda_ok(op, sat_act_forward(s, dx.f(), n, alpha[0], range, dy.f()), "kernel launch");
    download(op, y, dy, n, s);
    cuda_ok(op, cudaStreamSynchronize(s), "kernel execution");
  });
}

int oqc_sat_act_backward(const float* dy, const float* x, int64_t n, const float* alpha, const int64_t* alpha_shape,
                         int32_t alpha_ndim, float range, float* dx, float* dalpha) {
  const char* op = "SatActQuantGrad";
  return guarded([&] {
    const std::vector<int64_t> ashape = shape_of(alpha_shape, alpha_ndim);
    int64_t asize = 1;
    for (int64_t d : ashape) asize *= d;
    check(op, check_alpha_shape(ashape, asize));
    check(op, check_positive("alpha", alpha[0]));
    check(op, check_range(range));
    if (dx == nullptr && dalpha == nullptr) return;
    Stream s(op);
    DeviceBuffer ddy(op, bytes_of(n), g_misaligned), dxin(op, bytes_of(n), g_misaligned),
        ddx(op, bytes_of(n), g_misaligned), dda(op, sizeof(float), false),
        scratch(op, sat_act_backward_scratch_bytes(), false);
    upload(op, ddy, dy, n, s);
    upload(op, dxin, x, n, s);
    cuda_ok(op,
            sat_act_backward(s, ddy.f(), dxin.f(), n, alpha[0], range, dx != nullptr ? ddx.f() : nullptr,
                             dalpha != nullptr ? dda.f() : nullptr, scratch.get()),
            "kernel launch");
    download(op, dx, ddx, n, s);
    download(op, dalpha, dda, 1, s);
    cuda_ok(op, cudaStreamSynchronize(s), "kernel execution");
  });
}

static int lsq_call(const char* op, const float* dy, const float* v, const int64_t* shape, int32_t ndim,
                    const float* step, const int64_t* step_shape, int32_t step_ndim, float range, int64_t is_signed,
                    float grad_scale, int64_t axis, float* out, float* dstep) {
  return guarded([&] {
    check(op, check_range(range));
    check(op, check_signed(is_signed));
    check(op, check_finite("grad_scale", grad_scale));
    LsqLayout layout;
    check(op, lsq_layout(shape_of(shape, ndim), shape_of(step_shape, step_ndim), axis, &layout));
    const int64_t nstep = layout.per_channel ? layout.channels : 1;
    check(op, check_steps(step, nstep));
    const LsqBounds b = lsq_bounds(range, is_signed == 1);
    const int64_t n = layout.size();
    const bool backward = dy != nullptr;
    if (backward && out == nullptr && dstep == nullptr) return;
    Stream s(op);
    DeviceBuffer dv_in(op, bytes_of(n), g_misaligned), ddy(op, bytes_of(n), g_misaligned),
        dout(op, bytes_of(n), g_misaligned), dstep_in(op, bytes_of(nstep), false),
        dstep_out(op, bytes_of(nstep), false), scratch(op, lsq_backward_scratch_bytes(layout), false);
    upload(op, dv_in, v, n, s);
    upload(op, dstep_in, step, nstep, s);
    if (backward) {
      upload(op, ddy, dy, n, s);
      cuda_ok(op,
              lsq_backward(s, ddy.f(), dv_in.f(), layout, step[0], dstep_in.f(), b.qn, b.qp, grad_scale,
                           out != nullptr ? dout.f() : nullptr, dstep != nullptr ? dstep_out.f() : nullptr,
                           scratch.get()),
              "kernel launch");
      download(op, dstep, dstep_out, nstep, s);
    } else {
      cuda_ok(op, lsq_forward(s, dv_in.f(), layout, step[0], dstep_in.f(), b.qn, b.qp, dout.f()), "kernel launch");
    }
    download(op, out, dout, n, s);
    cuda_ok(op, cudaStreamSynchronize(s), "kernel execution");
  });
}

int oqc_lsq_forward(const float* v, const int64_t* shape, int32_t ndim, const float* step, const int64_t* step_shape,
                    int32_t step_ndim, float range, int64_t is_signed, float grad_scale, int64_t axis, float* y) {
  return lsq_call("LsqQuant", nullptr, v, shape, ndim, step, step_shape, step_ndim, range, is_signed, grad_scale,
                  axis, y, nullptr);
}

int oqc_lsq_backward(const float* dy, const float* v, const int64_t* shape, int32_t ndim, const float* step,
                     const int64_t* step_shape, int32_t step_ndim, float range, int64_t is_signed, float grad_scale,
                     int64_t axis, float* dv, float* dstep) {
  return lsq_call("LsqQuantGrad", dy, v, shape, ndim, step, step_shape, step_ndim, range, is_signed, grad_scale,
                  axis, dv, dstep);
}

}  // extern "C"

// ------------------------------------------------------------------------------------------------------ benchmark

namespace {

// Deterministic pseudo-random fill in [lo, hi).
__global__ void fill_kernel(float* p, int64_t n, uint32_t seed, float lo, float hi) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    h *= 0x846ca68bu;
    h ^= h >> 16;
    p[i] = lo + (hi - lo) * (static_cast<float>(h >> 8) * (1.0f / 16777216.0f));
  }
}

}  // namespace

extern "C" int oqc_bench(const char* op_c, int64_t outer, int64_t channels, int64_t inner, int32_t iters, double* ms) {
  const char* op = "oqc_bench";
  return guarded([&] {
    std::string name(op_c);
    bool hostcheck = false;
    const std::string suffix = "+hostcheck";
    if (name.size() > suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      hostcheck = true;
      name.resize(name.size() - suffix.size());
    }
    static const char* const kOps[] = {"copy", "sat_weight_fwd", "sat_weight_fwd_scaled", "sat_weight_bwd",
                                       "sat_weight_bwd_scaled", "sat_act_fwd", "sat_act_bwd", "lsq_fwd", "lsq_bwd",
                                       "lsq_fwd_channel", "lsq_bwd_channel"};
    if (std::find(std::begin(kOps), std::end(kOps), name) == std::end(kOps))
      invalid(op, "unknown op '" + std::string(op_c) + "'");
    const int64_t n = outer * channels * inner;
    if (n <= 0 || iters <= 0) invalid(op, "empty tensor or no iteration");
    Stream s(op);
    DeviceBuffer x(op, bytes_of(n), false), g(op, bytes_of(n), false), y(op, bytes_of(n), false),
        steps(op, bytes_of(channels), false), dsteps(op, bytes_of(channels), false);
    LsqLayout tensor_layout;
    tensor_layout.inner = n;
    LsqLayout channel_layout;
    channel_layout.outer = outer;
    channel_layout.channels = channels;
    channel_layout.inner = inner;
    channel_layout.per_channel = true;
    const size_t scratch_bytes =
        std::max({sat_weight_scratch_bytes(), sat_act_backward_scratch_bytes(),
                  lsq_backward_scratch_bytes(tensor_layout), lsq_backward_scratch_bytes(channel_layout)});
    DeviceBuffer scratch(op, scratch_bytes, false);
    fill_kernel<<<1024, 256, 0, s>>>(x.f(), n, 1u, -1.0f, 3.0f);
    fill_kernel<<<1024, 256, 0, s>>>(g.f(), n, 2u, -1.0f, 1.0f);
    fill_kernel<<<64, 256, 0, s>>>(steps.f(), channels, 3u, 0.05f, 0.15f);
    cuda_ok(op, cudaGetLastError(), "fill");
    const float range = 15.0f, alpha = 2.0f, step = 0.1f, grad_scale = 0.01f;
    const LsqBounds b = lsq_bounds(range, false);
    std::vector<float> host(static_cast<size_t>(channels));

    auto one_call = [&]() -> cudaError_t {
      if (hostcheck) {  // what the ORT kernels do for alpha/step: copy to the host, wait
        const int64_t k = name.find("channel") != std::string::npos ? channels : 1;
        cudaError_t e = cudaMemcpyAsync(host.data(), steps.get(), bytes_of(k), cudaMemcpyDeviceToHost, s);
        if (e == cudaSuccess) e = cudaStreamSynchronize(s);
        if (e != cudaSuccess) return e;
      }
      if (name == "copy") return cudaMemcpyAsync(y.get(), x.get(), bytes_of(n), cudaMemcpyDeviceToDevice, s);
      if (name == "sat_weight_fwd") return sat_weight_forward(s, x.f(), n, range, 1, 0, y.f(), scratch.get());
      if (name == "sat_weight_fwd_scaled")
        return sat_weight_forward(s, x.f(), n, range, 1, 64, y.f(), scratch.get());
      if (name == "sat_weight_bwd") return sat_weight_backward(s, g.f(), x.f(), n, range, 1, 0, y.f(), scratch.get());
      if (name == "sat_weight_bwd_scaled")
        return sat_weight_backward(s, g.f(), x.f(), n, range, 1, 64, y.f(), scratch.get());
      if (name == "sat_act_fwd") return sat_act_forward(s, x.f(), n, alpha, range, y.f());
      if (name == "sat_act_bwd")
        return sat_act_backward(s, g.f(), x.f(), n, alpha, range, y.f(), dsteps.f(), scratch.get());
      if (name == "lsq_fwd") return lsq_forward(s, x.f(), tensor_layout, step, nullptr, b.qn, b.qp, y.f());
      if (name == "lsq_bwd")
        return lsq_backward(s, g.f(), x.f(), tensor_layout, step, nullptr, b.qn, b.qp, grad_scale, y.f(), dsteps.f(),
                            scratch.get());
      if (name == "lsq_fwd_channel")
        return lsq_forward(s, x.f(), channel_layout, 0.0f, steps.f(), b.qn, b.qp, y.f());
      if (name == "lsq_bwd_channel")
        return lsq_backward(s, g.f(), x.f(), channel_layout, 0.0f, steps.f(), b.qn, b.qp, grad_scale, y.f(),
                            dsteps.f(), scratch.get());
      return cudaErrorInvalidValue;
    };
    for (int i = 0; i < 3; ++i) cuda_ok(op, one_call(), "warm-up");
    cudaEvent_t t0, t1;
    cuda_ok(op, cudaEventCreate(&t0), "cudaEventCreate");
    cuda_ok(op, cudaEventCreate(&t1), "cudaEventCreate");
    cuda_ok(op, cudaEventRecord(t0, s), "cudaEventRecord");
    for (int i = 0; i < iters; ++i) cuda_ok(op, one_call(), "benchmark call");
    cuda_ok(op, cudaEventRecord(t1, s), "cudaEventRecord");
    cuda_ok(op, cudaEventSynchronize(t1), "benchmark execution");
    float elapsed = 0.0f;
    cuda_ok(op, cudaEventElapsedTime(&elapsed, t0, t1), "cudaEventElapsedTime");
    cudaEventDestroy(t0);
    cudaEventDestroy(t1);
    *ms = static_cast<double>(elapsed) / iters;
  });
}
