"""Graph utilities shared by the passes: load/save, an index of producers and
consumers, constant tensors (initializers, Constant nodes, constant
expressions such as ConstantOfShape), shape inference, node naming, and the
onnx.defs schemas of the quantizer ops."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxqat.errors import ModelError
from onnxqat.files import default_file_mode
from onnxqat.ops.schema import ALL_OPS, DOMAIN, OPSET_VERSION, is_quantizer

# ops whose output is not a function of their inputs: never constant
_NONDETERMINISTIC = {
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
}


# ------------------------------------------------------------------ load/save

def load_model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (a ModelProto or a path); ModelError when missing or not ONNX."""
    if isinstance(model, onnx.ModelProto):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        return out
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    try:
        out = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, OSError ...
        raise ModelError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    _load_external_data(out, path)
    if not out.graph.node:
        raise ModelError(f"{path}: not an ONNX model (no graph nodes)")
    check_tensor_sizes(out, str(path))
    check_quantizer_nodes(out, str(path))
    return out


_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, n)}
_ELEMENT_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def check_tensor_sizes(m: onnx.ModelProto, where: str = "model") -> None:
    """Every initializer (and Constant value) holds as many elements as its dims claim: a tampered or truncated file
    (dims 2^31 x 2^31 over 16 bytes of data) is a ModelError here, not a numpy reshape error in whichever pass reads
    it first. External-data tensors are checked when their file is read."""
    from onnx.external_data_helper import uses_external_data

    tensors = list(m.graph.initializer) + [a.t for n in m.graph.node if n.op_type == "Constant" for a in n.attribute
                                           if a.type == onnx.AttributeProto.TENSOR]
    for t in tensors:
        if uses_external_data(t) and not t.raw_data:
            continue
        n = 1
        for d in t.dims:
            if d < 0:
                raise ModelError(f"{where}: tensor '{t.name}' has a negative dimension {list(t.dims)}")
            n *= d
        if t.data_type in _PACKED_TYPES:
            continue  # two elements a byte (or an int32): left to the reader
        if t.raw_data:
            try:
                item = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            except Exception:
                continue  # a type numpy has no itemsize for (string ...): left to the reader
            have, need = len(t.raw_data), n * item
        else:
            have = max((len(getattr(t, f)) for f in _ELEMENT_FIELDS), default=0)
            need = n
            if t.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                need = 2 * n
            if have == 0 and n == 0:
                continue
            if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.UINT8,
                               onnx.TensorProto.INT8, onnx.TensorProto.UINT16, onnx.TensorProto.INT16,
                               onnx.TensorProto.BOOL):
                continue  # packed in int32_data with type-dependent rules: left to the reader
        if have != need:
            raise ModelError(f"{where}: tensor '{t.name}' claims shape {list(t.dims)} ({n} elements) but holds "
                             f"{have} {'bytes' if t.raw_data else 'values'} (a tampered or truncated file?)")


# per quantizer input: (element type, check, what it must be); the data input (index 0) is not checked
_PARAM_RULES = {
    "range": (onnx.TensorProto.FLOAT, lambda a: a.size == 1 and np.isfinite(a).all() and 1 <= a.item() <= 65535,
              "a float32 scalar in [1, 65535]"),
    "mode": (onnx.TensorProto.INT64, lambda a: a.size == 1 and 0 <= int(a.item()) <= 5,
             "an int64 scalar 0 (clamp), 1 (quantize), 2 (symmetric), 3 (full range), 4 (asymmetric) or 5 "
             "(asymmetric clamp)"),
    "scale_fan_out": (onnx.TensorProto.INT64, lambda a: a.size == 1 and a.item() >= 0, "an int64 scalar >= 0"),
    "alpha": (onnx.TensorProto.FLOAT, lambda a: a.size == 1 and np.isfinite(a).all() and a.item() > 0,
              "a float32 scalar, finite and > 0"),
    "step": (onnx.TensorProto.FLOAT, lambda a: a.size >= 1 and np.isfinite(a).all() and (a > 0).all(),
             "float32, finite and > 0"),
    "signed": (onnx.TensorProto.INT64, lambda a: a.size == 1 and int(a.item()) in (0, 1), "an int64 scalar 0 or 1"),
    "grad_scale": (onnx.TensorProto.FLOAT, lambda a: a.size == 1 and np.isfinite(a).all(), "a finite float32 scalar"),
    "axis": (onnx.TensorProto.INT64, lambda a: a.size == 1, "an int64 scalar"),
}


