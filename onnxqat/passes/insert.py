"""`plan()` decides where quantizers go; `insert()` applies that plan.

    qat = insert("resnet18.onnx", "sat4")                      # ModelProto with quantizer nodes
    print(plan("resnet18.onnx", "sat4").format())              # what insert would do (the --dry-run)
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings as pywarnings

import numpy as np
import onnx

from onnxqat.errors import ModelError, RecipeError
from onnxqat.graph import GraphIndex, infer_shapes, load_model, name_unnamed_nodes, save_model
from onnxqat.ops.schema import DOMAIN
from onnxqat.passes import activations as act_pass
from onnxqat.passes import weights as w_pass
from onnxqat.passes.apply import apply_plan
from onnxqat.passes.calibration import lsq_step, sat_alpha
from onnxqat.passes.plan import Plan, PlanEntry
from onnxqat.passes.strip import strip_quantizers
from onnxqat.recipes import Recipe, load_recipe

__all__ = ["insert", "plan", "insert_file", "prepare", "strip_quantizers", "QuantizationWarning"]


class QuantizationWarning(UserWarning):
    """Ops the passes could not handle (their tensors stay float)."""


def prepare(model) -> onnx.ModelProto:
    """A copy of the model with every node named (names are how plans, overrides and quantizers refer to nodes)."""
    m = load_model(model)
    _check_input(m)
    name_unnamed_nodes(m.graph)
    return m


def _check_input(m: onnx.ModelProto) -> None:
    """The ONNX checker on the model as given (node specs, single assignment, initializers): an invalid model is a
    ModelError here, not an output that fails the checker later. Models over protobuf's 2 GB are not checked."""
    if m.ByteSize() > 2**31 - 1:
        return
    try:
        onnx.checker.check_model(m)
    except onnx.checker.ValidationError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        node = next((ln.split("Name:")[1].strip() for ln in str(exc).splitlines() if "Name:" in ln), None)
        raise ModelError(f"the model is not valid ONNX: {first}" + (f" (node {node})" if node else "")) from None


def _first_and_last(index: GraphIndex, weighted: set[str]) -> tuple[set[str], set[str]]:
    """Weighted layers reached from a network input (first) or reaching a network output (last) with no other
    weighted layer in between."""
    first, seen = set(), set()
    stack = list(index.graph_inputs)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for node, _port in index.consumers.get(t, []):
            if node.name in weighted:
                first.add(node.name)
            else:
                stack.extend(o for o in node.output if o)
    last, seen = set(), set()
    stack = list(index.graph_outputs)
    while stack:
        t = stack.pop()
        if t in seen or index.is_constant(t):
            continue
        seen.add(t)
        node = index.producer.get(t)
        if node is None:
            continue
        if node.name in weighted:
            last.add(node.name)
        else:
            stack.extend(i for i in node.input if i)
    return first, last


def _batchnorm_follows(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """Whether the layer's output feeds a BatchNormalization (directly, or through its bias Add)."""
    for consumer, _ in index.consumers.get(node.output[0], []):
        if consumer.op_type == "BatchNormalization":
            return True
        if consumer.op_type == "Add" and any(c.op_type == "BatchNormalization"
                                             for c, _ in index.consumers.get(consumer.output[0], [])):
            return True
    return False


def _check_weight(index, node, tensor: str, ws, recipe: Recipe) -> None:
    """A weight the quantizer ops would refuse or turn into inf/NaN: refused here, naming the tensor or the key."""
    if ws.method == "sat" and ws.mode in ("symmetric", "asymmetric", "asymmetric-clamp") and ws.range < 2:
        raise RecipeError(f"{recipe.source}: weights of {node.op_type} node {node.name}: range {ws.range} with "
                          f"mode \"{ws.mode}\" has no level besides 0 (range >= 2)")
    if ws.integer and ws.method != "sat":
        raise RecipeError(f"{recipe.source}: weights of {node.op_type} node {node.name}: integer = true is SAT's "
                          "QWeight.Mode=Integer (LSQ's weights are integers times a learned step already)")
    if ws.integer and ws.apply_scaling and _batchnorm_follows(index, node):
        raise RecipeError(f"{recipe.source}: weights of {node.op_type} node {node.name}: integer = true with "
                          "apply_scaling = true: scale-adjusted weights are not integers (set apply_scaling = false "
                          "for this layer, as N2D2's IntegerOnly recipes do)")
    cv = index.constant_value(tensor)
    w = np.asarray([cv.fill]) if cv.fill is not None else cv.array()
    if not np.all(np.isfinite(w)):
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(w)))
        raise ModelError(f"weight {tensor} of {node.op_type} node {node.name} has {bad} inf/NaN value(s): "
                         "fix the model (the quantizer of an inf weight is NaN)")


