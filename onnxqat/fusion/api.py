"""`fuse()`: a trained QAT model -> an integer ONNX model of standard ops (or a QDQ model).

    result = onnxqat.fuse("runs/sat4/model.onnx", "lenet.int.onnx")
    print(result.summary())        # size, weight bits, integer share, float islands, verification figures

Formats (fusion/formats/): "int" (integer ops only, bit-exact: ConvInteger/MatMulInteger, fixed-point requantization;
for hardware targets and N2D2's IntegerOnly), "qdq" (QuantizeLinear/DequantizeLinear around float ops; portable).
Nodes without an integer form stay in float between DequantizeLinear and the next quantizer (float islands, listed in
the summary); integer_only=True makes them an error. Before anything is written the result must pass the ONNX checker
and load in onnxruntime, and the self-check (fake-quantized vs fused model on the same batch) must agree.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxqat.errors import DataError, FuseError
from onnxqat.files import atomic_write_text
from onnxqat.fusion.lowering import Island, Lowerer
from onnxqat.fusion.snap_bias import SnapReport, snap_biases
from onnxqat.fusion.values import OutputInfo
from onnxqat.fusion.verify import Agreement, fake_quant_agreement, load_verify_data, session_check, verify
from onnxqat.graph import load_model, save_model

MIN_AGREEMENT = 0.90  # self-check floor (output codes and top-1) below which fuse fails; see README "Self-check"
NAMES_SHOWN = 3  # node names per group in the summary (all of them with verbose=True and in the JSON report)


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
    islands: list[Island] = field(default_factory=list)
    lowered_nodes: int = 0
    tail: list[str] = field(default_factory=list)
    report_path: str | None = None
    snap: SnapReport | None = None  # biases moved to the accumulator grid (the fused model's reference)
    snap_agreement: Agreement | None = None  # the trained vs the bias-snapped fake-quantized model
    reference: onnx.ModelProto | None = None  # the QAT model the fused one computes (snapped when snap is set)
    head: list[str] = field(default_factory=list)  # float before the first quantizer (a float input's normalisation)

    @property
    def kept_float(self) -> list[str]:
        """Names of the QAT nodes kept in float (float islands and a float tail after the logits)."""
        return list(self.head) + [i.node for i in self.islands] + list(self.tail)

    @property
    def integer_nodes(self) -> int:
        return self.lowered_nodes - len(self.islands) - len(self.tail) - len(self.head)

    @property
    def integer_share(self) -> float:
        """Integer nodes among those between the first quantizer and the last (float head and tail excluded)."""
        return self.integer_nodes / max(self.lowered_nodes - len(self.tail) - len(self.head), 1)

    def island_groups(self) -> "OrderedDict[tuple[str, str], list[str]]":
        """(op type, cause) -> node names, most frequent first."""
        groups: dict[tuple[str, str], list[str]] = {}
        for i in self.islands:
            groups.setdefault((i.op_type, i.cause), []).append(i.node)
        return OrderedDict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    def summary(self, verbose: bool = False) -> str:
        bits = sorted(set(self.weight_bits.values()))
        lines = [f"fused ({self.format}): {len(self.model.graph.node)} nodes, {self.weight_params} weights at "
                 f"{'/'.join(map(str, bits)) or '-'} bits, {self.size} bytes ({self.size / 1e6:.3f} MB)"
                 + (f" -> {self.path}" if self.path else "")]
        inner = self.lowered_nodes - len(self.tail) - len(self.head)
        lines.append(f"integer: {self.integer_nodes} of the {inner} QAT nodes between the first quantizer and the last "
                     f"({100 * self.integer_share:.1f} %); float islands: {len(self.islands)} node(s)")
        for what, names in (("float before the first quantizer", self.head), ("float after the last quantizer",
                                                                                self.tail)):
            if names:
                shown = names if verbose else names[:NAMES_SHOWN]
                more = f", ... (+{len(names) - len(shown)})" if len(shown) < len(names) else ""
                lines.append(f"  {what}: {', '.join(shown)}{more}")
        for (op, cause), names in self.island_groups().items():
            shown = names if verbose else names[:NAMES_SHOWN]
            more = f", ... (+{len(names) - len(shown)})" if len(shown) < len(names) else ""
            lines.append(f"  float: {op} x{len(names)} ({cause}): {', '.join(shown)}{more}")
        if self.snap is not None and self.snap.layers:
            line = self.snap.summary()
            if self.snap_agreement is not None:
                sa = self.snap_agreement
                line += (f"; fake-quant before/after: top-1 identical on {100 * sa.top1_agreement:.2f}%, output codes "
                         f"on {100 * sa.code_agreement:.3f}%")
            lines.append(line)
        if self.report_path:
            lines.append(f"report: {self.report_path}")
        if self.agreement is not None:
            lines.append(self.agreement.summary())
        return "\n".join(lines)

    def report(self) -> dict:
        """Everything the summary says, complete, for the JSON report beside the output."""
        a = self.agreement
        return {
            "format": self.format, "path": self.path, "size": self.size, "nodes": len(self.model.graph.node),
            "weight_params": self.weight_params, "weight_bits": self.weight_bits,
            "qat_nodes": self.lowered_nodes, "integer_nodes": self.integer_nodes, "float_tail": self.tail, "float_head": self.head,
            "float_islands": [{"node": i.node, "op_type": i.op_type, "cause": i.cause, "reason": i.reason}
                              for i in self.islands],
            "bias_snap": None if self.snap is None else {
                "layers": self.snap.layers, "max_shift_steps": self.snap.max_shift, "skipped": self.snap.skipped,
                "top1_agreement_with_trained": None if self.snap_agreement is None else self.snap_agreement.top1_agreement,
                "code_agreement_with_trained": None if self.snap_agreement is None else self.snap_agreement.code_agreement},
            "verify": None if a is None else {
                "samples": a.samples, "max_code_diff": a.max_code_diff, "code_agreement": a.code_agreement,
                "top1_agreement": a.top1_agreement, "fused_engine": a.fused_engine,
                "fake_quant_engine": a.fake_quant_engine, "activations": a.activations,
                "layer_by_layer": {"output_code_agreement": a.local_code_agreement, "activations": a.local_activations}},
        }


def fuse(model, output=None, format: str = "int", rescale: str = "fixed-point", verify_data=None, strict: bool = False,
         *, input_scale: float = 1 / 255, input_type: str = "auto", keep_float=(), dequantize_output: bool = True,
         verify_samples: int = 64, seed: int = 0, check: bool = True, verify_engine: str = "onnxruntime",
         integer_only: bool = False, min_agreement: float = MIN_AGREEMENT, report: bool = True,
         snap_bias: bool | None = None) -> FuseResult:
    """Fuse BatchNorm and quantizers of a QAT model into an integer (format="int") or QDQ (format="qdq") model.

    model: path or ModelProto of the QAT graph (quantizer nodes as docs/CONVENTIONS.md names them).
    output: where to write the fused model (temp file + rename: nothing is written when fusing or a check fails);
      with report=True a JSON report (every float island, the self-check figures) goes beside it as <output>.json.
    rescale: "fixed-point" (int multiplier + rounding right shift) or "float" (float multiply, N2D2's default).
    verify_data: NPZ path or array of inputs (uint8 codes or float in the input range); else random codes.
    strict: raise FuseError when any output code or top-1 differs between the fake-quantized and fused models.
    min_agreement: raise FuseError when the self-check's layer-by-layer agreement (any quantizer's codes, the outputs)
      is below it (0 disables); the end-to-end figures are reported.
    keep_float: names of nodes to run in float between Dequantize/Quantize (besides those with no integer form).
    integer_only: raise FuseError instead of keeping any node in float (hardware targets, N2D2's IntegerOnly).
    check: run the self-check (fake-quantized vs fused model); strict implies it.
    verify_engine: runs the fake-quantized model: "onnxruntime" (with the compiled op library) or "reference"
      (onnx.reference + the numpy quantizer references, the spec; slow on large models).
    snap_bias: move each layer's folded bias to a whole number of accumulator steps in the QAT model first
      (snap_bias.py), the model the fused one then computes and is verified against; default on for the formats whose
      kernels add an int32 bias (ort, qdq), off for int (exact with any bias). The summary reports the move.
    """
    if verify_engine not in ("reference", "onnxruntime"):
        raise FuseError(f"unknown verify engine '{verify_engine}' (reference or onnxruntime)")
    if not (isinstance(verify_samples, int) and not isinstance(verify_samples, bool) and verify_samples >= 1):
        raise FuseError(f"verify_samples (--samples) must be an integer >= 1, got {verify_samples!r}")
    if not 0 <= min_agreement <= 1:
        raise FuseError(f"min_agreement must be in [0, 1], got {min_agreement}")
    qat = load_model(model)

    def lower(m: onnx.ModelProto):
        return Lowerer(m, format=format, rescale=rescale, input_scale=input_scale, input_type=input_type,
                       keep_float=keep_float, dequantize_output=dequantize_output, integer_only=integer_only).run()

    low = lower(qat)
    reference, snap = qat, None
    if snap_bias if snap_bias is not None else format in ("ort", "qdq"):
        reference, snap = snap_biases(qat, low.layers)
        if snap.layers:
            low = lower(reference)
    try:
        onnx.checker.check_model(low.model, full_check=True)
    except Exception as exc:
        raise FuseError(f"fused graph failed the ONNX checker: {str(exc).splitlines()[0]}") from exc
    session_check(low.model, reference)
    agreement = snap_agreement = None
    if check or strict:
        data = verify_data
        if isinstance(data, (str, os.PathLike)):
            data = load_verify_data(os.fspath(data), verify_samples)
        sizes = [len(np.asarray(v)) if np.ndim(v) else 0 for v in (data.values() if isinstance(data, dict) else
                                                                  ([] if data is None else [data]))]
        if any(n == 0 for n in sizes):
            raise DataError("verify data: no sample (an empty array)")
        if snap is not None and snap.layers:
            snap_agreement = fake_quant_agreement(qat, reference, low.outputs, input_scale=input_scale,
                                                  data=None if data is None else data, samples=verify_samples,
                                                  seed=seed, engine=verify_engine)
        agreement = verify(reference, low.model, low.outputs, input_scale=input_scale,
                           data=data, samples=verify_samples, seed=seed,
                           activation_codes=low.activation_codes, engine=verify_engine)
        if strict and not agreement.identical:
            raise FuseError(f"--strict: fused and fake-quantized outputs differ (max code difference "
                            f"{agreement.max_code_diff:g}, top-1 agreement {100 * agreement.top1_agreement:.2f}%)")
        if agreement.local_agreement < min_agreement:
            raise FuseError(f"self-check failed: layer by layer, the fused model agrees with the fake-quantized one on "
                            f"{100 * agreement.local_agreement:.2f}% of codes (end to end: {100 * agreement.code_agreement:.2f}"
                            f"% of output codes, {100 * agreement.top1_agreement:.2f}% of top-1; minimum "
                            f"{100 * min_agreement:g}%; min_agreement=0 / --min-agreement 0 writes it anyway)")
    path = report_path = None
    if output is not None:
        path = os.fspath(output)
        save_model(low.model, path)
        report_path = path + ".json" if report else None
    res = FuseResult(low.model, path, low.model.ByteSize(), format, low.weight_params, low.weight_bits, low.outputs,
                     agreement, low.islands, low.lowered_nodes, low.tail, report_path, snap, snap_agreement, reference,
                     low.head)
    if report_path:
        atomic_write_text(report_path, json.dumps(res.report(), indent=1, default=_jsonable))
    return res


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)
