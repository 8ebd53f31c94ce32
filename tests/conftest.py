"""Shared fixtures: the real data folder beside the project, and tiny image writers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def train_tiny(
    base: Path,
    model: Path,
    *,
    n: int = 64,
    size: int = 32,
    epochs: int = 2,
    batch_size: int = 16,
    **options: Any,
) -> Path:
    """Fine-tune ``medtl_tiny_convnext`` into ``model`` on a phantom of ``n`` images made under
    ``base`` (manifest ``base/m.csv``, 32 px, one channel); returns the phantom's root."""
    from medtl.data.dataset import DataConfig
    from medtl.data.prepare import prepare
    from medtl.demo import make_phantom
    from medtl.finetune.loop import FinetuneConfig, finetune

    root = make_phantom(base / "phantom", n=n, size=size, duplicates=0)
    manifest = prepare("folder", root, base / "m.csv", workers=1).manifest
    cfg = DataConfig(image_size=32, channels=1, batch_size=batch_size)
    ft = FinetuneConfig(
        backbone="medtl_tiny_convnext",
        epochs=epochs,
        batch_size=batch_size,
        min_epochs=epochs,
        **options,
    )
    finetune(ft, manifest, root, cfg, model, progress=False)
    return root


def tiny_pretrain(**options: Any) -> Any:
    """A masked pretraining of ``test_resnet`` small enough for a test: 2 epochs of batches of
    4, a checkpoint at epoch 2, a 16-wide decoder, no pictures; ``options`` change any key."""
    from medtl.pretrain.loop import PretrainConfig

    base: dict[str, Any] = dict(
        backbone="test_resnet",
        epochs=2,
        batch_size=4,
        warmup_epochs=0,
        checkpoint_every=2,
        picture_every=0,
        decoder_dim=16,
    )
    return PretrainConfig(**{**base, **options})


def pretrain_killed_and_resumed(
    cfg: Any, manifest: Any, root: Path, data_cfg: Any, out: Path, stop_after_steps: int
) -> tuple[Any, Any]:
    """``cfg`` pretrained whole into ``out/a``, and into ``out/b`` killed after
    ``stop_after_steps`` steps then resumed (seed 3 both times); checks that the killed run left
    no encoder and that the resumed one is bit-equal (losses and encoder weights). Both
    results, uninterrupted first."""
    from medtl.models import read_state_dict
    from medtl.pretrain.loop import pretrain

    def run(folder: str, stop: int | None = None) -> Any:
        return pretrain(
            cfg, manifest, root, data_cfg, out / folder, seed=3, progress=False,
            stop_after_steps=stop,
        )  # fmt: skip

    full = run("a")
    run("b", stop_after_steps)
    assert not (out / "b" / "encoder.safetensors").exists()  # killed: nothing looks complete
    resumed = run("b")
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    a, b = read_state_dict(full.encoder), read_state_dict(resumed.encoder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return full, resumed