DEFAULT_N2D2_BATCH = 128  # TrainConfig's default batch size: activations.grad_scale = "n2d2" without a batch size


def _plan(m: onnx.ModelProto, recipe: Recipe, calibration_data=None) -> Plan:
    index = GraphIndex(m)
    warns: list[str] = []
    name = m.graph.name or "model"
    present = [n.name for n in m.graph.node if n.domain == DOMAIN]
    if present:
        raise ModelError(
            f"model {name} already holds quantizer nodes ({present[0]}, ...): strip them first "
            "(onnxqat.passes.strip.strip_quantizers)"
        )
    layers = w_pass.find_weighted_layers(index, warns)
    if not layers:
        raise ModelError(
            f"model {name}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant weight)"
        )
    weighted = {layer.node.name for layer in layers}
    acts = act_pass.find_activations(index, layers, weighted)
    if not recipe.activations.linear:  # Add/Sum/Concat outputs: only activations.linear takes them
        acts = [a for a in acts if not a.combined]
    if recipe.activations.integer_export:  # the codes fuse needs for tables, residual branches and gates
        acts += act_pass.export_sources(index, {a.tensor for a in acts})
    act_names = {a.node.name for a in acts}
    for node_name in recipe.nodes:
        if node_name not in index.nodes_by_name:
            raise RecipeError(f"{recipe.source}: key 'nodes.\"{node_name}\"' names no node of model {name}")
        if node_name not in weighted and node_name not in act_names:
            op = index.nodes_by_name[node_name].op_type
            raise RecipeError(
                f"{recipe.source}: key 'nodes.\"{node_name}\"': {op} node {node_name} gets no quantizer "
                "(neither a weighted layer nor an activation feeding one)"
            )
    first, last = _first_and_last(index, weighted)
    shapes = infer_shapes(m)
    plan = Plan(model=name, recipe=recipe.name)

    # ---- weights: one quantizer per weight tensor (a shared weight is quantized once, for all its layers)
    by_tensor: dict[str, PlanEntry] = {}
    settings_of: dict[str, tuple] = {}
    not_integer: list[str] = []  # weights.integer asked where no BatchNormalization absorbs the factor
    for layer in layers:
        node = layer.node
        ws = recipe.weight_settings(node.op_type, node.name, node.name in first, node.name in last)
        if not ws.enabled:
            continue
        tensor = node.input[layer.port]
        notes = tuple(n for n, on in (("first", node.name in first), ("last", node.name in last)) if on)
        if tensor in by_tensor:
            prev = by_tensor[tensor]
            by_tensor[tensor] = _with_consumer(prev, node.name)
            if settings_of[tensor] != (ws, layer.axis, layer.fan_out):
                warns.append(
                    f"weight {tensor} is shared by {prev.node} and {node.name}, whose settings differ: "
                    f"one quantizer with {prev.node}'s settings"
                )
            continue
        settings_of[tensor] = (ws, layer.axis, layer.fan_out)
        _check_weight(index, node, tensor, ws, recipe)
        common = dict(
            kind="weight", name=f"{node.name}_wquant", node=node.name, node_op=node.op_type, tensor=tensor,
            port=layer.port, method=ws.method, range=ws.range, consumers=(node.name,), axis=layer.axis, notes=notes,
        )
        if ws.method == "sat":
            restore = None
            mode = ws.restore_scale_mode
            bn_after = _batchnorm_follows(index, node)
            if ws.integer and not bn_after:
                not_integer.append(node.name)
            if ws.integer and bn_after:
                restore = (float(w_pass.sat_integer_factor(ws)),)
                common["notes"] = (*common["notes"], "integer weights")
            elif not ws.apply_scaling and (mode == "always" or mode == "auto" and not bn_after):
                restore = w_pass.sat_restore_scale(index, layer, ws)
            entry = PlanEntry(
                op_type="SatWeightQuant", mode=ws.mode, fan_out=layer.fan_out if ws.apply_scaling else 0,
                restore_scale=restore, **common
            )
        else:
            entry = PlanEntry(
                op_type="LsqQuant", step=w_pass.weight_step_init(index, layer, ws), signed=True,
                grad_scale=w_pass.weight_grad_scale(layer, ws), per_channel=ws.per_channel, **common,
            )
        by_tensor[tensor] = entry
    if not_integer:
        warns.append(f"integer weights (weights.integer) only where a BatchNormalization follows the layer to absorb "
                     f"the factor R; {len(not_integer)} layer(s) keep fake-quantized weights: "
                     f"{', '.join(not_integer[:4])}{' ...' if len(not_integer) > 4 else ''}")
    weight_entries = list(by_tensor.values())

    # ---- activations
    act_entries = []
    chosen = []
    for a in acts:
        # a linear source produced by a weighted layer: its node override holds weight keys, [activations] applies
        s = recipe.activations if a.node.name in weighted else recipe.activation_settings(a.node.name)
        if not s.enabled:
            continue
        if a.linear and not s.linear:
            hint = " (set activations.linear = true to quantize it" + (
                ": a signed LSQ quantizer, SAT's includes a ReLU)" if s.method == "sat" else ")")
            warns.extend(f"{r}: not quantized{hint}" for r in a.reasons)
            continue
        chosen.append((a, s))
    calibrated: dict[str, np.ndarray] = {}
    if chosen and calibration_data is not None:
        from onnxqat.passes.calibration import collect, load_calibration

        feeds = load_calibration(calibration_data, index.graph_inputs)
        calibrated = collect(m, feeds, [a.tensor for a, _ in chosen])
    for a, s in chosen:
        consumers = tuple(n.name for n, _ in index.consumers.get(a.tensor, []))
        sat = s.method == "sat" and not a.linear  # SAT's CG-PACT is a ReLU: linear sources take a signed LSQ
        common = dict(
            kind="activation", name=a.quantizer_name, node=a.node.name, node_op=a.node.op_type,
            tensor=a.tensor, port=-1, method="sat" if sat else "lsq", range=s.range, axis=1,
        )
        notes = []
        x = calibrated.get(a.tensor)
        if sat:
            alpha = float(s.alpha)
            measured = sat_alpha(x, s.percentile) if x is not None else None
            if measured is not None:
                alpha = measured
                notes.append("calibrated")
            if alpha > a.max_value:
                alpha = a.max_value
                notes.append(f"alpha capped at the {a.node.op_type} max")
            entry = PlanEntry(
                op_type="SatActQuant", alpha=float(np.float32(alpha)), consumers=consumers, notes=tuple(notes),
                **common,
            )
        else:
            qp = w_pass.lsq_qp(s.range, a.signed)
            step = float(s.step)
            measured = lsq_step(x, qp) if x is not None else None
            if measured is not None:
                step = measured
                notes.append("calibrated")
            n = act_pass.features_per_sample(shapes.get(a.tensor))
            if n is None and x is not None:
                n = act_pass.features_per_sample(tuple(x.shape))
            if n is None:
                n = 1
                warns.append(
                    f"{a.node.op_type} node {a.node.name}: shape of {a.tensor} unknown (dynamic), LSQ grad_scale "
                    "uses N=1; give calibration data to take N from it"
                )
            if s.grad_scale == "n2d2":  # N2D2: the whole batch tensor, batch x features
                batch = s.grad_scale_batch or int(recipe.train.get("batch_size", DEFAULT_N2D2_BATCH))
                n *= batch
                notes.append(f"grad scale over batch {batch} x features (n2d2)")
            entry = PlanEntry(
                op_type="LsqQuant", step=(float(np.float32(step)),), signed=a.signed,
                grad_scale=float(np.float32(1.0 / math.sqrt(n * qp))), consumers=consumers, notes=tuple(notes),
                **common,
            )
        act_entries.append(entry)

    plan.entries = weight_entries + act_entries
    _check_names(m, plan)
    plan.warnings = list(dict.fromkeys(warns))
    if not plan.entries:
        raise ModelError(f"model {name}: recipe {recipe.name} enables no quantizer for this model")
    return plan


