"""What the corpus holds: one `Spec` per architecture, and the `CorpusModel` record that `build_corpus()` returns.

Plain Python only (no torch, no onnx): the export script imports this file inside the export venv (as `catalog`),
the test suite and bench scripts import it as `tests.corpus.catalog`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

OPSETS = (11, 13, 17)


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # None for the (dynamic) batch axis
    layout: str  # "NCHW", "NHWC" or "other"
    role: str  # "data" (what a data set feeds) or "state" (a recurrent state, fed by the caller)
    value_range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class OutputSpec:
    name: str
    kind: str  # "logits", "probabilities", "map", "boxes", "scores", "landmarks", "detections", "state"
    shape: tuple  # None for the batch axis (and for axes that depend on it)


@dataclass(frozen=True)
class Spec:
    """One architecture of the corpus (a model name; exported or written once per opset)."""

    name: str
    family: str  # "classifier", "segmentation", "detector", "vit", "face-detector", "recurrent"
    source: str  # "torch" (tests/corpus/architectures.py), "onnx" (tests/corpus/handwritten.py), "pypi"
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    num_classes: int | None = None
    bn_folded: bool = True
    notes: str = ""
    tier: str = "ci"  # "ci" (built by the test suite) or "pypi" (optional, real pretrained models)
    arch: str = ""  # torch: the architecture function in architectures.py (defaults to name)
    opsets: tuple[int, ...] = OPSETS
    package: str = ""  # pypi: the requirement whose wheel holds the model ("name==version")
    member: str = ""  # pypi: the file in that wheel (.onnx, or a state_dict for `arch`)

    @property
    def data_input(self) -> InputSpec:
        return next(i for i in self.inputs if i.role == "data")


@dataclass
class CorpusModel:
    """A built corpus model: one architecture at one opset."""

    name: str
    opset: int
    path: Path
    family: str
    inputs: list[InputSpec]
    outputs: list[OutputSpec]
    num_classes: int | None
    value_range: tuple[float, float]  # of the data input
    bn_folded: bool
    notes: str
    source: str = "torch"
    tier: str = "ci"
    reference: Path | None = None  # .npz: "input:<name>" arrays and the expected "output:<name>" arrays
    reference_by: str = ""  # what computed the reference outputs ("torch 2.13.0", "numpy float64")
    source_hash: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@{self.opset}"

    @property
    def data_input(self) -> InputSpec:
        return next(i for i in self.inputs if i.role == "data")

    def to_json(self, root: Path) -> dict:
        d = asdict(self)
        d["path"] = str(Path(self.path).relative_to(root))
        d["reference"] = str(Path(self.reference).relative_to(root)) if self.reference else None
        return d

    @classmethod
    def from_json(cls, d: dict, root: Path) -> "CorpusModel":
        d = dict(d)
        d["path"] = root / d["path"]
        d["reference"] = root / d["reference"] if d.get("reference") else None
        d["inputs"] = [InputSpec(**{**i, "shape": tuple(i["shape"]), "value_range": tuple(i["value_range"])})
                       for i in d["inputs"]]
        d["outputs"] = [OutputSpec(**{**o, "shape": tuple(o["shape"])}) for o in d["outputs"]]
        d["value_range"] = tuple(d["value_range"])
        return cls(**d)


def _img(name="image", c=3, hw=64, value_range=(0.0, 1.0), layout="NCHW") -> InputSpec:
    shape = (None, c, hw, hw) if layout == "NCHW" else (None, hw, hw, c)
    return InputSpec(name, shape, layout, "data", value_range)


def _logits(n=10) -> tuple[OutputSpec, ...]:
    return (OutputSpec("logits", "logits", (None, n)),)


SPECS: tuple[Spec, ...] = (
    # ---- torch exports (architectures.py): random weights, BatchNorm statistics from 10 train-mode passes
    Spec("resnet18", "classifier", "torch", (_img(),), _logits(), 10,
         notes="torchvision ResNet-18 topology (BasicBlock x [2,2,2,2]), widths 16-128; ImageNet mean/std "
               "normalisation in the graph; MaxPool, GlobalAveragePool, Flatten, Gemm"),
    Spec("resnet18_bn", "classifier", "torch", (_img(),), _logits(), 10, bn_folded=False, arch="resnet18",
         notes="resnet18 exported with training=PRESERVE: BatchNormalization kept as its own node"),
    Spec("mobilenetv3_small", "classifier", "torch", (_img(),), _logits(), 10,
         notes="torchvision MobileNetV3-small config at width 0.5: depthwise, HardSwish, squeeze-excitation "
               "(ReLU, HardSigmoid, Mul); (x - 0.5)/0.5 normalisation; opset < 14 has HardSigmoid*x for HardSwish"),
    Spec("mobilenetv3_small_bn", "classifier", "torch", (_img(),), _logits(), 10, bn_folded=False,
         arch="mobilenetv3_small", notes="mobilenetv3_small with BatchNormalization kept (training=PRESERVE)"),
    Spec("efficientnet_b0", "classifier", "torch", (_img(),), _logits(), 10,
         notes="EfficientNet-B0 MBConv topology at width 0.5, depth [1,1,1,2,2,2,1]: SiLU (Sigmoid*x), SE with "
               "Sigmoid gate, depthwise; (x*255 - 127.5)/128 normalisation; PyTorch x.view(x.size(0), -1) "
               "flatten (Shape->Gather->Unsqueeze->Concat->Reshape)"),
    Spec("shufflenet_v2", "classifier", "torch", (_img(),), _logits(), 10,
         notes="torchvision ShuffleNetV2 x0.5 channels, repeats [2,3,2]: chunk (exported as Slice on "
               "Shape arithmetic), Concat, channel shuffle (Reshape/Transpose/Reshape), ReduceMean head; "
               "no normalisation"),
    Spec("unet", "segmentation", "torch", (_img(value_range=(0.0, 255.0)),),
         (OutputSpec("prob_map", "map", (None, 1, 64, 64)),), None,
         notes="U-Net/DBNet-like: 3-level encoder, decoder with ConvTranspose, nearest and bilinear Resize, "
               "Concat skips, DBNet-style head (strided Conv, ConvTranspose, BatchNormalization kept after it, "
               "Sigmoid); input 0..255, (x - 127.5)/128"),
    Spec("yolo", "detector", "torch", (_img(),),
         (OutputSpec("p3", "detections", (None, 3, 8, 8, 8)), OutputSpec("p4", "detections", (None, 3, 4, 4, 8)),
          OutputSpec("p5", "detections", (None, 3, 2, 2, 8))), None,
         notes="YOLOv5/v8-like: Focus (strided Slice + Concat), Conv-BN-SiLU, C2f (Split, residual Add, Concat), "
               "SPPF (MaxPool x3), LeakyRelu neck with nearest Resize + Concat, 3 heads (Reshape, Transpose, "
               "Sigmoid), 3 classes x 3 anchors"),
    Spec("vit", "vit", "torch", (_img(hw=32),), _logits(), 10,
         notes="ViT: 4x4 patch-embedding Conv, Reshape/Transpose, cls token Concat, position Add, 3 blocks of "
               "LayerNorm, attention (MatMul Q.K^T, Softmax, MatMul A.V), GELU MLP, residual Add; (x - 0.5)/0.5; "
               "opset < 17 has LayerNorm decomposed (ReduceMean, Sub, Pow, Sqrt, Div)"),
    # ---- written as ONNX directly (handwritten.py), numpy float64 references
    Spec("keras_nhwc", "classifier", "onnx", (_img("input_1", value_range=(0.0, 255.0), layout="NHWC"),),
         (OutputSpec("probs", "probabilities", (None, 10)),), 10, bn_folded=False,
         notes="Keras/tf2onnx-style: NHWC input in 0..255, x/127.5 - 1 (Mul, Add), Transpose to NCHW, Conv with "
               "auto_pad SAME_UPPER and VALID, BatchNormalization, PReLU per channel, depthwise Conv, Transpose "
               "back, ReduceMean, Gemm, trailing Softmax"),
    Spec("face_detector", "face-detector", "onnx", (_img(value_range=(0.0, 255.0)),),
         (OutputSpec("boxes", "boxes", (None, 320, 4)), OutputSpec("scores", "scores", (None, 320, 2)),
          OutputSpec("landmarks", "landmarks", (None, 320, 10))), None,
         notes="UltraFace/RetinaFace-like: (x - 127)/128, depthwise-separable backbone, box/score/landmark heads on "
               "2 scales (Transpose, Reshape, Concat), Softmax scores; 3 outputs"),
    Spec("vad_state", "recurrent", "onnx",
         (InputSpec("features", (None, 1, 32, 32), "NCHW", "data", (0.0, 1.0)),
          InputSpec("h", (None, 32), "other", "state", (-1.0, 1.0))),
         (OutputSpec("speech_prob", "scores", (None, 1)), OutputSpec("h_out", "state", (None, 32))), None,
         notes="voice-activity-style: 1-channel spectrogram through a Conv stack, then a GRU cell written with "
               "Gemm/MatMul/Sigmoid/Tanh/Mul/Sub/Add on the recurrent state input h; outputs speech_prob and h_out"),
)

_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_OCR_NOTE = ("; input = (pixels/255 - 0.5)/0.5 computed outside the graph (rapidocr's config), height and width "
             "dynamic in the file (the shape here is the size the corpus feeds); weights as Constant nodes")

# real pretrained models shipped in PyPI wheels (optional tier: downloaded with pip at build time)
SPECS += (
    Spec("ocr_det", "segmentation", "pypi", (_img("x", value_range=(-1.0, 1.0)),),
         (OutputSpec("sigmoid_0.tmp_0", "map", (None, 1, 64, 64)),), None, bn_folded=False, tier="pypi",
         opsets=(12,), package=_RAPIDOCR, member="rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
         notes="PaddleOCR PP-OCRv4 text detector (DBNet, PaddlePaddle -> paddle2onnx): HardSigmoid SE, Resize, "
               "ConvTranspose, Sigmoid map" + _OCR_NOTE),
    Spec("ocr_cls", "classifier", "pypi", (InputSpec("x", (None, 3, 48, 192), "NCHW", "data", (-1.0, 1.0)),),
         (OutputSpec("save_infer_model/scale_0.tmp_1", "probabilities", (None, 2)),), 2, bn_folded=False,
         tier="pypi", opsets=(11,), package=_RAPIDOCR,
         member="rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         notes="PaddleOCR text-direction classifier (0 / 180 degrees), MobileNetV3-like, trailing Softmax"
               + _OCR_NOTE),
    Spec("ocr_rec", "recognizer", "pypi", (InputSpec("x", (None, 3, 48, 320), "NCHW", "data", (-1.0, 1.0)),),
         (OutputSpec("softmax_11.tmp_0", "probabilities", (None, 40, 6625)),), None, bn_folded=False,
         tier="pypi", opsets=(12,), package=_RAPIDOCR,
         member="rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
         notes="PaddleOCR PP-OCRv4 text recogniser (SVTR-like: convolutions, attention MatMuls, LayerNorm "
               "decomposed, CTC Softmax over 6625 symbols)" + _OCR_NOTE),
    Spec("mnist_cnn", "classifier", "pypi", (_img(c=1, hw=28),), _logits(), 10, tier="pypi", opsets=(13,),
         arch="mnist_cnn", package="digit-recognizer-py==0.1.0",
         member="digit_recognizer/models/handwriting_model.pth",
         notes="digit-recognizer-py's pretrained MNIST CNN (3 Conv-ReLU-MaxPool, 2 Linear) exported with torch; "
               "(x - 0.1307)/0.3081 normalisation in the graph; x.view(x.size(0), -1) flatten; input white digit "
               "on black in [0, 1]"),
)

SPEC_BY_NAME = {s.name: s for s in SPECS}
