"""Data sets for training: IDX (MNIST format, gzipped or not), NPZ arrays, image folders; batching.

A `Dataset` holds images as uint8 (or float32) arrays shaped [N, H, W, C] and int64 labels. `resolve_data()`
turns the `--data` argument into (train, test) datasets:

- `fashion-mnist` (or `mnist-idx:<dir>`): the Debian package `dataset-fashion-mnist`, files
  /usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
- a directory holding the four IDX files (gzipped or not; `train-*`/`t10k-*` or `train-*`/`test-*`)
- a `.npz` file with `x_train, y_train, x_test, y_test` (or `train_images/train_labels/test_images/test_labels`);
  a file with only `x, y` (or `images, labels`) is split into train/test by `test_fraction`
- a directory with `train/` and `test/` subfolders, each holding one subfolder per class of image files (Pillow);
  a directory with only class subfolders is split by `test_fraction`
- unlabeled data (for distillation): a `.npz` with only `x` (or `images`), or a folder of image files without class
  subfolders; a `.npz` whose arrays are named after the model's inputs gives every input its per-sample array
  (`x`/`images` or the data input's name for the data, `y`/`labels` optional)

`resolve_data(..., image_input=False)` keeps arrays as they are (audio frames, feature vectors: any per-sample shape);
with `size=(H, W)` and `channels=C`, folder images of other sizes or colour modes are converted on load.

`Batches` yields shuffled, transformed float32 NCHW batches; order and random transforms depend only on
(seed, epoch), so the same seed gives the same run twice, and a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxqat.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".webp")

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Dataset:
    images: np.ndarray  # [N, H, W, C], uint8 or float32 (raw: [N, ...] as given)
    labels: np.ndarray | None  # [N] int64, None for unlabeled data
    name: str = ""
    extra: dict = field(default_factory=dict)  # other model inputs: name -> [N, ...] per-sample arrays
    raw: bool = False  # arrays, not images: no transforms, no layout change

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one sample before transforms."""
        n, h, w, c = self.images.shape
        return (c, h, w)

    def subset(self, idx: np.ndarray | slice, name: str | None = None) -> "Dataset":
        return Dataset(self.images[idx], None if self.labels is None else self.labels[idx], name or self.name,
                       {k: v[idx] for k, v in self.extra.items()}, self.raw)

    def limit(self, n: int | None) -> "Dataset":
        if n is None or n <= 0 or n >= len(self):
            return self
        return self.subset(slice(0, n))


# ------------------------------------------------------------------------------------------------ readers