def _check_names(m: onnx.ModelProto, plan: Plan) -> None:
    """The names the quantizers take (CONVENTIONS.md) must be free in the model."""
    g = m.graph
    nodes = {n.name for n in g.node}
    tensors = {t for n in g.node for t in list(n.input) + list(n.output)}
    tensors |= {t.name for t in g.initializer} | {i.name for i in g.input} | {o.name for o in g.output}
    for e in plan.entries:
        if e.name in nodes and not (e.op_type == "SatActQuant" and e.name == e.node):
            raise ModelError(f"model {plan.model}: a node is already named {e.name}, the name of a quantizer")
        if e.output != e.tensor and e.output in tensors:
            raise ModelError(
                f"model {plan.model}: a tensor is already named {e.output}, the name of a quantizer output"
            )
        for suffix in ("alpha", "step", "range", "mode", "fan_out", "signed", "grad_scale", "axis"):
            if f"{e.name}.{suffix}" in tensors:
                raise ModelError(f"model {plan.model}: a tensor is already named {e.name}.{suffix}")


def _with_consumer(entry: PlanEntry, consumer: str) -> PlanEntry:
    return dataclasses.replace(entry, consumers=entry.consumers + (consumer,))


def _warn(plan: Plan) -> None:
    """One warning listing the places left float, one for the other remarks (e.g. unknown shapes)."""
    skipped = [w for w in plan.warnings if "not quantized" in w]
    other = [w for w in plan.warnings if "not quantized" not in w]
    if skipped:
        pywarnings.warn(
            f"{len(skipped)} place(s) not quantized: " + "; ".join(skipped), QuantizationWarning, stacklevel=3
        )
    if other:
        pywarnings.warn(f"{len(other)} remark(s): " + "; ".join(other), QuantizationWarning, stacklevel=3)


