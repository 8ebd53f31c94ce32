"""Shared fixtures: the real data folder beside the project, and tiny image writers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(sub: str) -> Path:
    """``../shared/data/<sub>``, or skip the test with a reason when it is absent."""
    path = SHARED_DATA / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (CI provides ../shared/data)")
    return path


def write_png(path: Path, size: tuple[int, int] = (40, 32), seed: int = 0, mode: str = "L") -> Path:
    """A small random image (width, height) at ``path``; parents are created."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], *channels), dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return path


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on one intra-op thread: they gain nothing from more, and lose much on a busy
    2-core machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sets(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]`` for ``medtl.cli.main``."""
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(autouse=True, scope="session")
def medtl_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """medtl's cache folder (verification records) inside the session's temporary folder."""
    folder = tmp_path_factory.mktemp("medtl-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDTL_CACHE_DIR", str(folder))
    yield folder
    patch.undo()
