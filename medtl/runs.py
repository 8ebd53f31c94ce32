"""Run folders: the unit of work.

``runs/<name>/`` holds the resolved recipe, the environment, the data manifest and one
subfolder per stage. A stage writes its outputs under temporary names, renames them when
complete, and finally writes ``DONE`` holding the hash of its inputs: a rerun skips a stage
whose inputs did not change and redoes one whose inputs did.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtl import __version__
from medtl.data.manifest import Manifest, check_root
from medtl.errors import DataError, MedtlError
from medtl.io import atomic_write_text, write_json
from medtl.recipe import DataSection, Recipe

log = logging.getLogger(__name__)


def environment(seed: int) -> dict[str, Any]:
    """Versions and device: what a reader needs to reproduce a run."""
    import monai
    import timm
    import torch

    return {
        "medtl": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "seed": seed,
    }


LOCK_FILE = "LOCK"


class RunLock:
    """One writer per run folder: an exclusive ``fcntl.flock`` on ``<run>/LOCK``, which holds
    the writer's process id. The operating system drops the lock when the process ends, even
    by ``kill -9``, so a stale ``LOCK`` file never blocks a later run."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MedtlError(
                f"run folder {self.path.parent} is in use by process {holder} (it holds "
                f"{self.path}); wait for it to finish, stop it, or give another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock; the ``LOCK`` file stays (removing it could race with a new writer)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def start_run(recipe: Recipe, out: Path) -> Path:
    """Create the run folder and write ``recipe.yaml`` (resolved) and ``env.json``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
    write_json(out / "env.json", environment(recipe.seed))
    return out


def data_root(section: DataSection, override: str | Path | None) -> Path:
    root = override or section.root
    if root is None:
        raise DataError("no data root: set data.root in the recipe or pass --data-root")
    return check_root(root)


def check_manifest_path(section: DataSection) -> None:
    """A named manifest that is missing is an error, never a silent re-split."""
    if section.manifest and not Path(section.manifest).is_file():
        raise DataError(
            f"manifest {section.manifest} does not exist (relative to {Path.cwd()}); fix data.manifest, "
            "run from the repository root, or --set data.manifest=null to prepare one into the run folder"
        )


RESPLIT_FILE = "data/resplit.csv"


def run_manifest(run: Path, base: Path | None = None) -> Path:
    """The manifest a run folder's recipe used: the one the run prepared (``data/manifest.csv``),
    else the resolved recipe's ``data.manifest`` (a relative path is taken from ``base``, by
    default the working folder, as when the run started)."""
    prepared = run / "data" / "manifest.csv"
    if prepared.is_file():
        return prepared
    resolved = yaml.safe_load((run / "recipe.yaml").read_text(encoding="utf-8"))
    path = Path(resolved["data"]["manifest"])
    return path if path.is_absolute() or base is None else base / path


def check_named_files(recipe: Recipe, root: Path | None) -> list[str]:
    """Open every file the recipe names, as the stage that uses it would, so that a bad one
    fails ``medtl check`` instead of a run hours later: the adapter's files (``options.labels``,
    ``options.file``), ``pretrain.weights`` and ``finetune.weights`` (read without unpickling;
    the fine-tuning weights also loaded into the backbone), the sources of ``pretrain.data``
    (each must exist; listing and hashing wait for the stage), ``evaluate.external`` manifests
    and their roots. Returns one line per file checked."""
    from medtl.data.manifest import resolve
    from medtl.models import create_backbone, read_state_dict
    from medtl.sources import resolve as resolve_weights

    lines = []
    data = recipe.section("data") if recipe.has("data") else None
    if data is not None and root is not None:
        for key in ("labels", "file"):
            name = data.options.get(key)
            if isinstance(name, str) and not resolve(root, name, f"data.options.{key}").is_file():
                raise DataError(
                    f"data.options.{key}: {root / name} does not exist; fix the name (it is "
                    "relative to the data root) or the data root"
                )
    channels = data.loader.channels if data is not None else 3
    for section in ("pretrain", "finetune"):
        weights = getattr(recipe.sections.get(section), "weights", None)
        if not weights or weights == "pretrain":
            continue
        if section == "finetune":
            backbone = recipe.section("finetune").backbone
            create_backbone(backbone, 2, channels, weights)  # as finetune loads it, with a head
            lines.append(f"{section}.weights {weights}: loads into {backbone}")
        else:
            read_state_dict(resolve_weights(weights).path)
            lines.append(f"{section}.weights {weights}: readable")
    corpus = getattr(recipe.sections.get("pretrain"), "data", None)
    if corpus:
        from medtl.data.corpus import check_source

        lines += [check_source(i, source) for i, source in enumerate(corpus)]
    if recipe.has("evaluate"):
        from medtl.evaluate import DataSpec

        for text in recipe.section("evaluate").external:
            spec = DataSpec.parse(text)
            external = Manifest.load(spec.manifest)
            if spec.root is None:
                raise DataError(f"evaluate.external {text!r}: give it as MANIFEST:ROOT")
            check_root(spec.root)
            lines.append(f"evaluate.external {spec.name}: {len(external.rows)} rows")
    return lines


@dataclass
class Stage:
    """A stage folder with a ``DONE`` marker keyed on the hash of the stage's inputs."""

    folder: Path
    inputs: dict[str, Any]
    started: float | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        blob = json.dumps(self.inputs, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def done(self) -> bool:
        marker = self.folder / "DONE"
        return marker.is_file() and json.loads(marker.read_text()).get("inputs") == self.key

    def mark_done(self, summary: dict[str, Any] | None = None) -> None:
        """Write ``DONE``: the inputs' hash, when the stage finished, how long this (last)
        session of it took, and the stage's summary."""
        seconds = time.perf_counter() - self.started if self.started is not None else None
        finished = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        record = {"inputs": self.key, "finished": finished, "seconds": seconds, **(summary or {})}
        write_json(self.folder / "DONE", record)
        log.info(
            "stage %s: done%s",
            self.folder.name,
            f" in {seconds / 60:.1f} min" if seconds is not None else "",
            extra={"event": "stage_done", "stage": self.folder.name, "done": record},
        )

    def invalidate(self) -> None:
        (self.folder / "DONE").unlink(missing_ok=True)

    def begin(self) -> None:
        """Enter the stage: a folder left by other inputs (another config, other data) is
        cleared, so a checkpoint is only ever resumed by the run that wrote it."""
        inputs = self.folder / "INPUTS"
        if self.folder.exists() and (
            not inputs.is_file() or inputs.read_text().strip() != self.key
        ):
            shutil.rmtree(self.folder)
        resumed = inputs.is_file()
        self.folder.mkdir(parents=True, exist_ok=True)
        if not resumed:
            atomic_write_text(inputs, self.key + "\n")
        self.started = time.perf_counter()
        log.info(
            "stage %s: %s",
            self.folder.name,
            "resuming" if resumed else "starting",
            extra={"event": "stage_start", "stage": self.folder.name, "resumed": resumed},
        )
