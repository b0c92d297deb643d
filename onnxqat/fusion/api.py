"""`fuse()`: a trained QAT model -> an integer-only ONNX model of standard ops (or a QDQ model).

    result = onnxqat.fuse("runs/sat4/model.onnx", "lenet.int.onnx")
    print(result.summary())        # size, weight bits, verification figures

Integer format (default): the network input is uint8 image codes (real value = code * input_scale, 1/255 for images in
[0, 1]); with input_type="float" the graph takes the float image and quantizes it first with QuantizeLinear. From there
to the output every tensor is an integer type: ConvInteger/MatMulInteger on uint8 codes (weights as uint8 codes with a
zero point, stored packed at the quantizer's bit width), int64 fixed-point rescaling with a per-channel rounding right
shift (BitShift on uint64), MaxPool on uint8 codes, residual Adds as a sum of rescaled branches. The graph outputs are
float: a last DequantizeLinear of int32 output codes (logits) or of uint8 activation codes (dequantize_output=False keeps
the integer codes as the output). No custom domain: runs on stock onnxruntime and on onnx.reference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.lower import Lowerer
from onnxqat.fusion.values import OutputInfo
from onnxqat.fusion.verify import Agreement, load_verify_data, verify
from onnxqat.graph import load_model, save_model


@dataclass
class FuseResult:
    model: onnx.ModelProto
    path: str | None
    size: int  # bytes of the serialized model
    format: str
    weight_params: int
    weight_bits: dict[str, int]
    outputs: list[OutputInfo]
    agreement: Agreement | None = None
    kept_float: list[str] = field(default_factory=list)

    def summary(self) -> str:
        bits = sorted(set(self.weight_bits.values()))
        lines = [f"fused ({self.format}): {len(self.model.graph.node)} nodes, {self.weight_params} weights at "
                 f"{'/'.join(map(str, bits))} bits, {self.size} bytes ({self.size / 1e6:.3f} MB)"
                 + (f" -> {self.path}" if self.path else "")]
        if self.kept_float:
            lines.append(f"kept in float: {', '.join(self.kept_float)}")
        if self.agreement is not None:
            lines.append(self.agreement.summary())
        return "\n".join(lines)


def fuse(model, output=None, format: str = "int", rescale: str = "fixed-point", verify_data=None, strict: bool = False,
         *, input_scale: float = 1 / 255, input_type: str = "uint8", keep_float=(), dequantize_output: bool = True,
         verify_samples: int = 64, seed: int = 0, check: bool = True, verify_engine: str = "reference") -> FuseResult:
    """Fuse BatchNorm and quantizers of a QAT model into an integer-only (format="int") or QDQ (format="qdq") model.

    model: path or ModelProto of the QAT graph (quantizer nodes as docs/CONVENTIONS.md names them).
    output: where to write the fused model (temp file + rename: nothing is written when fusing or --strict fails).
    rescale: "fixed-point" (int multiplier + rounding right shift) or "float" (float multiply, N2D2's default).
    verify_data: NPZ path or array of inputs (uint8 codes or float in the input range); else random codes.
    strict: raise FuseError when any output code or top-1 differs between the fake-quantized and fused models.
    keep_float: names of nodes without integer lowering to run in float between Dequantize/Quantize.
    check: run the self-check (fake-quantized vs fused model); strict implies it.
    verify_engine: runs the fake-quantized model: "reference" (onnx.reference + numpy quantizers, the spec; slow on
      large models) or "onnxruntime" (the compiled op library).
    """
    if verify_engine not in ("reference", "onnxruntime"):
        raise FuseError(f"unknown verify engine '{verify_engine}' (reference or onnxruntime)")
    qat = load_model(model)
    low = Lowerer(qat, format=format, rescale=rescale, input_scale=input_scale, input_type=input_type,
                  keep_float=keep_float, dequantize_output=dequantize_output).run()
    try:
        onnx.checker.check_model(low.model, full_check=True)
    except Exception as exc:
        raise FuseError(f"fused graph failed the ONNX checker: {str(exc).splitlines()[0]}") from exc
    agreement = None
    if check or strict:
        data = verify_data
        if isinstance(data, (str, os.PathLike)):
            data = load_verify_data(os.fspath(data), verify_samples)
        fused_input = "uint8" if low.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8 else "float"
        agreement = verify(qat, low.model, low.outputs, input_scale=input_scale, fused_input=fused_input,
                           data=None if data is None else np.asarray(data), samples=verify_samples, seed=seed,
                           activation_codes=low.activation_codes, engine=verify_engine)
        if strict and not agreement.identical:
            raise FuseError(f"--strict: fused and fake-quantized outputs differ (max code difference "
                            f"{agreement.max_code_diff:g}, top-1 agreement {100 * agreement.top1_agreement:.2f}%)")
    path = None
    if output is not None:
        path = os.fspath(output)
        save_model(low.model, path)
    size = low.model.ByteSize()
    return FuseResult(low.model, path, size, format, low.weight_params, low.weight_bits, low.outputs, agreement,
                      low.kept_float)
