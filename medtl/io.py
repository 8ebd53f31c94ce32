"""Atomic file output and hashing.

Every file medtl writes goes to a temporary name in the same folder and is renamed into
place, so an interrupted run never leaves a half-written manifest, checkpoint or report.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove that a file can be written in it, before any long
    work starts; otherwise one clear error naming the folder."""
    from medtl.errors import MedtlError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medtl-write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise MedtlError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); choose another "
            "output folder or fix its permissions"
        ) from None
    return folder


def remove_stray_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.<name>.<random>.tmp``) that :func:`atomic_open` leaves
    when its process is killed mid-write; call only while no other process writes there."""
    removed = []
    for tmp in sorted(Path(folder).rglob(".*.tmp")):
        if tmp.is_file() and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask cannot be read without setting it


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted, strict JSON (NaN and infinities become ``null``),
    atomically."""
    text = json.dumps(finite(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    atomic_write_text(path, text + "\n")


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    if hasattr(obj, "item") and hasattr(obj, "ndim") and obj.ndim == 0:  # numpy / torch scalars
        return finite(obj.item())
    if hasattr(obj, "tolist"):
        return finite(obj.tolist())
    return obj


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_marked_section(path: str | Path, section: str, start: str, end: str, title: str) -> None:
    """Put ``section`` (which begins with ``start`` and ends with ``end``) into the Markdown file
    ``path``: it replaces the text between the markers, or is appended; a missing file is
    created with the heading ``# title``. Benchmarks write their figures into docs/ this way."""
    path = Path(path)
    doc = path.read_text(encoding="utf-8") if path.is_file() else f"# {title}\n"
    if start in doc and end in doc:
        head, rest = doc.split(start, 1)
        doc = head + section + rest.split(end, 1)[1]
    else:
        doc = doc.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, doc)
