"""File manifests: what a prepared dataset folder must hold, with SHA-256 and size per file.

``mmlearn prepare <dataset>`` checks a layout once (shapes, counts, labels), then records every
file in ``MANIFEST.json`` (``{relative path: {"sha256": ..., "bytes": ...}}``). DataModules check
the manifest cheaply (every file present, same size) each time they load, so a file replaced or
truncated after preparation is an error naming it rather than a silent mismatch; ``prepare``
re-hashes everything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from mmlearn.errors import MMLearnError

NAME = "MANIFEST.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, files: Iterable[Path]) -> Path:
    """Record ``files`` (paths inside ``folder``) with their SHA-256 and size."""
    entries = {
        str(p.relative_to(folder)): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(files)
    }
    out = folder / NAME
    out.write_text(json.dumps(entries, indent=1) + "\n")
    return out


def check_manifest(folder: Path, expected: dict[str, str] | None = None, full: bool = True) -> None:
    """Every file of the manifest is in ``folder`` unchanged, else one error naming the file.

    Args:
        expected: relative path -> SHA-256 (a dataset's published files); ``None`` reads
            ``folder/MANIFEST.json`` (nothing to check when it does not exist).
        full: hash every file; ``False`` only compares sizes (cheap, at every load).
    """
    if expected is None:
        if not (folder / NAME).is_file():
            return
        recorded = json.loads((folder / NAME).read_text())
    else:
        recorded = {k: {"sha256": v} for k, v in expected.items()}
    for rel, entry in recorded.items():
        path = folder / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in the manifest of {folder})")
        size = entry.get("bytes")
        if size is not None and path.stat().st_size != size:
            raise MMLearnError(
                f"{path}: {path.stat().st_size} bytes, the manifest recorded {size}; the file "
                "changed since `mmlearn prepare` (prepare again if that was intended)"
            )
        if full:
            got = sha256(path)
            if got != entry["sha256"]:
                raise MMLearnError(
                    f"{path}: SHA-256 {got}, expected {entry['sha256']} (a different or damaged "
                    "copy)"
                )