# metadata insert writes besides onnxqat.recipe/_toml (strip_quantizers drops every onnxqat.recipe* key):
TRAIN_KEY = "onnxqat.recipe_train"  # the recipe's [train] table as JSON: `onnxqat train`'s settings for this model
UNCALIBRATED_KEY = "onnxqat.recipe_uncalibrated"  # JSON list of activation quantizers set from recipe defaults


def record_metadata(m: onnx.ModelProto, p: Plan, recipe: Recipe) -> onnx.ModelProto:
    """Writes TRAIN_KEY and UNCALIBRATED_KEY into `m` (in place; returned): train uses the first as its settings
    and initialises the quantizers of the second from the first training batches."""
    import json

    values = {
        TRAIN_KEY: json.dumps(dict(recipe.train), sort_keys=True),
        UNCALIBRATED_KEY: json.dumps([e.name for e in p.activations if "calibrated" not in e.notes]),
    }
    meta = {q.key: q for q in m.metadata_props}
    for key, value in values.items():
        if key in meta:
            meta[key].value = value
        else:
            m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return m


def plan(model, recipe, calibration_data=None) -> Plan:
    """The quantizers `insert` would add (model: path or ModelProto; recipe: name, path or Recipe)."""
    m = prepare(model)
    p = _plan(m, load_recipe(recipe), calibration_data)
    _warn(p)
    return p


def insert(model, recipe, calibration_data=None) -> onnx.ModelProto:
    """A QAT model: `model` with the quantizers of `recipe` (see docs/CONVENTIONS.md for names and inputs).

    calibration_data: an .npz path or a dict {input name: array}; activation alpha/step are then set from a
    float run on it, else from the recipe."""
    r = load_recipe(recipe)
    m = prepare(model)
    p = _plan(m, r, calibration_data)
    _warn(p)
    return record_metadata(apply_plan(m, p, r), p, r)


def insert_file(src: str | os.PathLike, recipe, dst: str | os.PathLike, calibration_data=None) -> Plan:
    """insert() from file to file; the output is written atomically (nothing is written on error)."""
    r = load_recipe(recipe)
    m = prepare(src)
    p = _plan(m, r, calibration_data)
    _warn(p)
    save_model(record_metadata(apply_plan(m, p, r), p, r), dst)
    return p