def check_quantizer_nodes(m: onnx.ModelProto, where: str = "model") -> None:
    """Every com.onnxqat quantizer node of a (possibly hand-edited) QAT model has its inputs, each parameter a
    constant of the type and range the op takes: one ModelError naming the node and the input, not a KeyError or an
    onnxruntime type error from whichever command reads it."""
    from onnxqat.ops.schema import signature

    quantizers = [n for n in m.graph.node if n.domain == DOMAIN]
    if not quantizers:
        return
    consts = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    consts[n.output[0]] = a.t
    for q in quantizers:
        label = f"{where}: quantizer {q.op_type} '{q.name or q.output[0]}'"
        try:
            sig = signature(q.op_type)
        except KeyError:
            raise ModelError(f"{label}: unknown op type in domain {DOMAIN}") from None
        if len(q.input) < len(sig.inputs) or not all(q.input[:len(sig.inputs)]):
            raise ModelError(f"{label}: has {len([i for i in q.input if i])} input(s), the op takes "
                             f"{len(sig.inputs)} ({', '.join(sig.inputs)})")
        for name, tensor in zip(sig.inputs[1:], q.input[1:]):
            rule = _PARAM_RULES[name]
            t = consts.get(tensor)
            if t is None:
                raise ModelError(f"{label}: input {name} ('{tensor}') is not a constant of the model (missing "
                                 "initializer?)")
            if t.data_type != rule[0]:
                raise ModelError(f"{label}: input {name} ('{tensor}') is "
                                 f"{onnx.TensorProto.DataType.Name(t.data_type).lower()}, must be {rule[2]}")
            value = numpy_helper.to_array(t)
            if not rule[1](value):
                shown = value.reshape(-1)[:4].tolist()
                raise ModelError(f"{label}: input {name} ('{tensor}') = {shown if value.size > 1 else shown[0]}, "
                                 f"must be {rule[2]}")


