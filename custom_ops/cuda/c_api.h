/* libonnxqat_cuda_kernels.so: a C entry point to the CUDA launchers, without onnxruntime, for tests and benchmarks
 * (tests/ops/test_cuda_parity.py, bench/cuda_ops.py). The oqc_<op> functions take HOST pointers: they check the
 * arguments with the same rules and words as the ORT kernels, copy the inputs to the device, run the launchers on a
 * stream of their own, and copy the outputs back. Optional outputs (dx/dalpha, dv/dstep) may be NULL.
 * Return: OQC_OK, OQC_INVALID_ARGUMENT or OQC_CUDA_ERROR; oqc_last_error() then says what (this thread). */
#ifndef ONNXQAT_CUDA_C_API_H_
#define ONNXQAT_CUDA_C_API_H_

#include <stdint.h>

#define OQC_OK 0
#define OQC_INVALID_ARGUMENT 1
#define OQC_CUDA_ERROR 2

#if defined(__GNUC__)
#define OQC_EXPORT __attribute__((visibility("default")))
#else
#define OQC_EXPORT
#endif

#ifdef __cplusplus
extern "C" {
#endif

OQC_EXPORT const char* oqc_last_error(void);
/* Number of CUDA devices; OQC_CUDA_ERROR (no driver, no device) leaves *count at 0. */
OQC_EXPORT int oqc_device_count(int* count);
/* Name of device 0 (for reports). */
OQC_EXPORT int oqc_device_name(char* buf, int32_t size);
/* 1: device copies of the tensors start 4 bytes past a 16-byte boundary (exercises the scalar-load path). */
OQC_EXPORT void oqc_set_misaligned(int32_t on);

OQC_EXPORT int oqc_sat_weight_forward(const float* w, int64_t n, float range, int64_t mode, int64_t fan_out,
                                      float* wq);
OQC_EXPORT int oqc_sat_weight_backward(const float* dwq, const float* w, int64_t n, float range, int64_t mode,
                                       int64_t fan_out, float* dw);
OQC_EXPORT int oqc_sat_act_forward(const float* x, int64_t n, const float* alpha, const int64_t* alpha_shape,
                                   int32_t alpha_ndim, float range, float* y);
OQC_EXPORT int oqc_sat_act_backward(const float* dy, const float* x, int64_t n, const float* alpha,
                                    const int64_t* alpha_shape, int32_t alpha_ndim, float range, float* dx,
                                    float* dalpha);
OQC_EXPORT int oqc_lsq_forward(const float* v, const int64_t* shape, int32_t ndim, const float* step,
                               const int64_t* step_shape, int32_t step_ndim, float range, int64_t is_signed,
                               float grad_scale, int64_t axis, float* y);
OQC_EXPORT int oqc_lsq_backward(const float* dy, const float* v, const int64_t* shape, int32_t ndim,
                                const float* step, const int64_t* step_shape, int32_t step_ndim, float range,
                                int64_t is_signed, float grad_scale, int64_t axis, float* dv, float* dstep);

/* Benchmark on device-resident data: mean milliseconds per call of `op` over `iters` calls (after warm-up), the
 * tensor viewed as [outer, channels, inner] (LSQ per-channel ops use that layout; the others its size).
 * op: copy (cudaMemcpyAsync device to device), sat_weight_fwd, sat_weight_fwd_scaled, sat_weight_bwd,
 * sat_weight_bwd_scaled, sat_act_fwd, sat_act_bwd, lsq_fwd, lsq_bwd, lsq_fwd_channel, lsq_bwd_channel; with the
 * suffix +hostcheck, each call first copies alpha/step to the host and waits (as the ORT kernels do). */
OQC_EXPORT int oqc_bench(const char* op, int64_t outer, int64_t channels, int64_t inner, int32_t iters, double* ms);

#ifdef __cplusplus
}
#endif

#endif /* ONNXQAT_CUDA_C_API_H_ */
