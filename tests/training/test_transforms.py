import numpy as np
import pytest

from onnxqat.errors import DataError
from onnxqat.training import transforms as T


def _batch(n=3, h=4, w=6, c=1):
    return np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c)


def test_pad_crop_centres():
    x = _batch()
    p = T.PadCrop(8, 6)(x, None)
    assert p.shape == (3, 6, 8, 1)
    np.testing.assert_array_equal(p[:, 1:5, 1:7], x)
    assert p[:, 0].sum() == 0 and p[:, :, 0].sum() == 0
    c = T.PadCrop(2, 2)(x, None)
    np.testing.assert_array_equal(c, x[:, 1:3, 2:4])


def test_slice_and_center_crop():
    x = _batch()
    np.testing.assert_array_equal(T.SliceExtraction(3, 2, offset_x=1, offset_y=2)(x, None), x[:, 2:4, 1:4])
    np.testing.assert_array_equal(T.CenterCrop(2, 2)(x, None), x[:, 1:3, 2:4])
    with pytest.raises(DataError, match="leaves"):
        T.SliceExtraction(3, 3, offset_x=5)(x, None)
    r = T.SliceExtraction(2, 2, random_offset_x=True, random_offset_y=True)(x, np.random.default_rng(0))
    assert r.shape == (3, 2, 2, 1)
    for i in range(3):  # each random window is a real window of its own image
        found = any(np.array_equal(r[i], x[i, oy:oy + 2, ox:ox + 2]) for oy in range(3) for ox in range(5))
        assert found


def test_flip():
    x = _batch()
    np.testing.assert_array_equal(T.Flip(horizontal=True)(x, None), x[:, :, ::-1])
    np.testing.assert_array_equal(T.Flip(vertical=True)(x, None), x[:, ::-1])
    x = _batch(n=64)
    f = T.Flip(random_horizontal_flip=True)(x, np.random.default_rng(1))
    flipped = [np.array_equal(f[i], x[i, :, ::-1]) for i in range(64)]
    same = [np.array_equal(f[i], x[i]) for i in range(64)]
    assert all(a or b for a, b in zip(flipped, same)) and 10 < sum(flipped) < 54


def test_range_affine_per_channel():
    x = np.full((2, 2, 2, 3), 255.0, np.float32)
    y = T.RangeAffine("Minus", [255, 127.5, 0], "Divides", [1, 127.5, 255])(x, None)
    np.testing.assert_allclose(y[0, 0, 0], [0.0, 1.0, 1.0])
    with pytest.raises(DataError):
        T.RangeAffine("Pow", 2)


def test_color_space():
    x = np.zeros((1, 1, 1, 3), np.float32)
    x[..., 0] = 100
    np.testing.assert_allclose(T.ColorSpace("Gray")(x, None)[..., 0], 29.9, rtol=1e-6)
    np.testing.assert_array_equal(T.ColorSpace("BGR")(x, None)[0, 0, 0], [0, 0, 100])
    g = np.full((1, 2, 2, 1), 7, np.float32)
    assert T.ColorSpace("RGB")(g, None).shape == (1, 2, 2, 3)


def test_rescale_and_random_resize_crop():
    x = np.ones((2, 4, 6, 1), np.float32) * 5
    r = T.Rescale(12, 8)(x, None)
    assert r.shape == (2, 8, 12, 1)
    np.testing.assert_allclose(r, 5, rtol=1e-6)  # bilinear of a constant
    k = T.Rescale(3, 3, keep_aspect_ratio=True, resize_to_fit=True)(x, None)
    assert k.shape == (2, 2, 3, 1)
    rr = T.RandomResizeCrop(5, 5, scale_min=0.3, scale_max=1.0)(x, np.random.default_rng(0))
    assert rr.shape == (2, 5, 5, 1)
    np.testing.assert_allclose(rr, 5, rtol=1e-6)


def test_apply_to_and_build():
    pipe = T.build_transforms([
        {"Type": "RangeAffineTransformation", "FirstOperator": "Divides", "FirstValue": 2.0},
        {"type": "Flip", "horizontal": True, "apply_to": "LearnOnly"},
        {"type": "PadCrop", "width": 8, "height": 6, "ApplyTo": "NoLearn"},
    ])
    x = _batch()
    tr = pipe(x, np.random.default_rng(0), True)
    ev = pipe(x, np.random.default_rng(0), False)
    np.testing.assert_array_equal(tr, x[:, :, ::-1] / 2)
    assert ev.shape == (3, 6, 8, 1)
    with pytest.raises(DataError, match="unknown transform"):
        T.build_transforms([{"type": "Sharpen"}])
