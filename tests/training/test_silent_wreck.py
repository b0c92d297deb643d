"""Issue 11's silent wreck: a pretrained float model, inserted with its recipe and trained one epoch with the settings
insert recorded, keeps its accuracy (it fell from 91.4 % to chance with the old defaults).

The pretrained model is the project's LeNet trained FP32 here for 3 epochs on 3,000 Fashion-MNIST images (a small
subset keeps CI cheap); accuracies on the same 1,000 test images."""

from __future__ import annotations

import pytest

from onnxqat.training.run import train
from train_helpers import FASHION

pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
DATA = dict(limit_train=3000, limit_test=1000, validation=0.1, progress=False, histograms=False, threads=1)


@pytest.fixture(scope="module", autouse=True)
def _library():
    from onnxqat.errors import OpLibraryError

    try:
        from onnxqat.ops.library import library_path

        library_path()
    except (OpLibraryError, ImportError) as exc:
        pytest.skip(f"quantizer op library not available: {exc}")


@pytest.mark.parametrize("recipe", ["lsq8", "sat8"])
def test_pretrained_model_keeps_its_accuracy_after_one_epoch_with_its_recipe(tmp_path_factory, recipe):
    import onnx

    from onnxqat.models.lenet import build_lenet
    from onnxqat.passes.insert import insert

    out = tmp_path_factory.mktemp("wreck")
    fp32 = train(build_lenet(0), "fashion-mnist", epochs=3, batch_size=64, lr=0.02, out=out / "fp32",
                 log=lambda *_: None, **DATA)
    assert fp32.test_top1 > 70.0  # a pretrained model worth keeping
    qat = insert(onnx.load(str(fp32.model_path)), recipe)
    said = []
    r = train(qat, "fashion-mnist", epochs=1, out=out / recipe, log=said.append, **DATA)
    lines = "\n".join(said).splitlines()
    assert any(s.startswith("  lr ") and s.endswith(f"(recipe {recipe} [train], recorded by insert)") for s in lines)
    assert r.test_top1 >= fp32.test_top1 - 1.0, (fp32.test_top1, r.initial, r.test_top1)
    assert not any(s.startswith("warning: after epoch 1") for s in lines)
