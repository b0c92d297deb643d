"""Initial values of the activation quantizers that insert left uncalibrated, from the first training batches.

insert lists them in the model's metadata (onnxqat.passes.insert.UNCALIBRATED_KEY): without calibration data their
alpha/step are the recipe's fixed defaults, which know nothing of the model's value ranges (an 8-bit LSQ step of 0.025
on a signed 0..255 input clips it to +-3.2 and zeroes a detector's output). When training starts, the float model (the
QAT model with its quantizers stripped) runs on the first training batches and each listed quantizer gets what insert
would have given it with that data as calibration data:
- SatActQuant: alpha = the recipe's percentile (activations.percentile, default 99.99) of the activation's output;
- LsqQuant: step = 2 <|v|> / sqrt(Qp) of its input (LSQ paper).
The initialised model no longer lists them (its metadata key is removed), so a later run does not redo it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from onnxqat.passes.calibration import collect, lsq_step, sat_alpha
from onnxqat.passes.insert import UNCALIBRATED_KEY
from onnxqat.passes.weights import lsq_qp

DEFAULT_PERCENTILE = 99.99


def uncalibrated(model: onnx.ModelProto) -> list[str]:
    """The quantizer node names insert set from recipe defaults (empty for other models)."""
    for p in model.metadata_props:
        if p.key == UNCALIBRATED_KEY:
            try:
                return [str(n) for n in json.loads(p.value)]
            except ValueError:
                return []
    return []


def _percentile(model: onnx.ModelProto, node: str) -> float:
    toml = next((p.value for p in model.metadata_props if p.key == "onnxqat.recipe_toml"), None)
    if not toml:
        return DEFAULT_PERCENTILE
    try:
        from onnxqat.recipes import parse_recipe

        return float(parse_recipe(toml).activation_settings(node[: -len("_aquant")]).percentile)
    except Exception:  # a recipe this version cannot read: the default
        return DEFAULT_PERCENTILE


def forget(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    """A copy whose metadata no longer lists `names` (all when None) as uncalibrated."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    left = [] if names is None else [n for n in uncalibrated(m) if n not in set(names)]
    keep = [p for p in m.metadata_props if p.key != UNCALIBRATED_KEY]
    del m.metadata_props[:]
    m.metadata_props.extend(keep)
    if left:
        m.metadata_props.append(onnx.StringStringEntryProto(key=UNCALIBRATED_KEY, value=json.dumps(left)))
    return m


def init_from_data(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, list[str]]:
    """(model with the uncalibrated quantizers initialised from `feeds`, one message per quantizer changed)."""
    names = set(uncalibrated(model))
    if not names:
        return model, []
    from onnxqat.passes.strip import strip_quantizers

    nodes = [n for n in model.graph.node if n.name in names and n.op_type in ("SatActQuant", "LsqQuant")]
    # SatActQuant: its output is the activation's output (strip restores the Relu/Clip under that name);
    # LsqQuant: its input, the activation it follows
    tensors = {n.name: (n.output[0] if n.op_type == "SatActQuant" else n.input[0]) for n in nodes}
    values = collect(strip_quantizers(model), feeds, list(dict.fromkeys(tensors.values()))) if nodes else {}
    inits = {i.name: i for i in model.graph.initializer}
    m = forget(model)
    new = {}
    messages = []
    for n in nodes:
        x = values[tensors[n.name]]
        if n.op_type == "SatActQuant":
            pct = _percentile(model, n.name)
            v = sat_alpha(x, pct)
            what = f"alpha {{}} (the {pct:g}th percentile of {tensors[n.name]})"
        else:
            r = float(numpy_helper.to_array(inits[n.input[2]]))
            signed = bool(int(numpy_helper.to_array(inits[n.input[3]])))
            v = lsq_step(x, lsq_qp(int(round(r)), signed))
            what = f"step {{}} (2<|x|>/sqrt(Qp) of {tensors[n.name]})"
        if v is None:
            continue
        old = numpy_helper.to_array(inits[n.input[1]])
        new[n.input[1]] = np.full(old.shape, np.float32(v), np.float32)
        messages.append(f"{n.name}: {what.format(f'{float(old.reshape(-1)[0]):.4g} -> {np.float32(v):.4g}')}")
    for init in m.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name], init.name))
    return m, messages
