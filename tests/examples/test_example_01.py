"""examples/01_lenet_fashion_mnist: runs the README's quick command and checks its table against the documented ranges.

The command is parsed out of examples/01_lenet_fashion_mnist/README.md (the line that runs `run.sh --quick`), so the
README cannot go stale; the test only appends `--out <tmp dir>`. About 2 minutes on 2 cores (three 1-epoch trainings
on 27000 images, fuse, evaluation of 10000 test images in four models). The Python-API twin (run.py) runs on a small
slice. Needs Fashion-MNIST (Debian package dataset-fashion-mnist) and the stock-onnxruntime env (.venv-stock, made
by scripts/make_stock_env.sh on first use).
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
HERE = REPO / "examples" / "01_lenet_fashion_mnist"
FASHION = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file(),
                                 reason="needs Fashion-MNIST: sudo apt-get install dataset-fashion-mnist")]


def readme_commands(marker: str) -> list[list[str]]:
    """The README's command lines that contain `marker` (inside ``` blocks, as a user would paste them)."""
    text = (HERE / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    cmds = [ln.strip() for b in blocks for ln in b.splitlines() if marker in ln and not ln.strip().startswith("#")]
    return [shlex.split(c, comments=True) for c in cmds]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cmds = readme_commands("run.sh --quick")
    assert len(cmds) == 1, f"README.md should have exactly one 'run.sh --quick' command, found {cmds}"
    out = tmp_path_factory.mktemp("ex01")
    cmd = cmds[0] + ["--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    sys.stdout.write(proc.stdout[-4000:])
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads((out / "results.json").read_text())
    res["stdout"], res["dir"] = proc.stdout, out
    return res


def test_readme_quick_ranges(quick):
    s = quick["stages"]
    # README (commit 24eda51): FP32 78.30, clamp 77.28, W4A4 fake-quant 79.64, fused 79.64 (seed 0, this machine)
    assert quick["test_images"] == 10000
    assert 75.0 <= s["fp32"]["top1"] <= 84.0, s["fp32"]
    assert 73.0 <= s["clamp"]["top1"] <= 83.0, s["clamp"]
    assert 76.0 <= s["sat4"]["top1"] <= 85.0, s["sat4"]
    # the W4A4 model is no worse than the FP32 one by more than a point after the same training
    assert s["sat4"]["top1"] >= s["fp32"]["top1"] - 1.0
    # our evaluation reproduces the figure onnxqat train logged for the same model and test set
    for k in ("fp32", "clamp", "sat4"):
        assert abs(s[k]["top1"] - s[k]["train_log_test_top1"]) <= 0.02, (k, s[k])


def test_fused_matches_fake_quant(quick):
    a, s = quick["agreement"], quick["stages"]
    assert s["fused"]["label"].startswith("fused integer-only (stock onnxruntime ")
    assert a["top1_diff_points"] <= 0.05, a  # issue 5: fused within 0.05 points of the fake-quantized model
    assert a["top1_agreement"] >= 99.95, a
    assert a["logits_match"] >= 99.8, a  # float sum order may flip an activation code on a handful of images


def test_fused_size_and_graph(quick):
    z, g = quick["size"], quick["fused_graph"]
    # 61470 weights: conv1 150 and fc2 840 at 8 bits, the rest at 4 bits -> ~31 kB of codes + scales/biases
    assert z["fused_bytes"] < 50_000 and z["ratio"] > 5.0, z
    assert g["batchnorm_nodes"] == 0 and g["custom_domain_nodes"] == 0, g


def test_pictures_and_table(quick):
    out = quick["dir"]
    for stage in ("clamp", "sat4"):
        for layer in ("conv1", "conv2", "conv3", "fc1", "fc2"):
            png = out / stage / "histograms" / f"{layer}_weights_quant.distrib.png"
            assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    for name in ("fused_graph.png", "qat_graph.png"):
        assert (out / "pictures" / name).stat().st_size > 10_000
    text = quick["stdout"]
    for row in ("FP32 baseline", "SAT clamp", "SAT W4A4 fake-quant", "fused integer-only", "top-1 agreement",
                "model size"):
        assert row in text
    assert "[I:onnxruntime" not in text


def test_python_api_twin(tmp_path):
    """run.py (the public API) on a small slice: same stages, fused model agrees with the fake-quantized one."""
    cmds = readme_commands("run.py")
    assert cmds, "README.md should show the Python-API command (run.py)"
    out = tmp_path / "py"
    cmd = [sys.executable, str(HERE / "run.py"), "--epochs", "1", "--limit-train", "2000", "--limit-test", "1000",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads((out / "results.json").read_text())
    assert res["test_images"] == 1000
    assert res["stages"]["sat4"]["top1"] > 30.0  # ten classes: chance is 10%
    assert res["agreement"]["top1_agreement"] == 100.0
    assert (out / "lenet.int.onnx").is_file() and (out / "pictures" / "fused_graph.png").is_file()


def test_top_readme_runs_the_same_quick_command():
    """The top-level README's main-job command is this example's quick command (no drift between the two READMEs)."""
    (cmd,) = readme_commands("run.sh --quick")
    top = (REPO / "README.md").read_text()
    assert shlex.join(cmd) in top, f"README.md does not run `{shlex.join(cmd)}`"
