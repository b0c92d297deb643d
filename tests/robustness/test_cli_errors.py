"""Bad input through the real command line (`python -m onnxqat`, main()'s handlers): exit code, exactly one
`onnxqat: error:` line on stderr, no output file or folder left, input files unchanged."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from tests.training.train_helpers import small_cnn, synthetic_npz

REPO = Path(__file__).resolve().parents[2]


def cli(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxqat", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def one_error_line(r: subprocess.CompletedProcess, code: int, pattern: str) -> None:
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("onnxqat: error:")]
    assert r.returncode == code, (r.returncode, r.stderr[-1500:])
    assert len(errors) == 1 and pattern in errors[0], r.stderr[-1500:]
    assert "Traceback" not in r.stderr and "╭" not in r.stderr


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    import onnxqat

    qat = onnxqat.insert(small_cnn(0, bn=True), "lsq4")
    onnx.save(qat, str(d / "m.qat.onnx"))
    synthetic_npz(d / "d.npz", 64)
    return d


@pytest.mark.parametrize("args,pattern", [
    (["train"], "Missing argument 'model'"),
    (["fuse", "x.onnx", "--bogus"], "No such option: --bogus"),
    (["train", "m.qat.onnx", "-o", "out", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["insert", "m.qat.onnx", "-r", "lsq4", "-o", "o.onnx", "--calibration-data"], "requires an argument"),
])
def test_usage_errors_are_one_line_exit_2(files, args, pattern):
    r = cli(*[str(files / a) if a.endswith(".onnx") and a != "x.onnx" else a for a in args])
    one_error_line(r, 2, pattern)
    assert f"--help" in r.stderr


@pytest.mark.parametrize("cmd", ["insert", "fuse"])
def test_output_equal_to_input_is_refused(files, cmd, tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes((files / "m.qat.onnx").read_bytes())
    before = digest(src)
    extra = ["-r", "lsq4"] if cmd == "insert" else []
    r = cli(cmd, src, *extra, "-o", tmp_path / "." / "model.onnx")
    one_error_line(r, 1, "is the input model")
    assert digest(src) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


@pytest.mark.parametrize("option,value,pattern", [
    ("--max-iterations", "-2", "max_iterations = -2 (command line): must be an integer >= 1"),
    ("--validation", "-0.5", "validation must be a fraction in [0, 1)"),
    ("--threads", "-4", "threads = -4 (command line): must be an integer >= 0"),
    ("--limit-train", "-5", "limit_train must be a number of samples >= 1"),
    ("--warmup", "-3", "warmup = -3.0 (command line): must be a finite number of epochs >= 0"),
    ("--lr", "nan", "lr = nan (command line): must be a finite number >= 0"),
    ("--momentum", "1.5", "momentum = 1.5 (command line): must be a number in [0, 1)"),
])
def test_out_of_range_train_options(files, option, value, pattern, tmp_path):
    out = tmp_path / "run"
    r = cli("train", files / "m.qat.onnx", "-d", files / "d.npz", "-o", out, option, value, "--no-progress")
    one_error_line(r, 1, pattern)
    assert not out.exists()


@pytest.mark.parametrize("table,pattern", [
    ('lr = "fast"', "lr = 'fast' (recipe bad [train]): must be a finite number >= 0"),
    ('epochs = "three"', "epochs = 'three' (recipe bad [train]): must be an integer >= 0"),
    ('transforms = "notalist"', "transforms = 'notalist' (recipe bad [train]): must be a list of strings"),
    ("lr = nan", "lr = nan (recipe bad [train]): must be a finite number >= 0"),
    ("batch_size = 0", "batch_size = 0 (recipe bad [train]): must be an integer >= 1"),
])
def test_recipe_train_values_are_checked(files, table, pattern, tmp_path):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'name = "bad"\n[weights]\nmethod = "lsq"\n[activations]\nmethod = "lsq"\n[train]\n{table}\n')
    out = tmp_path / "run"
    from tests.training.train_helpers import small_cnn as model

    onnx.save(model(0, bn=True), str(tmp_path / "f.onnx"))
    r = cli("train", tmp_path / "f.onnx", "-r", recipe, "-d", files / "d.npz", "-o", out, "--no-progress")
    one_error_line(r, 1, pattern)
    assert not out.exists()


def test_ctrl_c_is_one_line_exit_130(files, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "onnxqat", "train", str(files / "m.qat.onnx"), "-d",
                          str(files / "d.npz"), "-o", str(tmp_path / "run"), "-e", "100000", "-b", "16", "--no-progress",
                          "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         # a shell starts background jobs with SIGINT ignored, and a child inherits that: as a user's
                         # terminal does, give the child the default disposition (Python then raises KeyboardInterrupt)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "metrics.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # the first epoch ended: training is running
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and err.rstrip().endswith("onnxqat: interrupted"), err[-800:]
    assert "Traceback" not in err


def test_insert_refuses_parameters_the_ops_would_turn_into_nan(tmp_path):
    """An inf weight, alpha = inf or 1e308, symmetric range 1: refused at insert, naming the tensor or key."""
    import numpy as np
    from onnx import numpy_helper

    import onnxqat
    from onnxqat.errors import ModelError, RecipeError

    m = small_cnn(0, bn=True)
    w = next(t for t in m.graph.initializer if t.name == "conv.weight")
    arr = numpy_helper.to_array(w).copy()
    arr[0, 0, 0, 0] = np.inf
    w.CopyFrom(numpy_helper.from_array(arr, "conv.weight"))
    with pytest.raises(ModelError, match="weight conv.weight of Conv node conv has 1 inf/NaN"):
        onnxqat.insert(m, "sat4")
    for body, key in (('[activations]\nalpha = inf\n', "alpha"), ('[activations]\nalpha = 1e308\n', "alpha"),
                      ('[weights]\nmode = "symmetric"\nrange = 1\n', "range 1")):
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'name = "r"\n{body}')
        with pytest.raises(RecipeError, match=key):
            onnxqat.insert(small_cnn(0, bn=True), str(recipe))
    r = cli("insert", tmp_path / "none.onnx", "-r", "sat4", "-o", tmp_path / "o.onnx")
    one_error_line(r, 1, "none.onnx")
    assert not (tmp_path / "o.onnx").exists()


def test_a_second_training_into_the_same_folder_is_refused(files, tmp_path):
    """The folder lock: refused while the owner lives (here: this test process, as another host-local pid);
    a lock whose process is gone is taken over and its leftover temporary files are removed."""
    import os
    import socket

    out = tmp_path / "run"
    out.mkdir()
    lock = out / ".onnxqat.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}")
    r = cli("train", files / "m.qat.onnx", "-d", files / "d.npz", "-o", out, "-b", "16", "-e", "1", "--no-progress")
    one_error_line(r, 1, "is in use by another training")
    assert sorted(p.name for p in out.iterdir()) == [".onnxqat.lock"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()} {int(dead.stdout)}")
    (out / ".metrics.json.abc123.tmp").write_text("half")
    r = cli("train", files / "m.qat.onnx", "-d", files / "d.npz", "-o", out, "-b", "16", "-e", "1", "--no-progress")
    assert r.returncode == 0, r.stderr[-1500:]
    assert "took over the lock of a run that ended without releasing it" in r.stderr
    assert not lock.exists() and not list(out.glob(".*.tmp")) and (out / "model.onnx").exists()


@pytest.mark.parametrize("call", ["insert", "fuse", "train"])
@pytest.mark.parametrize("bad", [None, b"model.onnx", 3])
def test_api_model_of_the_wrong_type(call, bad, tmp_path):
    import onnxqat
    from onnxqat.errors import ModelError

    kwargs = {"insert": {"recipe": "sat4"}, "fuse": {}, "train": {"out": tmp_path / "run"}}[call]
    with pytest.raises(ModelError, match=f"model must be a path or an onnx.ModelProto, got {type(bad).__name__}"):
        getattr(onnxqat, call)(bad, **kwargs)
    assert not (tmp_path / "run").exists()


def test_fuse_verify_data_edge_cases(files, tmp_path):
    import numpy as np

    import onnxqat
    from onnxqat.errors import DataError, FuseError

    model = files / "m.qat.onnx"
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DataError, match="cannot read verify data \\(BadZipFile"):
        onnxqat.fuse(model, tmp_path / "a.onnx", verify_data=tmp_path / "bad.npz")
    with pytest.raises(DataError, match="no sample"):
        onnxqat.fuse(model, tmp_path / "b.onnx", verify_data=np.zeros((0, 1, 6, 6), np.float32))
    for n in (0, -1):
        r = cli("fuse", model, "-o", tmp_path / "c.onnx", "--samples", n)
        one_error_line(r, 1, "must be an integer >= 1")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((8, 1, 6, 6)).astype(np.float32))
    res = onnxqat.fuse(model, tmp_path / "d.onnx", verify_data=tmp_path / "x.npy")  # a .npy is the image input
    assert res.agreement.samples == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npz", "d.onnx", "d.onnx.json", "x.npy"]


def test_resume_with_a_corrupt_checkpoint_or_a_folder_in_its_place(files, tmp_path):
    out = tmp_path / "run"
    args = ["train", files / "m.qat.onnx", "-d", files / "d.npz", "-o", out, "-b", "16", "-e", "1", "--no-progress"]
    assert cli(*args).returncode == 0
    (out / "checkpoint_last.npz").write_text("garbage")
    one_error_line(cli(*args, "--resume"), 1, "checkpoint_last.npz: unreadable checkpoint")
    (out / "checkpoint_last.npz").unlink()
    (out / "checkpoint_last.npz").mkdir()
    one_error_line(cli(*args, "--resume"), 1, "checkpoint_last.npz is not a file")


@pytest.mark.parametrize("case,pattern", [
    ("unknown op", "No Op registered for FooBar"),
    ("defined twice", "single static assignment"),
])
def test_insert_refuses_an_invalid_model(case, pattern, tmp_path):
    import numpy as np
    from onnx import helper, numpy_helper

    extra = {"unknown op": [helper.make_node("FooBar", ["r"], ["y"], name="foo")],
             "defined twice": [helper.make_node("Relu", ["c"], ["r"], name="relu2"),
                               helper.make_node("Identity", ["r"], ["y"], name="id")]}[case]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu")]
    g = helper.make_graph(nodes + extra, "g", [helper.make_tensor_value_info("x", 1, [1, 1, 5, 5])],
                          [helper.make_tensor_value_info("y", 1, [1, 2, 3, 3])],
                          [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "bad.onnx"))
    r = cli("insert", tmp_path / "bad.onnx", "-r", "sat4", "-o", tmp_path / "out.onnx")
    one_error_line(r, 1, pattern)
    assert not (tmp_path / "out.onnx").exists()


def _conv_relu_gemm():
    import numpy as np
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "w2"], ["y"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("y", 1, ["N", 3])],
                          [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
                           numpy_helper.from_array(rng.standard_normal((3, 144)).astype(np.float32), "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case,pattern", [
    ("missing", "ext.onnx: the data of tensor 'w' is in ext.data, which is not beside the model"),
    ("truncated", "ext.onnx: ext.data holds 100 bytes, tensor 'w' needs bytes up to 144 (a truncated copy?)"),
])
def test_external_data_missing_or_truncated(case, pattern, tmp_path):
    onnx.save(_conv_relu_gemm(), str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    if case == "missing":
        (tmp_path / "ext.data").unlink()
    else:
        with open(tmp_path / "ext.data", "r+b") as f:
            f.truncate(100)
    r = cli("insert", tmp_path / "ext.onnx", "-r", "sat4", "-o", tmp_path / "out.onnx")
    one_error_line(r, 1, pattern)
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_beside_the_model_loads(tmp_path):
    onnx.save(_conv_relu_gemm(), str(tmp_path / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="ext.data", size_threshold=0)
    r = cli("insert", tmp_path / "ext.onnx", "-r", "sat4", "-o", tmp_path / "out.onnx")
    assert r.returncode == 0, r.stderr
    assert {t.name for t in onnx.load(str(tmp_path / "out.onnx")).graph.initializer} >= {"w", "w2"}


@pytest.mark.parametrize("case,pattern", [
    ("nan", "calib.npz: the array for input 'x' holds 256 NaN/inf value(s)"),
    ("empty", "calib.npz: the array for input 'x' holds no sample (shape [0, 1, 8, 8])"),
    ("overflow", "calibration: activation 'r' is NaN/inf on this data (the float model overflows on it"),
])
def test_calibration_data_nan_empty_or_overflowing(case, pattern, tmp_path):
    import numpy as np

    onnx.save(_conv_relu_gemm(), str(tmp_path / "m.onnx"))
    x = {"nan": np.full((4, 1, 8, 8), np.nan, np.float32), "empty": np.zeros((0, 1, 8, 8), np.float32),
         "overflow": np.full((4, 1, 8, 8), 3e38, np.float32)}[case]
    np.savez(tmp_path / "calib.npz", x=x)
    r = cli("insert", tmp_path / "m.onnx", "-r", "sat4", "-o", tmp_path / "out.onnx",
            "--calibration-data", tmp_path / "calib.npz")
    one_error_line(r, 1, pattern)
    assert not (tmp_path / "out.onnx").exists()


def test_a_tensor_claiming_more_elements_than_it_holds(tmp_path):
    m = _conv_relu_gemm()
    t = m.graph.initializer[0]
    del t.dims[:]
    t.dims.extend([2**31, 2**31])
    t.ClearField("float_data")
    t.raw_data = b"\0" * 16
    onnx.save(m, str(tmp_path / "huge.onnx"))
    want = ("huge.onnx: tensor 'w' claims shape [2147483648, 2147483648] (4611686018427387904 elements) but holds 16 "
            "bytes (a tampered or truncated file?)")
    one_error_line(cli("insert", tmp_path / "huge.onnx", "-r", "sat4", "-o", tmp_path / "o.onnx"), 1, want)
    one_error_line(cli("inspect", tmp_path / "huge.onnx"), 1, want)
    one_error_line(cli("fuse", tmp_path / "huge.onnx", "-o", tmp_path / "o.onnx"), 1, want)
    assert not (tmp_path / "o.onnx").exists()


def _tampered(case: str) -> onnx.ModelProto:
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    import onnxqat

    q = onnxqat.insert(_conv_relu_gemm(), "sat4")
    if case == "mode 9":
        for t in q.graph.initializer:
            if t.name == "conv_wquant.mode":
                t.CopyFrom(numpy_helper.from_array(np.array(9, np.int64), t.name))
    elif case == "range as a string":
        for t in q.graph.initializer:
            if t.name == "conv_wquant.range":
                t.CopyFrom(helper.make_tensor(t.name, TensorProto.STRING, [], [b"15"]))
    elif case == "too few inputs":
        del next(n for n in q.graph.node if n.name == "conv_wquant").input[2:]
    else:  # the alpha initializer removed
        keep = [t for t in q.graph.initializer if t.name != "relu_aquant.alpha"]
        del q.graph.initializer[:]
        q.graph.initializer.extend(keep)
    return q


@pytest.mark.parametrize("case,pattern", [
    ("mode 9", "quantizer SatWeightQuant 'conv_wquant': input mode ('conv_wquant.mode') = 9, must be an int64 scalar "
               "0 (clamp), 1 (quantize), 2 (symmetric), 3 (full range), 4 (asymmetric) or 5 (asymmetric clamp)"),
    ("range as a string", "quantizer SatWeightQuant 'conv_wquant': input range ('conv_wquant.range') is string, must "
                          "be a float32 scalar in [1, 65535]"),
    ("too few inputs", "quantizer SatWeightQuant 'conv_wquant': has 2 input(s), the op takes 4 (W, range, mode, "
                       "scale_fan_out)"),
    ("missing alpha", "quantizer SatActQuant 'relu_aquant': input alpha ('relu_aquant.alpha') is not a constant of "
                      "the model (missing initializer?)"),
])
def test_hand_tampered_qat_models(case, pattern, files, tmp_path):
    onnx.save(_tampered(case), str(tmp_path / "t.onnx"))
    one_error_line(cli("inspect", tmp_path / "t.onnx"), 1, pattern)
    one_error_line(cli("fuse", tmp_path / "t.onnx", "-o", tmp_path / "o.onnx"), 1, pattern)
    one_error_line(cli("train", tmp_path / "t.onnx", "--data", files / "d.npz", "--epochs", "1", "-b", "16",
                       "--out", tmp_path / "run", "--no-progress"), 1, pattern)
    assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "run").exists()


def test_fixed_batch_model(files, tmp_path):
    m = _conv_relu_gemm()
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 6
    m.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 6
    import numpy as np
    from onnx import numpy_helper

    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros((3, 64), np.float32), "w2"))
    onnx.save(m, str(tmp_path / "b1.onnx"))
    args = ("train", tmp_path / "b1.onnx", "--recipe", "lsq4", "--data", files / "d.npz", "--epochs", "1",
            "--no-progress")
    one_error_line(cli(*args, "-b", "16", "--out", tmp_path / "a"), 1,
                   "the model's input 'x' has a fixed batch size of 1: train with --batch-size 1")
    r = cli(*args, "-b", "1", "--out", tmp_path / "b", "--limit-train", "32", "--limit-test", "8")
    assert r.returncode == 0, r.stderr[-1500:]


_FULL_DISK = """
import errno, os, sys
real, target = os.replace, sys.argv[1]
def full(src, dst, *a, **k):  # the final rename of an atomic write fails as on a full disk
    if str(dst).endswith(target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return real(src, dst, *a, **k)
os.replace = full
from onnxqat.cli.app import main
sys.argv = ["onnxqat"] + sys.argv[2:]
main()
"""


@pytest.mark.parametrize("target,command,pattern", [
    ("out.onnx", ("insert", "{m}", "-r", "sat4", "-o", "{tmp}/out.onnx"), "cannot write"),
    ("checkpoint_last.npz", ("train", "{m}", "--recipe", "lsq4", "--data", "{d}", "--epochs", "1", "-b", "16",
                             "--out", "{tmp}/run", "--no-progress"), "checkpoint_last.npz: No space left on device"),
    (".png", ("train", "{m}", "--recipe", "lsq4", "--data", "{d}", "--epochs", "1", "-b", "16", "--out",
              "{tmp}/run", "--no-progress"), "distrib.png: No space left on device"),
])
def test_full_disk_is_one_line_and_leaves_no_partial_file(target, command, pattern, files, tmp_path):
    onnx.save(_conv_relu_gemm(), str(tmp_path / "m.onnx"))
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.uniform(0, 1, (64, 8, 8, 1)).astype(np.float32),
             y_train=rng.integers(0, 3, 64), x_test=rng.uniform(0, 1, (16, 8, 8, 1)).astype(np.float32),
             y_test=rng.integers(0, 3, 16))
    (tmp_path / "driver.py").write_text(_FULL_DISK)
    args = [a.format(m=tmp_path / "m.onnx", d=tmp_path / "d.npz", tmp=tmp_path) for a in command]
    r = subprocess.run([sys.executable, str(tmp_path / "driver.py"), target, *args], capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    one_error_line(r, 1, pattern)
    assert "No space left on device" in r.stderr
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name == ".onnxqat.lock"
                 or p.name.endswith(target) and p.stat().st_size == 0]
    assert not leftovers and not (tmp_path / "out.onnx").exists()
