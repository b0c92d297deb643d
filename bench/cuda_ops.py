"""Throughput of the CUDA quantizer kernels as a fraction of the device's copy bandwidth, measured in one run.

    python bench/cuda_ops.py [--lib path/to/libonnxqat_cuda_kernels.so] [--elements 16777216] [--json out.json]

Every op runs on device-resident data of N float32 elements (default 16M) through libonnxqat_cuda_kernels.so
(custom_ops/cuda/c_api.h: oqc_bench, CUDA events, after warm-up). The copy bandwidth is a device-to-device
cudaMemcpyAsync of the same N floats: 2*N*4 bytes (read + write) per copy. An op's effective bandwidth counts the
bytes it cannot avoid: forward N in + N out, backward dy and x in + dx out (3*N*4). fraction = op / copy; the
target is >= 0.6. `passes` says how many times the kernels read the input tensor(s): SatWeight must find
max|tanh W| (and, with ApplyScaling, the variance of the levels) before it can write one output, so its forward
reads W 2 (3 with scaling) times and its fraction is bounded by 2/3 (1/2); those bounds are printed beside it.
Rows with +hostcheck add what the ORT kernels do per call for alpha/step: copy it to the host and wait.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIB_NAME = "libonnxqat_cuda_kernels.so"

# op, bytes per element that must move (float32 tensors), bound on the fraction from the passes over the input
OPS = [
    ("sat_weight_fwd", 8, 2 / 3),
    ("sat_weight_fwd_scaled", 8, 1 / 2),
    ("sat_weight_bwd", 12, 3 / 4),
    ("sat_weight_bwd_scaled", 12, 3 / 5),
    ("sat_act_fwd", 8, 1.0),
    ("sat_act_bwd", 12, 1.0),
    ("lsq_fwd", 8, 1.0),
    ("lsq_bwd", 12, 1.0),
    ("lsq_fwd_channel", 8, 1.0),
    ("lsq_bwd_channel", 12, 1.0),
    ("sat_act_fwd+hostcheck", 8, 1.0),
    ("lsq_bwd_channel+hostcheck", 12, 1.0),
]


def find_library(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("ONNXQAT_CUDA_KERNELS")
    if env:
        return Path(env)
    cands = []
    try:
        import onnxqat

        cands += [Path(p) / "lib" / LIB_NAME for p in onnxqat.__path__]
    except ImportError:
        pass
    build = REPO / "build"
    if build.is_dir():
        cands += sorted(build.glob(f"**/{LIB_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in cands:
        if c.is_file():
            return c
    sys.exit(f"{LIB_NAME} not found: build custom_ops with a CUDA compiler, or pass --lib")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib")
    ap.add_argument("--elements", type=int, default=1 << 24)
    ap.add_argument("--channels", type=int, default=256, help="channels of the per-channel LSQ rows (axis 1)")
    ap.add_argument("--inner", type=int, default=4096, help="elements per channel row of the per-channel LSQ")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    args = ap.parse_args()

    lib = ctypes.CDLL(str(find_library(args.lib)))
    lib.oqc_last_error.restype = ctypes.c_char_p
    lib.oqc_bench.argtypes = [ctypes.c_char_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                              ctypes.POINTER(ctypes.c_double)]
    count = ctypes.c_int(0)
    if lib.oqc_device_count(ctypes.byref(count)) != 0 or count.value == 0:
        sys.exit(f"no CUDA GPU: {lib.oqc_last_error().decode()}")
    name = ctypes.create_string_buffer(256)
    lib.oqc_device_name(name, 256)

    n = args.elements
    per_row = args.channels * args.inner
    if n % per_row:
        sys.exit(f"--elements {n} is not a multiple of channels*inner = {per_row}")
    outer = n // per_row

    def bench(op: str) -> float:
        ms = ctypes.c_double(0)
        if lib.oqc_bench(op.encode(), outer, args.channels, args.inner, args.iters, ctypes.byref(ms)) != 0:
            sys.exit(f"{op}: {lib.oqc_last_error().decode()}")
        return ms.value

    copy_ms = bench("copy")
    copy_bw = 2 * 4 * n / (copy_ms * 1e-3)
    rows = []
    for op, bytes_per_elem, bound in OPS:
        ms = bench(op)
        bw = bytes_per_elem * n / (ms * 1e-3)
        rows.append({"op": op, "ms": ms, "gb_per_s": bw / 1e9, "fraction_of_copy": bw / copy_bw,
                     "pass_bound": bound})
    copy_after = bench("copy")  # the clock may have changed during the run: report both copies

    print(f"device: {name.value.decode()}; N = {n} float32 ({n * 4 / 2**20:.0f} MiB); per-channel LSQ layout "
          f"[{outer}, {args.channels}, {args.inner}] axis 1; {args.iters} calls per op")
    print(f"device-to-device copy: {copy_ms * 1e3:.1f} us = {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"again after the ops: {copy_after * 1e3:.1f} us")
    print(f"{'op':28s} {'us':>9s} {'GB/s':>7s} {'fraction':>9s} {'bound':>6s}")
    for r in rows:
        print(f"{r['op']:28s} {r['ms'] * 1e3:9.1f} {r['gb_per_s']:7.0f} {r['fraction_of_copy']:9.2f} "
              f"{r['pass_bound']:6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name.value.decode(), "elements": n, "copy_ms": copy_ms,
                                               "copy_ms_after": copy_after, "copy_gb_per_s": copy_bw / 1e9,
                                               "ops": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