def _open_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.open(f) as g:
                    return g.read()
            return f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format: magic 0x0000TTDD, DD big-endian int32 dims, then data)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"IDX file not found: {path}")
    raw = _open_maybe_gzip(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(dims))
    need = 4 + 4 * ndim + count * dtype.itemsize
    if len(raw) != need:
        raise DataError(f"{path}: IDX size mismatch: header says {dims} ({need} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(dims).astype(dtype.newbyteorder("="))


def _images_nhwc(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim == 3:
        x = x[..., None]
    elif x.ndim == 4 and x.shape[1] in (1, 2, 3, 4) and x.shape[3] not in (1, 2, 3, 4):
        x = np.transpose(x, (0, 2, 3, 1))  # NCHW -> NHWC
    if x.ndim != 4:
        raise DataError(f"{source}: images must be [N, H, W] or [N, H, W, C], got shape {tuple(x.shape)}")
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, n: int, source: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{source}: labels must be one integer per sample, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise DataError(f"{source}: {n} images but {y.shape[0]} labels")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
            raise DataError(f"{source}: labels must be integers")
    return y.astype(np.int64)


def _find(directory: Path, *stems: str) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / (stem + suffix)
            if p.is_file():
                return p
    return None


def load_idx_dir(directory: str | os.PathLike, name: str = "") -> tuple[Dataset, Dataset]:
    d = Path(directory)
    files = {}
    for split, prefixes in (("train", ("train",)), ("test", ("t10k", "test"))):
        for kind, tag in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
            stems = [f"{p}-{tag}" for p in prefixes] + [f"{p}-{tag.replace('-ubyte', '.ubyte')}" for p in prefixes]
            f = _find(d, *stems)
            if f is None:
                raise DataError(f"{d}: missing IDX file {prefixes[0]}-{tag}[.gz]")
            files[(split, kind)] = f
    out = []
    for split in ("train", "test"):
        x = _images_nhwc(read_idx(files[(split, "images")]), str(files[(split, "images")]))
        y = _labels(read_idx(files[(split, "labels")]), x.shape[0], str(files[(split, "labels")]))
        out.append(Dataset(x, y, f"{name or d.name}/{split}"))
    return out[0], out[1]


def _split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not 0.0 < fraction < 1.0:
        raise DataError(f"{ds.name}: no test split given; test fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(len(ds))
    n_test = max(1, int(round(len(ds) * fraction)))
    return ds.subset(np.sort(perm[n_test:]), ds.name + "/train"), ds.subset(np.sort(perm[:n_test]), ds.name + "/test")


def load_npz(path: str | os.PathLike, test_fraction: float = 0.1, seed: int = 0, image_input: bool = True,
             input_names: tuple[str, ...] = (), data_input: str | None = None) -> tuple[Dataset, Dataset]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"NPZ file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile/ValueError/pickle refusal: all mean a malformed file
        raise DataError(f"{p}: not a readable .npz file ({exc.__class__.__name__}: {exc})") from None
    images = _images_nhwc if image_input else _raw
    for xtr, ytr, xte, yte in (("x_train", "y_train", "x_test", "y_test"),
                               ("train_images", "train_labels", "test_images", "test_labels")):
        if all(k in arrays for k in (xtr, ytr, xte, yte)):
            tr_x = images(arrays[xtr], f"{p}:{xtr}")
            te_x = images(arrays[xte], f"{p}:{xte}")
            return (Dataset(tr_x, _labels(arrays[ytr], tr_x.shape[0], f"{p}:{ytr}"), p.stem + "/train",
                            raw=not image_input),
                    Dataset(te_x, _labels(arrays[yte], te_x.shape[0], f"{p}:{yte}"), p.stem + "/test",
                            raw=not image_input))
    keys = [k for k in ("x", "images", data_input) if k and k in arrays]
    if not keys:
        raise DataError(f"{p}: expected arrays x_train/y_train/x_test/y_test, x (and y), or one array per model input "
                        f"({', '.join(input_names) or 'x'}); found {sorted(arrays)}")
    xk = keys[0]
    x = images(arrays[xk], f"{p}:{xk}")
    yk = next((k for k in ("y", "labels") if k in arrays), None)
    y = _labels(arrays[yk], x.shape[0], f"{p}:{yk}") if yk else None
    extra = {}
    for name in input_names:
        if name != data_input and name in arrays and name != xk:
            if arrays[name].shape[:1] != x.shape[:1]:
                raise DataError(f"{p}:{name}: {arrays[name].shape[0] if arrays[name].ndim else 0} samples, the data "
                                f"has {x.shape[0]} (one row per sample)")
            extra[name] = arrays[name]
    return _split(Dataset(x, y, p.stem, extra, not image_input), test_fraction, seed)


def _raw(x: np.ndarray, source: str) -> np.ndarray:
    if x.ndim < 1:
        raise DataError(f"{source}: expected one row per sample, got a scalar")
    return np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32))


def _read_image_folder(d: Path, classes: list[str] | None = None, size: tuple | None = None,
                       channels: int | None = None) -> tuple[Dataset, list[str]]:
    """Class subfolders -> labelled images; image files and no subfolder -> unlabeled images (labels None).
    size (H, W) and channels (1 or 3): images are converted to them on load (bilinear resize, L or RGB)."""
    from PIL import Image, UnidentifiedImageError

    if classes is None:
        classes = sorted(c.name for c in d.iterdir() if c.is_dir())
    flat = not classes and any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir() if f.is_file())
    if not classes and not flat:
        raise DataError(f"{d}: no class subfolders and no image files")
    images, labels, shape = [], [], None
    groups = [(0, d)] if flat else [(ci, d / cname) for ci, cname in enumerate(classes)]
    for ci, cdir in groups:
        if not cdir.is_dir():
            continue
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            try:
                with Image.open(f) as im:
                    im.load()
                    mode = {1: "L", 3: "RGB"}.get(channels or 0)
                    if mode and im.mode != mode:
                        im = im.convert(mode)
                    elif im.mode not in ("L", "RGB"):
                        im = im.convert("RGB")
                    if size and all(size) and im.size != (size[1], size[0]):
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{f}: not a readable image ({exc})") from None
            if a.ndim == 2:
                a = a[..., None]
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                raise DataError(f"{f}: image shape {a.shape} differs from {shape} (add a rescale transform "
                                "or make the folder's images one size)")
            images.append(a)
            labels.append(ci)
    if not images:
        raise DataError(f"{d}: no image files in the class subfolders")
    return Dataset(np.stack(images), None if flat else np.asarray(labels, np.int64), d.name), classes


def load_image_folder(path: str | os.PathLike, test_fraction: float = 0.1, seed: int = 0, size: tuple | None = None,
                      channels: int | None = None) -> tuple[Dataset, Dataset]:
    d = Path(path)
    if (d / "train").is_dir() and (d / "test").is_dir():
        train, classes = _read_image_folder(d / "train", None, size, channels)
        test, _ = _read_image_folder(d / "test", classes or None, size, channels)
        return train, test
    ds, _ = _read_image_folder(d, None, size, channels)
    return _split(ds, test_fraction, seed)