def _load_external_data(m: onnx.ModelProto, path: Path) -> None:
    """Tensors stored beside the model (external data): a missing or short file is named, not reported as a model
    that is not ONNX."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for t in _all_tensors(m) if uses_external_data(t)]
    if not tensors:
        return
    for t in tensors:
        info = {e.key: e.value for e in t.external_data}
        data = path.parent / info.get("location", "")
        if not data.is_file():
            raise ModelError(f"{path}: the data of tensor '{t.name}' is in {data.name}, which is not beside the model "
                             f"(copy {data.name} into {path.parent or '.'})")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > data.stat().st_size:
            raise ModelError(f"{path}: {data.name} holds {data.stat().st_size} bytes, tensor '{t.name}' needs bytes up "
                             f"to {end} (a truncated copy?)")
    try:
        load_external_data_for_model(m, str(path.parent))
    except Exception as exc:
        raise ModelError(f"{path}: cannot read its external data ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _all_tensors(m: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return list(_get_all_tensors(m))


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write atomically: a temporary file in the same folder, then rename (no partial output on failure)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        if model.ByteSize() > 1_900_000_000:  # protobuf's 2 GiB limit: tensors go to <name>.data beside it
            onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"{path.name}.data")
        else:
            onnx.save(model, tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ModelError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------ schemas

def register_quantizer_schemas() -> None:
    """Register the com.onnxqat ops with onnx.defs so that onnx.checker validates their inputs.

    onnx's Python API cannot attach a shape-inference function to a schema, so
    the passes also write value_info for every quantizer output (same type and
    shape as its input); with it, full shape inference runs through the graph."""
    P = onnx.defs.OpSchema.FormalParameter
    types = {
        "W": "T", "x": "T", "v": "T", "Wq": "T", "y": "T", "dWq_dW": "T",
        "range": "tensor(float)", "alpha": "tensor(float)", "step": "tensor(float)", "grad_scale": "tensor(float)",
        "mode": "tensor(int64)", "scale_fan_out": "tensor(int64)", "signed": "tensor(int64)", "axis": "tensor(int64)",
    }
    for op in ALL_OPS:
        try:
            onnx.defs.get_schema(op.name, OPSET_VERSION, DOMAIN)
            continue  # already registered (by us or by the op library)
        except onnx.defs.SchemaError:
            pass
        schema = onnx.defs.OpSchema(
            op.name, DOMAIN, OPSET_VERSION, f"onnxqat quantizer {op.name} (see onnxqat/ops/schema.py)",
            inputs=[P(n, types[n]) for n in op.inputs],
            outputs=[P(n, types[n]) if op.first_optional_output is None or k < op.first_optional_output
                     else P(n, types[n], "", param_option=onnx.defs.OpSchema.FormalParameterOption.Optional)
                     for k, n in enumerate(op.outputs)],
            type_constraints=[("T", ["tensor(float)"], "float32 values")],
        )
        try:
            onnx.defs.register_schema(schema)
        except Exception:  # registered concurrently by someone else: fine
            pass


def ensure_opset(model: onnx.ModelProto) -> None:
    for imp in model.opset_import:
        if imp.domain == DOMAIN:
            imp.version = max(imp.version, OPSET_VERSION)
            return
    model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 1


# ------------------------------------------------------------------ naming

def name_unnamed_nodes(graph: onnx.GraphProto) -> int:
    """Give every unnamed node a unique name `<op_type>_<index>`; returns how many were named."""
    taken = {n.name for n in graph.node if n.name}
    count = 0
    for i, node in enumerate(graph.node):
        if node.name:
            continue
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        taken.add(name)
        count += 1
    return count


def unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


# ------------------------------------------------------------------ index

@dataclass
class ConstantValue:
    """A constant tensor known by shape, with its values computed on demand.

    ConstantOfShape keeps its fill value instead of materialising the tensor
    (the light model zoo stores every weight that way)."""

    shape: tuple[int, ...]
    fill: float | None = None
    _array: np.ndarray | None = field(default=None, repr=False)
    _compute: object = field(default=None, repr=False)

    def array(self) -> np.ndarray:
        if self._array is None:
            if self.fill is not None:
                self._array = np.full(self.shape, self.fill, dtype=np.float32)
            else:
                self._array = self._compute()
        return self._array

    def mean_abs(self, axis: int | None = None) -> np.ndarray:
        """mean|W| over the tensor (axis None) or per index of `axis`."""
        if self.fill is not None:
            n = 1 if axis is None else self.shape[axis]
            return np.full((n,), abs(self.fill), dtype=np.float64)
        a = np.abs(self.array().astype(np.float64))
        if axis is None:
            return np.array([a.mean()])
        other = tuple(i for i in range(a.ndim) if i != axis)
        return a.mean(axis=other)


class GraphIndex:
    """Producers, consumers and constants of a graph (main graph only)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.graph = g
        self.initializers = {t.name: t for t in g.initializer}
        self.graph_inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.graph_outputs = [o.name for o in g.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        for node in g.node:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for port, i in enumerate(node.input):
                if i:
                    self.consumers.setdefault(i, []).append((node, port))
        self.nodes_by_name = {n.name: n for n in g.node}
        self._const: dict[str, bool] = {}
        self._values: dict[str, ConstantValue] = {}

    def is_constant(self, tensor: str) -> bool:
        """Whether `tensor` is computed from initializers alone (iterative: graphs can be thousands of nodes deep)."""
        if not tensor:
            return False
        memo = self._const
        stack, expanded = [tensor], set()
        while stack:
            t = stack[-1]
            if t not in memo:
                node = self.producer.get(t)
                if t in self.initializers:
                    memo[t] = True
                elif node is None or node.op_type in _NONDETERMINISTIC or node.domain not in ("", "ai.onnx"):
                    memo[t] = False
                else:
                    inputs = [i for i in node.input if i]
                    pending = [i for i in inputs if i not in memo]
                    if pending and t not in expanded:
                        expanded.add(t)  # come back to t once its inputs are known
                        stack.extend(pending)
                        continue
                    # inputs still unknown on the way back: t is its own ancestor (a cycle), not constant
                    memo[t] = not pending and all(memo[i] for i in inputs)
            stack.pop()
        return memo[tensor]

    def constant_value(self, tensor: str) -> ConstantValue:
        """Shape and values of a constant tensor (is_constant(tensor) must hold)."""
        if tensor in self._values:
            return self._values[tensor]
        if tensor in self.initializers:
            arr = numpy_helper.to_array(self.initializers[tensor])
            value = ConstantValue(tuple(arr.shape), _array=arr)
        else:
            node = self.producer[tensor]
            if node.op_type == "Constant":
                arr = _constant_node_value(node)
                value = ConstantValue(tuple(arr.shape), _array=arr)
            elif node.op_type == "ConstantOfShape" and self.is_constant(node.input[0]):
                shape = tuple(int(d) for d in self.constant_value(node.input[0]).array().reshape(-1))
                fill = 0.0
                for a in node.attribute:
                    if a.name == "value":
                        fill = float(numpy_helper.to_array(a.t).reshape(-1)[0])
                value = ConstantValue(shape, fill=fill)
            else:
                arr = self._evaluate(tensor)
                value = ConstantValue(tuple(arr.shape), _array=arr)
        self._values[tensor] = value
        return value

    def _evaluate(self, tensor: str) -> np.ndarray:
        """Run the constant sub-graph that computes `tensor` with onnx.reference."""
        from onnx.reference import ReferenceEvaluator

        needed: list[onnx.NodeProto] = []
        seen: set[str] = set()
        inits: dict[str, onnx.TensorProto] = {}

        def visit(t: str) -> None:
            if t in seen or not t:
                return
            seen.add(t)
            if t in self.initializers:
                inits[t] = self.initializers[t]
                return
            node = self.producer[t]
            for i in node.input:
                visit(i)
            if all(id(n) != id(node) for n in needed):
                needed.append(node)

        visit(tensor)
        order = {id(n): k for k, n in enumerate(self.graph.node)}
        needed.sort(key=lambda n: order[id(n)])
        g = helper.make_graph(
            needed, "const", [], [helper.make_tensor_value_info(tensor, onnx.TensorProto.UNDEFINED, None)],
            initializer=list(inits.values()),
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", default_opset(self.model))])
        m.ir_version = self.model.ir_version if self.model.ir_version >= 3 else 3
        return np.asarray(ReferenceEvaluator(m).run(None, {})[0])


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray:
    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    raise ModelError(f"Constant node {node.name!r}: unsupported value attribute")


# ------------------------------------------------------------------ shapes

def quantizers_as_identity(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for onnx shape inference, which cannot infer through the com.onnxqat ops: each quantizer (its output
    is shaped like its input 0) becomes an Identity of that input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in m.graph.node:
        if is_quantizer(n):
            n.CopyFrom(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    return m


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Tensor name -> shape (ints, None for unknown dims) from onnx shape inference; absent when unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:
        inferred = model
    shapes: dict[str, tuple] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def tensor_elem_type(model: onnx.ModelProto, tensor: str) -> int | None:
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        if vi.name == tensor and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    for t in g.initializer:
        if t.name == tensor:
            return t.data_type
    return None
