"""`onnxqat train` as a command: outputs, one-line errors, kill -9 mid-epoch then --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from train_helpers import FASHION

ROOT = Path(__file__).resolve().parents[2]


def _cmd(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return [sys.executable, "-m", "onnxqat", "train", *map(str, args)], env


def _inits(p):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(p)).graph.initializer}


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    from onnxqat.models.lenet import build_lenet

    p = tmp_path_factory.mktemp("m") / "lenet.onnx"
    onnx.save(build_lenet(0), str(p))
    return p


def test_cli_errors_are_one_line(tmp_path, lenet_file):
    cmd, env = _cmd(lenet_file, "--data", tmp_path / "nothing.npz", "--out", tmp_path / "o", "--epochs", "1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("onnxqat: error: data not found")
    assert "Traceback" not in r.stderr


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_kill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, lenet_file):
    common = [lenet_file, "--data", "fashion-mnist", "--epochs", "3", "--limit-train", "3000", "--limit-test", "200",
              "--batch-size", "32", "--lr", "0.02", "--lr-policy", "cosine", "--seed", "3", "--threads", "1",
              "--no-progress"]
    cmd, env = _cmd(*common, "--out", tmp_path / "full")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "full" / "histograms").is_dir()
    rows = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert len(rows) == 3 and all(k in rows[0] for k in ("train_loss", "test_top1", "lr", "images_per_s"))

    cut = tmp_path / "cut"
    cmd, env = _cmd(*common, "--out", cut)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (cut / "metrics.json").is_file() and time.time() < deadline and p.poll() is None:
        time.sleep(0.01)
    time.sleep(0.15)  # into epoch 2
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    rows = json.loads((cut / "metrics.json").read_text())
    assert len(rows) in (1, 2), "the kill came too late to test anything"
    cmd, env = _cmd(*common, "--out", cut, "--resume")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after epoch" in r.stderr
    a, b = _inits(tmp_path / "full" / "model.onnx"), _inits(cut / "model.onnx")
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def test_cli_solver_options_reach_the_settings(tmp_path):
    """--norm-decay, --momentum-form and a bad --momentum-form from the command line (the settings log names the
    source; a bad value is one line)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from train_helpers import small_cnn, synthetic_npz

    onnx.save(small_cnn(0, bn=True), str(tmp_path / "m.onnx"))
    npz = synthetic_npz(tmp_path / "d.npz", 64)
    base = ["--data", npz, "--epochs", "1", "--batch-size", "32", "--validation", "0", "--no-progress", "--threads", "1"]
    cmd, env = _cmd(tmp_path / "m.onnx", *base, "--out", tmp_path / "a", "--norm-decay", "0", "--momentum-form",
                    "pytorch")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "  norm_decay 0 (command line)" in r.stderr and "  momentum_form pytorch (command line)" in r.stderr
    cmd, env = _cmd(tmp_path / "m.onnx", *base, "--out", tmp_path / "b", "--momentum-form", "keras")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == ("onnxqat: error: train setting momentum_form = 'keras' (command line): "
                                                 "must be n2d2 or pytorch")
