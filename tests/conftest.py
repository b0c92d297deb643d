"""Fixtures shared by every test folder.

`corpus`: the CI tier of the model corpus (tests/corpus: torch exports of ResNet-18, MobileNetV3-small,
EfficientNet-B0, ShuffleNetV2, a U-Net, a YOLO-like detector and a ViT at opsets 11, 13 and 17, plus hand-written
Keras-style NHWC, 3-output and 2-input models), a list of tests.corpus.CorpusModel, built once per session into
ONNXQAT_CORPUS_DIR (default .corpus/) and reused across sessions until its sources change. A failed build is a
test error, never a skip: CI must build it (the export venv gets torch from PyPI's CPU wheel).
`corpus_models`: the same as a dict keyed by "name@opset".
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def corpus():
    from tests.corpus import build_corpus

    return build_corpus()


@pytest.fixture(scope="session")
def corpus_models(corpus):
    return {m.key: m for m in corpus}
