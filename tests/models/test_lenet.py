"""build_lenet's initial weights, derived here from the same seeded numpy generator."""

import numpy as np
import pytest
from onnx import numpy_helper

from onnxqat.models.lenet import build_lenet

# (name, shape, fan_in) in the order the builder draws them
LAYERS = [("conv1.weight", (6, 1, 5, 5), 25), ("conv2.weight", (16, 6, 5, 5), 150),
          ("conv3.weight", (120, 16, 5, 5), 400), ("fc1.weight", (84, 120), 120)]


def arrays(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.mark.parametrize("seed", [0, 3])
def test_he_init_is_he_normal_then_xavier_last(seed):
    got = arrays(build_lenet(seed))
    rng = np.random.default_rng(seed)
    for name, shape, fan_in in LAYERS:
        want = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    lim = np.sqrt(6.0 / (84 + 10))
    np.testing.assert_array_equal(got["fc2.weight"], rng.uniform(-lim, lim, (10, 84)).astype(np.float32))
    assert not got["fc1.bias"].any() and not got["fc2.bias"].any()


def test_torch_init_is_uniform_over_fan_in_with_biases():
    got = arrays(build_lenet(1, init="torch"))
    rng = np.random.default_rng(1)
    for name, shape, fan_in in LAYERS[:3]:
        want = rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in), shape).astype(np.float32)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    for name, shape, fan_in in [("fc1.weight", (84, 120), 120), ("fc1.bias", (84,), 120),
                                ("fc2.weight", (10, 84), 84), ("fc2.bias", (10,), 84)]:
        want = rng.uniform(-1 / np.sqrt(fan_in), 1 / np.sqrt(fan_in), shape).astype(np.float32)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    # conv3 has 48,000 draws: the uniform's spread, 1/sqrt(3 fan_in), within 1 %
    assert abs(got["conv3.weight"].std() * np.sqrt(3 * 400) - 1) < 0.01
    for k in ("scale", "var"):
        assert (got[f"bn2.{k}"] == 1).all()
    for k in ("B", "mean"):
        assert not got[f"bn2.{k}"].any()


def test_unknown_init_is_refused():
    with pytest.raises(ValueError, match="unknown LeNet init 'xavier'"):
        build_lenet(0, init="xavier")
