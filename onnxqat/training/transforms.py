"""Image transforms as in N2D2 (Rescale, PadCrop, SliceExtraction, RandomResizeCrop, Flip, RangeAffine, ColorSpace).

Each transform works on a batch [N, H, W, C] (float32) and has `apply_to`: "all", "learn" (N2D2 LearnOnly: training
batches only) or "eval" (N2D2 NoLearn: validation/test batches only). Random transforms draw from the generator they
are given (one per batch, derived from the seed), so runs repeat exactly.

`build_transforms([{"type": "RangeAffine", "first_operator": "Divides", "first_value": 255}, ...])` builds a pipeline
from dicts (recipe `[train]` tables or JSON); N2D2 names (`RescaleTransformation`, `ApplyTo=LearnOnly`) are accepted.
"""

from __future__ import annotations

import numpy as np

from onnxqat.errors import DataError

_APPLY = {"all": "all", "learn": "learn", "learnonly": "learn", "train": "learn", "eval": "eval", "nolearn": "eval",
          "test": "eval", "validation": "eval"}


def _apply_to(v: str) -> str:
    key = str(v).replace("_", "").replace("-", "").lower()
    if key not in _APPLY:
        raise DataError(f"apply_to must be all, learn (LearnOnly) or eval (NoLearn), got {v!r}")
    return _APPLY[key]


