"""The teacher for distillation: the float model in a plain onnxruntime InferenceSession, run on the same batch.

By default the float model is the QAT model with its quantizers stripped (onnxqat.passes.strip.strip_quantizers: the
weights as they were before training, at the model's own opset); a user-given float ONNX can take its place (its
outputs are matched by name). A loss tensor that a quantizer produces in the QAT graph (`<tensor>_q`) is read from the
quantizer's input in the float model.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxqat.errors import ModelError
from onnxqat.ops.schema import is_quantizer


class Teacher:
    def __init__(self, qat_model: onnx.ModelProto, tensors: list[str], float_model: onnx.ModelProto | None = None,
                 threads: int = 0):
        import onnxruntime as ort

        from onnxqat.passes.strip import strip_quantizers

        m = strip_quantizers(qat_model) if float_model is None else _copy(float_model)
        producer = {o: n for n in qat_model.graph.node for o in n.output}
        known = {t for n in m.graph.node for t in n.output} | {i.name for i in m.graph.input}
        self.names = {}
        for t in tensors:
            src = t
            while src not in known and src in producer and is_quantizer(producer[src]):
                src = producer[src].input[0]
            if src not in known:
                raise ModelError(f"the teacher model has no tensor {t!r} for the loss to match")
            self.names[t] = src
        present = {o.name for o in m.graph.output}
        for src in self.names.values():
            if src not in present:
                m.graph.output.append(onnx.helper.make_tensor_value_info(src, onnx.TensorProto.FLOAT, None))
                present.add(src)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # no "Removing initializer ..." warnings about the stripped model's leftovers
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"the teacher (float) model does not load in onnxruntime: "
                             f"{str(exc).strip().splitlines()[0]}") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self._fetch = list(dict.fromkeys(self.names.values()))

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """tensor name (as the loss knows it) -> the teacher's value on this batch."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ModelError(f"the teacher model needs input {missing[0]!r}, which the training data does not give")
        vals = dict(zip(self._fetch, self.session.run(self._fetch, {n: feeds[n] for n in self.inputs})))
        return {t: np.asarray(vals[src], np.float32) for t, src in self.names.items()}


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    return out
