import gzip
import struct

import numpy as np
import pytest

from onnxqat.errors import DataError
from onnxqat.training import data as D


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    hdr = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
    return hdr + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def _write_idx_dir(d, n_train=20, n_test=6, gz=True, label_max=9):
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 5, 4), dtype=np.uint8)
        y = rng.integers(0, label_max + 1, n).astype(np.uint8)
        for tag, arr in (("images-idx3-ubyte", x), ("labels-idx1-ubyte", y)):
            raw = _idx_bytes(arr)
            if gz:
                (d / f"{split}-{tag}.gz").write_bytes(gzip.compress(raw))
            else:
                (d / f"{split}-{tag}").write_bytes(raw)
        sets[split] = (x, y)
    return sets


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    sets = _write_idx_dir(tmp_path, gz=gz)
    train, test = D.resolve_data(tmp_path)
    np.testing.assert_array_equal(train.images[..., 0], sets["train"][0])
    np.testing.assert_array_equal(train.labels, sets["train"][1])
    np.testing.assert_array_equal(test.images[..., 0], sets["t10k"][0])
    assert train.images.shape == (20, 5, 4, 1) and train.labels.dtype == np.int64


def test_idx_int32_and_errors(tmp_path):
    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx_bytes(a))
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.idx"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DataError, match="bad magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(_idx_bytes(a)[:-3])
    with pytest.raises(DataError, match="size mismatch"):
        D.read_idx(tmp_path / "short")
    with pytest.raises(DataError, match="not found"):
        D.read_idx(tmp_path / "nope")


def test_idx_dir_missing_file(tmp_path):
    _write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing IDX file t10k-labels"):
        D.resolve_data(tmp_path)


def test_fashion_mnist_absent_names_package(monkeypatch, tmp_path):
    monkeypatch.setattr(D, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        D.resolve_data("fashion-mnist")


def test_npz_layouts_and_errors(tmp_path):
    x = np.zeros((10, 4, 4), np.uint8)
    y = np.arange(10) % 3
    np.savez(tmp_path / "a.npz", x=x, y=y)
    tr, te = D.resolve_data(tmp_path / "a.npz")
    assert len(tr) + len(te) == 10 and len(te) == 1
    np.savez(tmp_path / "b.npz", x_train=np.zeros((5, 2, 6, 6), np.float32), y_train=np.zeros(5),
             x_test=np.zeros((2, 2, 6, 6), np.float32), y_test=np.zeros(2))
    tr, _ = D.resolve_data(tmp_path / "b.npz")
    assert tr.images.shape == (5, 6, 6, 2)  # NCHW recognised
    np.savez(tmp_path / "c.npz", x=x, y=y[:9])
    with pytest.raises(DataError, match="10 images but 9 labels"):
        D.resolve_data(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", foo=x)
    with pytest.raises(DataError, match="expected arrays"):
        D.resolve_data(tmp_path / "d.npz")
    (tmp_path / "e.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        D.resolve_data(tmp_path / "e.npz")
    with pytest.raises(DataError, match="data not found"):
        D.resolve_data(tmp_path / "missing.npz")


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for ci, cname in enumerate(("cat", "dog")):
            (tmp_path / split / cname).mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((5, 6), 40 * ci + k, np.uint8)).save(tmp_path / split / cname / f"{k}.png")
    tr, te = D.resolve_data(tmp_path)
    assert tr.images.shape == (6, 5, 6, 1) and len(te) == 6
    np.testing.assert_array_equal(tr.labels, [0, 0, 0, 1, 1, 1])
    assert tr.images[4, 0, 0, 0] == 41
    (tmp_path / "train" / "dog" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        D.resolve_data(tmp_path)


def test_labels_out_of_range():
    ds = D.Dataset(np.zeros((4, 2, 2, 1), np.uint8), np.array([0, 1, 10, 2]), "x")
    with pytest.raises(DataError, match="label 10 of sample 2 is out of range"):
        D.check_labels(ds, 10)


def test_batches_shuffle_repeatable_and_cover():
    ds = D.Dataset(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1), np.arange(50), "x")
    b1 = D.Batches(ds, 16, None, train=True, seed=3)
    e0 = [y for _, _, y in b1.epoch(0)]
    assert [len(y) for y in e0] == [16, 16, 16, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(e0)), np.arange(50))
    again = [y for _, _, y in D.Batches(ds, 16, None, train=True, seed=3).epoch(0)]
    for a, b in zip(e0, again):
        np.testing.assert_array_equal(a, b)
    e1 = np.concatenate([y for _, _, y in b1.epoch(1)])
    assert not np.array_equal(np.concatenate(e0), e1)
    resumed = [y for _, _, y in b1.epoch(0, start_batch=2)]
    np.testing.assert_array_equal(resumed[0], e0[2])
    ev = np.concatenate([y for _, _, y in D.Batches(ds, 16, None, train=False).epoch(5)])
    np.testing.assert_array_equal(ev, np.arange(50))


def test_validation_split_disjoint():
    ds = D.Dataset(np.zeros((100, 1, 1, 1), np.uint8), np.arange(100), "x")
    tr, va = D.validation_split(ds, 0.1, seed=0)
    assert len(va) == 10 and len(tr) == 90
    assert not set(tr.labels) & set(va.labels)
    tr2, va2 = D.validation_split(ds, 0.1, seed=0)
    np.testing.assert_array_equal(va.labels, va2.labels)
