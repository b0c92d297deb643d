"""The corpus of real model architectures that training (issue 11) and fusion (issue 12) are tested on.

    from tests.corpus import build_corpus, CorpusModel
    models = build_corpus()                      # every CI model at opsets 11, 13, 17 (built once, then cached)
    models = build_corpus(["resnet18", "vit"], opsets=[13])

Each `CorpusModel` has the .onnx path, its family, inputs (name, shape with None for the batch, layout, role,
value range), outputs (name, kind), num_classes, whether BatchNorm was folded, and a reference .npz of inputs
and expected outputs. The pytest fixture `corpus` (tests/conftest.py) builds the CI tier once per session.
See tests/corpus/README.md for the models and the build.
"""

from .build import CorpusBuildError, build_corpus, corpus_dir, export_venv, select
from .catalog import OPSETS, SPECS, CorpusModel, InputSpec, OutputSpec, Spec

__all__ = ["build_corpus", "CorpusModel", "CorpusBuildError", "InputSpec", "OutputSpec", "Spec", "SPECS", "OPSETS",
           "corpus_dir", "export_venv", "select"]
