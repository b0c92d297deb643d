import numpy as np
import onnx.parser
from PIL import Image

from onnxqat.report import graph_picture as gp

CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (int32[1,4] y) {
    a = Relu(x)
    b = Cast<to = 6>(a)
    y = Abs(b)
}
"""

BRANCHES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,4] x) => (float[1,4] y) {
    a = Relu(x)
    b = Sigmoid(a)
    c = Tanh(a)
    y = Add(b, c)
}
"""


def _colours(path):
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(p) for p in np.unique(pixels, axis=0)}


def test_layers_are_longest_paths_and_png_size_follows(tmp_path):
    model = onnx.parser.parse_model(BRANCHES)
    assert gp._layers(list(model.graph.node)) == [0, 1, 1, 2]
    out = gp.render_graph(model, str(tmp_path / "g.png"))
    w, h = Image.open(out).size
    assert h == 60 + 2 * gp.MARGIN + 3 * (gp.BOX_H + gp.GAP_Y) + 40
    assert w == 700  # two boxes side by side fit in the minimum width


def test_integer_and_float_nodes_get_their_colours(tmp_path):
    out = gp.render_graph(onnx.parser.parse_model(CHAIN), str(tmp_path / "chain.png"))
    colours = _colours(out)
    assert gp._COLOURS["integer"] in colours  # Abs on int32
    assert gp._COLOURS["float"] in colours  # Relu on float
    assert gp._COLOURS["glue"] in colours  # Cast


def test_parameter_making_nodes_are_left_out():
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        w = Constant<value = float[2] {1.0, 2.0}>()
        y = Mul(x, w)
    }
    """)
    assert [n.op_type for n in gp._data_nodes(model)] == ["Mul"]
