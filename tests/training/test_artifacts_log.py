"""Building training artifacts prints no ONNX Runtime INFO lines, but other stderr output still gets through."""

import os
import sys

from onnxqat.models.lenet import build_lenet
from onnxqat.training import artifacts


def test_generate_prints_no_ort_info_lines(tmp_path, capfd):
    model = build_lenet(seed=0)
    artifacts.import_ort_training()
    paths = artifacts.generate(model, tmp_path, artifacts.plan_training(model))
    assert paths["train"].is_file()
    err = capfd.readouterr().err
    assert "[I:onnxruntime" not in err


def test_filter_keeps_other_lines(capfd):
    with artifacts._without_ort_info_lines():
        os.write(2, b"2026-01-01 00:00:00.0 [I:onnxruntime:Default, x.cc:1 f] dropped\n")
        os.write(2, b"2026-01-01 00:00:00.0 [W:onnxruntime:Default, x.cc:2 f] a warning\n")
        print("python-level line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "dropped" not in err
    assert "a warning" in err and "python-level line" in err
