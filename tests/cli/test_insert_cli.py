"""`onnxqat insert`, `onnxqat recipes`, `onnxqat inspect` through typer's CliRunner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from onnxqat.cli.app import app
from onnxqat.recipes import list_recipes
from tests.passes.models import conv_gemm, unhandled

runner = CliRunner()


@pytest.fixture()
def model_path(tmp_path):
    p = tmp_path / "convnet.onnx"
    onnx.save(conv_gemm(), str(p))
    return p


def test_recipes_lists_one_line_each():
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    names = [r.name for r in list_recipes()]
    assert [line.split()[0] for line in lines] == names
    assert {"sat4", "sat8", "sat4-clamp", "sat4-weights", "lsq4", "lsq8"} <= set(names)


def test_insert_writes_model_and_inspect_reads_it(model_path, tmp_path):
    out = tmp_path / "out" / "q.onnx"
    result = runner.invoke(app, ["insert", str(model_path), "--recipe", "sat4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 weight quantizers, 1 activation quantizers" in result.stdout
    q = onnx.load(str(out))
    onnx.checker.check_model(q, full_check=True)
    assert sum(n.domain == "com.onnxqat" for n in q.graph.node) == 3
    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "Conv_1_wquant" in result.stdout and "Relu_2_aquant" in result.stdout
    # weights: conv 108 at 8 bits (first), fc 40 at 8 bits (last); biases 4 + 10 float32
    assert "weight memory: 204 B at these bits vs 648 B float32" in result.stdout


def test_dry_run_prints_plan_and_writes_nothing(model_path, tmp_path):
    out = tmp_path / "q.onnx"
    result = runner.invoke(app, ["insert", str(model_path), "-r", "lsq4", "-o", str(out), "--dry-run"])
    assert result.exit_code == 0
    assert result.stdout.startswith("# onnxqat plan: model convnet, recipe lsq4")
    assert "Gemm_5_wquant  LsqQuant" in result.stdout
    assert not out.exists()


def test_calibration_data_option(model_path, tmp_path):
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    result = runner.invoke(app, ["insert", str(model_path), "-r", "sat4", "--dry-run", "--calibration-data", str(npz)])
    assert result.exit_code == 0, result.output
    assert "[calibrated]" in result.stdout
    npy = tmp_path / "calib.npy"
    np.save(npy, np.ones((2, 3, 8, 8), np.float32))
    result = runner.invoke(app, ["insert", str(model_path), "-r", "lsq4", "--dry-run", "--calibration-data", str(npy)])
    assert result.exit_code == 0, result.output
    assert "[calibrated]" in result.stdout


def test_warnings_go_to_stderr(tmp_path):
    p = tmp_path / "u.onnx"
    onnx.save(unhandled(), str(p))
    result = runner.invoke(app, ["insert", str(p), "-r", "sat4", "--dry-run"])
    assert result.exit_code == 0
    assert "onnxqat: warning: 2 place(s) not quantized" in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["missing.onnx", "-r", "sat4"], "model file not found: missing.onnx"),
        (["{bad}", "-r", "sat4"], "not an ONNX model"),
        (["{model}", "-r", "sat5"], "unknown recipe 'sat5'"),
        (["{model}", "-r", "{recipe_unknown_key}"], "key 'weights.rnge' is unknown"),
        (["{model}", "-r", "{recipe_bad_type}"], "key 'weights.range' must be int"),
        (["{model}", "-r", "{recipe_bad_range}"], "key 'activations.range' must be an integer in [1, 65535]"),
        (["{model}", "-r", "{recipe_bad_node}"], "key 'nodes.\"conv_zz\"' names no node of model convnet"),
        (["{noweights}", "-r", "sat4"], "no quantizable layer"),
        (["{model}", "-r", "sat4", "--calibration-data", "missing.npz"], "calibration data not found: missing.npz"),
        (["{model}", "-r", "sat4", "--calibration-data", "{bad}"], "not a numpy .npz/.npy file"),
        (["{model}", "-r", "sat4", "-o", "{bad}/sub/out.onnx"], "cannot write"),
    ],
)
def test_bad_input_one_line_exit_1_no_output(args, message, model_path, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage\xff" * 10)
    recipes = {
        "recipe_unknown_key": "[weights]\nrnge = 4\n",
        "recipe_bad_type": '[weights]\nrange = "4"\n',
        "recipe_bad_range": "[activations]\nrange = 0\n",
        "recipe_bad_node": '[nodes."conv_zz"]\nrange = 3\n',
    }
    paths = {"model": str(model_path), "bad": str(bad)}
    for k, text in recipes.items():
        (tmp_path / f"{k}.toml").write_text(text)
        paths[k] = str(tmp_path / f"{k}.toml")
    nw = tmp_path / "noweights.onnx"
    onnx.save(onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 13]>\ng (float[1,2] x) => (float[1,2] y) { y = Relu(x) }'), str(nw))
    paths["noweights"] = str(nw)
    out = tmp_path / "out.onnx"
    argv = ["insert"] + [a.format(**paths) for a in args] + ([] if "-o" in args else ["-o", str(out)])
    result = runner.invoke(app, argv)
    assert result.exit_code == 1
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxqat: error: ") and message in err[0], result.stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".out.onnx.*"))  # no temporary left behind


def test_insert_requires_output_unless_dry_run(model_path):
    result = runner.invoke(app, ["insert", str(model_path), "-r", "sat4"])
    assert result.exit_code == 1
    assert "missing --output/-o" in result.stderr


def test_inspect_float_model_says_no_quantizers(model_path):
    result = runner.invoke(app, ["inspect", str(model_path)])
    assert result.exit_code == 0
    assert "no quantizer nodes" in result.stderr
    assert "0 weight quantizers, 0 activation quantizers" in result.stdout


def test_inspect_missing_file():
    result = runner.invoke(app, ["inspect", "nothere.onnx"])
    assert result.exit_code == 1
    assert result.stderr.strip() == "onnxqat: error: model file not found: nothere.onnx"
