"""Is the data still what its manifest says? Checked wherever data is read for training and
evaluation, before any work.

Every manifest row carries a sha256: of the file, or, for an image inside a container (a
MedMNIST row, a NIfTI slice, a DICOM frame), of its decoded pixels. Hashing a whole dataset at
every start would cost seconds to minutes, so a file's size and modification time are
remembered once its content has been found equal to the manifest; a later check hashes only
the files whose size or time differ. The record lives in medtl's cache folder
(``$MEDTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/medtl``, else ``~/.cache/medtl``), one file per
manifest and data root; losing it only costs one full hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from medtl.data.manifest import Manifest, Row, resolve
from medtl.data.readers import read_array
from medtl.errors import DataError
from medtl.io import sha256_bytes, sha256_file, write_json

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """medtl's cache folder (see the module docstring)."""
    if os.environ.get("MEDTL_CACHE_DIR"):
        return Path(os.environ["MEDTL_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medtl"


def verify_data(manifest: Manifest, root: Path, splits: Sequence[str] | None = None) -> int:
    """Check that the files of ``splits`` (default: every row) under ``root`` hold what the
    manifest's sha256 says; return how many files had to be hashed. A changed or missing file
    is a :class:`DataError` naming it (and counting any others)."""
    rows = [r for r in manifest.rows if r.sha256 and (splits is None or r.split in splits)]
    by_file: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_file[row.path].append(row)
    record_path = _record_path(manifest, root)
    record = _load_record(record_path)
    changed: list[str] = []
    hashed = 0
    for path, file_rows in by_file.items():
        file = resolve(root, path)
        if not file.is_file():
            raise DataError(f"{file} does not exist; restore it or prepare the manifest again")
        stat = file.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, _expected(file_rows)]
        if record.get(path) == stamp:
            continue
        hashed += 1
        if _content_matches(file, file_rows):
            record[path] = stamp
        else:
            changed.append(str(file))
    if hashed:
        log.debug("hashed %d file(s) under %s new to or changed since the last check", hashed, root)
        _save_record(record_path, record)
    if changed:
        others = f" (and {len(changed) - 1} other file(s))" if len(changed) > 1 else ""
        raise DataError(
            f"{changed[0]}{others} changed since the manifest was made: its content differs from "
            "the manifest's sha256; restore the original, or prepare the manifest again "
            "(medtl audit lists every changed file)"
        )
    return hashed


def _expected(rows: list[Row]) -> str:
    """One digest of the hashes the manifest expects in a file (a record is valid for them)."""
    blob = "\n".join(f"{r.locator}:{r.sha256}" for r in rows)
    return hashlib.sha256(blob.encode()).hexdigest()


def _content_matches(file: Path, rows: list[Row]) -> bool:
    """The audit's hash: of the file, or of the decoded pixels of an image in a container."""
    for row in rows:
        if row.locator:
            actual = sha256_bytes(read_array(file, row.locator).tobytes())
        else:
            actual = sha256_file(file)
        if actual != row.sha256:
            return False
    return True


def _record_path(manifest: Manifest, root: Path) -> Path:
    key = f"{manifest.sha256}\n{os.path.realpath(root)}"
    return cache_dir() / "verified" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _load_record(path: Path) -> dict[str, list[object]]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _save_record(path: Path, record: dict[str, list[object]]) -> None:
    try:
        write_json(path, record)
    except OSError as exc:  # a read-only home: the next check hashes again, nothing worse
        log.debug("cannot write the verification record %s: %s", path, exc)
