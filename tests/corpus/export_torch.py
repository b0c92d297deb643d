"""Exports the corpus's PyTorch architectures to ONNX. Runs in the export venv (torch 2.13.0 CPU, onnx 1.17.0):

    .venv-export/bin/python tests/corpus/export_torch.py --out .corpus --jobs resnet18@11,resnet18@13 --report r.json

For each architecture: random weights from a seed derived from its name, 10 forward passes in train mode on
image-like random inputs in the input's value range (inputs.py; realistic BatchNorm running statistics), eval(),
torch's outputs on a fixed input batch, then `torch.onnx.export(dynamo=False)` at each requested opset with a
dynamic batch axis and the exporter's defaults (BatchNorm folded into Conv; the *_bn specs export with
training=PRESERVE instead); classifiers get their last Linear scaled so logits spread by ~2 over images.
Writes <name>.op<opset>.onnx and <name>.ref.npz ("input:<name>" and "output:<name>" arrays) through temp files.
--weights NAME=PATH loads a pretrained state_dict instead (the pypi tier's mnist_cnn).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import numpy as np
import onnx
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import architectures  # noqa: E402
from catalog import SPEC_BY_NAME  # noqa: E402
from inputs import sample_inputs  # noqa: E402

BN_PASSES, BN_BATCH, REF_BATCH = 10, 8, 4


def scale_logits(model, spec, rng, target_std: float = 2.0) -> None:
    """Scales the classifier's last Linear so the logits vary over images by about `target_std` (a trained
    classifier's logits spread over several units; default-initialised ones over ~0.1, a near-uniform softmax)."""
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        logits = model(*[torch.from_numpy(x) for x in sample_inputs(spec, BN_BATCH * 2, rng)])
        head.weight.mul_(target_std / float(logits.std(0).mean()))


def build(spec, weights: str | None = None) -> tuple[torch.nn.Module, dict[str, np.ndarray]]:
    arch = spec.arch or spec.name
    seed = zlib.crc32(arch.encode())
    torch.manual_seed(seed)
    model = getattr(architectures, arch)()
    rng = np.random.default_rng(seed)
    if weights:  # a pretrained state_dict: nothing to calibrate or rescale
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval(), reference(model, spec, seed)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for bn in bns:  # cumulative average over the passes: the statistics of the data, as after real training
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(BN_PASSES):
            model(*[torch.from_numpy(x) for x in sample_inputs(spec, BN_BATCH, rng)])
    for bn in bns:
        bn.momentum = 0.1  # torch's default, what the *_bn exports write into BatchNormalization
    model.eval()
    if spec.num_classes:
        scale_logits(model, spec, rng)
    return model, reference(model, spec, seed)


def reference(model, spec, seed: int) -> dict[str, np.ndarray]:
    """torch's outputs on a fixed batch: the .ref.npz arrays."""
    ref_in = sample_inputs(spec, REF_BATCH, np.random.default_rng(seed + 1))
    with torch.no_grad():
        out = model(*[torch.from_numpy(x) for x in ref_in])
    outs = out if isinstance(out, tuple) else (out,)
    ref = {f"input:{i.name}": x for i, x in zip(spec.inputs, ref_in)}
    ref.update({f"output:{o.name}": y.numpy() for o, y in zip(spec.outputs, outs)})
    return ref


def export(model, spec, ref, opset: int, path: str) -> dict:
    names_in = [i.name for i in spec.inputs]
    names_out = [o.name for o in spec.outputs]
    args = tuple(torch.from_numpy(ref[f"input:{n}"]) for n in names_in)
    tmp = path + ".tmp"
    torch.onnx.export(
        model, args, tmp, dynamo=False, opset_version=opset, input_names=names_in, output_names=names_out,
        dynamic_axes={n: {0: "N"} for n in names_in + names_out},
        training=torch.onnx.TrainingMode.EVAL if spec.bn_folded else torch.onnx.TrainingMode.PRESERVE)
    m = onnx.load(tmp)
    onnx.checker.check_model(m)
    os.replace(tmp, path)
    return {"nodes": len(m.graph.node), "ops": sorted({n.op_type for n in m.graph.node})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for the .onnx and .ref.npz files")
    ap.add_argument("--jobs", required=True, help="comma-separated name@opset")
    ap.add_argument("--report", required=True, help="JSON file listing what was written")
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                    help="pretrained state_dict for a model (no BatchNorm calibration, no logit scaling)")
    args = ap.parse_args()
    weights = dict(w.split("=", 1) for w in args.weights)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    jobs: dict[str, list[int]] = {}
    for job in args.jobs.split(","):
        name, opset = job.split("@")
        jobs.setdefault(name, []).append(int(opset))
    report = {"torch": torch.__version__, "onnx": onnx.__version__, "models": []}
    for name, opsets in jobs.items():
        spec = SPEC_BY_NAME[name]
        t0 = time.perf_counter()
        model, ref = build(spec, weights.get(name))
        ref_path = os.path.join(args.out, f"{name}.ref.npz")
        with open(ref_path + ".tmp", "wb") as f:
            np.savez(f, **ref)
        os.replace(ref_path + ".tmp", ref_path)
        for opset in opsets:
            path = os.path.join(args.out, f"{name}.op{opset}.onnx")
            info = export(model, spec, ref, opset, path)
            report["models"].append({"name": name, "opset": opset, "path": os.path.basename(path),
                                     "reference": os.path.basename(ref_path), **info})
        print(f"export_torch: {name} at opsets {opsets} in {time.perf_counter() - t0:.1f} s", flush=True)
    with open(args.report, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