class Transform:
    random = False

    def __init__(self, apply_to: str = "all"):
        self.apply_to = _apply_to(apply_to)

    def applies(self, train: bool) -> bool:
        return self.apply_to == "all" or (self.apply_to == "learn") == train

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of one [H, W, C] float32 image (Pillow, mode F per channel)."""
    from PIL import Image

    if img.shape[0] == height and img.shape[1] == width:
        return img
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[:, :, c], dtype=np.float32), mode="F")
                        .resize((width, height), Image.BILINEAR)) for c in range(img.shape[2])]
    return np.stack(chans, axis=-1)


def _pad_crop(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre pad (zeros) or centre crop a batch to [height, width]."""
    n, h, w, c = x.shape
    out = np.zeros((n, height, width, c), x.dtype)
    sy, dy = max(0, (h - height) // 2), max(0, (height - h) // 2)
    sx, dx = max(0, (w - width) // 2), max(0, (width - w) // 2)
    ch, cw = min(h, height), min(w, width)
    out[:, dy:dy + ch, dx:dx + cw] = x[:, sy:sy + ch, sx:sx + cw]
    return out


class Rescale(Transform):
    """N2D2 RescaleTransformation: resize to width x height; keep_aspect_ratio scales the smaller (resize_to_fit=False)
    or the larger (resize_to_fit=True) side to fit, the other follows."""

    def __init__(self, width: int, height: int, keep_aspect_ratio: bool = False, resize_to_fit: bool = True,
                 apply_to: str = "all"):
        super().__init__(apply_to)
        self.width, self.height = int(width), int(height)
        self.keep_aspect_ratio, self.resize_to_fit = bool(keep_aspect_ratio), bool(resize_to_fit)

    def _size(self, h, w):
        if not self.keep_aspect_ratio:
            return self.width, self.height
        s = (min if self.resize_to_fit else max)(self.width / w, self.height / h)
        return max(1, int(round(w * s))), max(1, int(round(h * s)))

    def __call__(self, x, rng):
        ow, oh = self._size(x.shape[1], x.shape[2])
        if (oh, ow) == x.shape[1:3]:
            return x
        return np.stack([_resize(im, ow, oh) for im in x])


class PadCrop(Transform):
    """N2D2 PadCropTransformation: centre pad with zeros or centre crop to width x height."""

    def __init__(self, width: int, height: int, apply_to: str = "all"):
        super().__init__(apply_to)
        self.width, self.height = int(width), int(height)

    def __call__(self, x, rng):
        return _pad_crop(x, self.width, self.height)


class SliceExtraction(Transform):
    """N2D2 SliceExtractionTransformation: a width x height window at (offset_x, offset_y), or at a random offset
    per image (random_offset_x/y)."""

    def __init__(self, width: int, height: int, offset_x: int = 0, offset_y: int = 0, random_offset_x: bool = False,
                 random_offset_y: bool = False, apply_to: str = "all"):
        super().__init__(apply_to)
        self.width, self.height, self.offset_x, self.offset_y = int(width), int(height), int(offset_x), int(offset_y)
        self.random_offset_x, self.random_offset_y = bool(random_offset_x), bool(random_offset_y)
        self.random = self.random_offset_x or self.random_offset_y

    def __call__(self, x, rng):
        n, h, w, c = x.shape
        if self.width > w or self.height > h:
            raise DataError(f"SliceExtraction {self.width}x{self.height} is larger than the image {w}x{h}")
        if not self.random:
            if self.offset_x + self.width > w or self.offset_y + self.height > h:
                raise DataError(f"SliceExtraction window at ({self.offset_x}, {self.offset_y}) leaves the {w}x{h} image")
            return np.ascontiguousarray(x[:, self.offset_y:self.offset_y + self.height,
                                          self.offset_x:self.offset_x + self.width])
        oxs = rng.integers(0, w - self.width + 1, n) if self.random_offset_x else np.full(n, self.offset_x)
        oys = rng.integers(0, h - self.height + 1, n) if self.random_offset_y else np.full(n, self.offset_y)
        return np.stack([im[oy:oy + self.height, ox:ox + self.width] for im, ox, oy in zip(x, oxs, oys)])


class CenterCrop(SliceExtraction):
    """A centred SliceExtraction."""

    def __init__(self, width: int, height: int, apply_to: str = "all"):
        super().__init__(width, height, apply_to=apply_to)

    def __call__(self, x, rng):
        self.offset_x, self.offset_y = (x.shape[2] - self.width) // 2, (x.shape[1] - self.height) // 2
        return super().__call__(x, rng)


class RandomCrop(Transform):
    """Zero-pad by `padding` on each side, then take a random width x height window (pad-crop augmentation)."""

    random = True

    def __init__(self, width: int, height: int, padding: int = 0, apply_to: str = "learn"):
        super().__init__(apply_to)
        self.width, self.height, self.padding = int(width), int(height), int(padding)

    def __call__(self, x, rng):
        p = self.padding
        if p:
            x = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        return SliceExtraction(self.width, self.height, random_offset_x=True, random_offset_y=True)(x, rng)


class RandomResizeCrop(Transform):
    """N2D2 RandomResizeCropTransformation: a random area fraction in [scale_min, scale_max] and aspect ratio in
    [ratio_min, ratio_max] (log-uniform), cropped at a random place and resized to width x height."""

    random = True

    def __init__(self, width: int, height: int, scale_min: float = 0.08, scale_max: float = 1.0,
                 ratio_min: float = 0.75, ratio_max: float = 4.0 / 3.0, apply_to: str = "learn"):
        super().__init__(apply_to)
        self.width, self.height = int(width), int(height)
        self.scale_min, self.scale_max, self.ratio_min, self.ratio_max = scale_min, scale_max, ratio_min, ratio_max

    def _box(self, h, w, rng):
        area = h * w
        for _ in range(10):
            target = area * rng.uniform(self.scale_min, self.scale_max)
            ratio = np.exp(rng.uniform(np.log(self.ratio_min), np.log(self.ratio_max)))
            cw, ch = int(round(np.sqrt(target * ratio))), int(round(np.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        s = min(h, w)
        return (h - s) // 2, (w - s) // 2, s, s

    def __call__(self, x, rng):
        out = []
        for im in x:
            y0, x0, ch, cw = self._box(im.shape[0], im.shape[1], rng)
            out.append(_resize(im[y0:y0 + ch, x0:x0 + cw], self.width, self.height))
        return np.stack(out)


class Flip(Transform):
    """N2D2 FlipTransformation: horizontal/vertical flip, always or at random (probability 0.5 per image)."""

    def __init__(self, horizontal: bool = False, vertical: bool = False, random_horizontal_flip: bool = False,
                 random_vertical_flip: bool = False, apply_to: str = "all"):
        super().__init__(apply_to)
        self.horizontal, self.vertical = bool(horizontal), bool(vertical)
        self.random_horizontal_flip, self.random_vertical_flip = bool(random_horizontal_flip), bool(random_vertical_flip)
        self.random = self.random_horizontal_flip or self.random_vertical_flip

    def __call__(self, x, rng):
        x = x.copy()
        n = x.shape[0]
        if self.horizontal:
            x = x[:, :, ::-1]
        if self.vertical:
            x = x[:, ::-1]
        if self.random_horizontal_flip:
            m = rng.random(n) < 0.5
            x[m] = x[m][:, :, ::-1]
        if self.random_vertical_flip:
            m = rng.random(n) < 0.5
            x[m] = x[m][:, ::-1]
        return np.ascontiguousarray(x)


_OPS = {"plus": np.add, "minus": np.subtract, "multiplies": np.multiply, "divides": np.divide}


class RangeAffine(Transform):
    """N2D2 RangeAffineTransformation: x <- (x op1 v1) op2 v2, op in Plus/Minus/Multiplies/Divides; a value may be
    one number or one per channel (normalisation: Minus mean, Divides std)."""

    def __init__(self, first_operator: str, first_value, second_operator: str | None = None, second_value=None,
                 apply_to: str = "all"):
        super().__init__(apply_to)
        self.ops = []
        for op, v in ((first_operator, first_value), (second_operator, second_value)):
            if op is None:
                continue
            key = str(op).lower()
            if key not in _OPS:
                raise DataError(f"RangeAffine operator must be Plus, Minus, Multiplies or Divides, got {op!r}")
            if v is None:
                raise DataError(f"RangeAffine operator {op} needs a value")
            self.ops.append((key, np.asarray(v, np.float32).reshape(-1)))

    def __call__(self, x, rng):
        for op, v in self.ops:
            if v.size not in (1, x.shape[-1]):
                raise DataError(f"RangeAffine has {v.size} values for {x.shape[-1]} channels")
            x = _OPS[op](x, v if v.size > 1 else v[0]).astype(np.float32)
        return x


class ColorSpace(Transform):
    """N2D2 ColorSpaceTransformation: to RGB, BGR or Gray (ITU-R 601 luma) from the data's layout (Gray or RGB)."""

    def __init__(self, color_space: str, apply_to: str = "all"):
        super().__init__(apply_to)
        cs = str(color_space).upper()
        if cs in ("GREY", "GRAY", "L"):
            cs = "GRAY"
        if cs not in ("RGB", "BGR", "GRAY"):
            raise DataError(f"ColorSpace must be RGB, BGR or Gray, got {color_space!r}")
        self.color_space = cs

    def __call__(self, x, rng):
        c = x.shape[-1]
        if self.color_space == "GRAY":
            if c == 1:
                return x
            return (x[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].astype(np.float32)
        rgb = np.repeat(x, 3, axis=-1) if c == 1 else x[..., :3]
        return np.ascontiguousarray(rgb[..., ::-1]) if self.color_space == "BGR" else rgb


class Compose:
    """A pipeline: uint8/float batches in, float32 [N, H, W, C] out."""

    def __init__(self, transforms: list[Transform]):
        self.transforms = list(transforms)

    def __call__(self, x: np.ndarray, rng: np.random.Generator, train: bool) -> np.ndarray:
        x = x.astype(np.float32)
        for t in self.transforms:
            if t.applies(train):
                x = t(x, rng)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


_TYPES = {
    "rescale": Rescale, "padcrop": PadCrop, "sliceextraction": SliceExtraction, "centercrop": CenterCrop,
    "randomcrop": RandomCrop, "randomresizecrop": RandomResizeCrop, "flip": Flip, "rangeaffine": RangeAffine,
    "colorspace": ColorSpace,
}


def _snake(k: str) -> str:
    out = []
    for i, ch in enumerate(k):
        if ch.isupper() and i and (not k[i - 1].isupper()):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def build_transforms(specs: list[dict] | None) -> Compose:
    if not specs:
        return Compose([])
    out = []
    for spec in specs:
        spec = dict(spec)
        kind = str(spec.pop("type", spec.pop("Type", ""))).lower().replace("transformation", "").replace("_", "")
        if kind not in _TYPES:
            raise DataError(f"unknown transform type {kind!r} (known: {', '.join(sorted(_TYPES))})")
        kwargs = {_snake(k): v for k, v in spec.items()}
        try:
            out.append(_TYPES[kind](**kwargs))
        except TypeError as exc:
            raise DataError(f"transform {kind}: {exc}") from None
    return Compose(out)


def default_transforms() -> Compose:
    """Images in [0, 255] -> [0, 1] (N2D2 RangeAffine Divides 255)."""
    return Compose([RangeAffine("Divides", 255.0)])
