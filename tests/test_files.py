import os
import stat

import onnx.parser

from onnxqat.files import atomic_write_text, default_file_mode
from onnxqat.graph import save_model


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    old = os.umask(0o022)
    try:
        assert default_file_mode() == 0o644
        atomic_write_text(tmp_path / "a.txt", "x")
        save_model(onnx.parser.parse_model("""
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[1] x) => (float[1] y) { y = Relu(x) }
        """), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o644  # not mkstemp's 0o600
    assert _mode(tmp_path / "m.onnx") == 0o644
    assert (tmp_path / "a.txt").read_text() == "x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