def resolve_data(spec: str | os.PathLike | tuple, test_fraction: float = 0.1, seed: int = 0, image_input: bool = True,
                 input_names: tuple[str, ...] = (), data_input: str | None = None, size: tuple | None = None,
                 channels: int | None = None) -> tuple[Dataset, Dataset]:
    """--data argument -> (train, test). The keyword arguments describe the model (see the module doc)."""
    if isinstance(spec, tuple) and len(spec) == 2 and all(isinstance(d, Dataset) for d in spec):
        return spec
    s = str(spec)
    if s.lower() in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        if not FASHION_MNIST_DIR.is_dir():
            raise DataError(f"Fashion-MNIST not found at {FASHION_MNIST_DIR}: install the Debian package "
                            f"{FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE})")
        return load_idx_dir(FASHION_MNIST_DIR, "fashion-mnist")
    p = Path(s)
    if not p.exists():
        raise DataError(f"data not found: {s} (expected 'fashion-mnist', an IDX folder, a .npz file or an image folder)")
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return load_npz(p, test_fraction, seed, image_input, tuple(input_names), data_input)
        raise DataError(f"{p}: unsupported data file (expected .npz, or a folder of IDX files or images)")
    if any(f.name.endswith(("idx3-ubyte", "idx3-ubyte.gz")) for f in p.iterdir()):
        return load_idx_dir(p)
    return load_image_folder(p, test_fraction, seed, size, channels)


def check_labels(ds: Dataset, num_classes: int) -> None:
    if len(ds) == 0:
        raise DataError(f"{ds.name}: empty data set")
    if ds.labels is None:
        return
    lo, hi = int(ds.labels.min()), int(ds.labels.max())
    if lo < 0 or hi >= num_classes:
        bad = int(np.nonzero((ds.labels < 0) | (ds.labels >= num_classes))[0][0])
        raise DataError(f"{ds.name}: label {int(ds.labels[bad])} of sample {bad} is out of range "
                        f"[0, {num_classes - 1}] (the model has {num_classes} outputs)")


def validation_split(train: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Holds out `fraction` of the training set (random, fixed by the seed) for validation."""
    if fraction <= 0:
        return train, None
    if fraction >= 1:
        raise DataError(f"validation fraction must be < 1, got {fraction}")
    perm = np.random.default_rng([seed, 7919]).permutation(len(train))
    n_val = max(1, int(round(len(train) * fraction)))
    return (train.subset(np.sort(perm[n_val:]), train.name), train.subset(np.sort(perm[:n_val]), train.name + "/val"))


class Batches:
    """Shuffled (train) or ordered (eval) batches of (float32 NCHW images, int64 labels)."""

    def __init__(self, ds: Dataset, batch_size: int, transforms=None, train: bool = True, seed: int = 0,
                 drop_last: bool = False):
        if batch_size <= 0:
            raise DataError(f"batch size must be positive, got {batch_size}")
        self.ds, self.batch_size, self.transforms = ds, batch_size, transforms
        self.train, self.seed, self.drop_last = train, seed, drop_last

    def __len__(self) -> int:
        n = len(self.ds)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0):
        """(batch index, x, labels or None) per batch; x is float32 NCHW (raw data: as stored, float32)."""
        for b, x, y, _ in self.epoch_extras(epoch, start_batch):
            yield b, x, y

    def epoch_extras(self, epoch: int, start_batch: int = 0, keep=None):
        """As epoch(), with the batch's per-sample arrays of the other model inputs (a dict) as a fourth item.
        keep: batch index -> bool, the batches this process reads (a rank's share; the others are not loaded)."""
        rng = np.random.default_rng([self.seed, epoch, 1])
        order = rng.permutation(len(self.ds)) if self.train else np.arange(len(self.ds))
        # one generator per batch, derived from (seed, epoch, batch): a batch looks the same whatever came before
        for b in range(start_batch, len(self)):
            if keep is not None and not keep(b):
                continue
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.ds.images[idx]
            y = None if self.ds.labels is None else self.ds.labels[idx]
            extras = {k: v[idx] for k, v in self.ds.extra.items()}
            if self.ds.raw:
                yield b, np.ascontiguousarray(x, dtype=np.float32), y, extras
                continue
            brng = np.random.default_rng([self.seed, epoch, 2, b])
            x = self.transforms(x, brng, self.train) if self.transforms is not None else x.astype(np.float32)
            yield b, np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2)), dtype=np.float32), y, extras
