"""``prepare`` on fixture datasets: the split of a file is the same in every copy that holds it."""

from __future__ import annotations

from pathlib import Path

from medtl.data.manifest import Sample
from medtl.data.prepare import merge_groups, prepare, sample_key
from tests.conftest import write_png

COVID = "COVID-19_Radiography_Dataset"
CLASSES = ("COVID", "Normal", "Viral Pneumonia")


def _covid_release(root: Path, numbers: range, old_layout: bool) -> None:
    """COVID-19 Radiography in the older (``<class>/<class>-N.png``) or newer
    (``<class>/images/<class>-N.png``) layout; each file's pixels depend on its name only."""
    for c, label in enumerate(CLASSES):
        for n in numbers:
            folder = root / COVID / label if old_layout else root / COVID / label / "images"
            write_png(folder / f"{label}-{n}.png", (32, 32), seed=1000 * c + n)


def test_a_sample_and_the_full_release_agree_on_every_shared_file(tmp_path: Path) -> None:
    """The development sample (older layout, every fourth file) and the full release (newer
    layout): every file of the sample is in the same split in both manifests."""
    _covid_release(tmp_path / "full", range(1, 121), old_layout=False)
    _covid_release(tmp_path / "sample", range(1, 121, 4), old_layout=True)
    full = prepare("covid19_radiography", tmp_path / "full", tmp_path / "full.csv", workers=1)
    sample = prepare("covid19_radiography", tmp_path / "sample", tmp_path / "s.csv", workers=1)
    by_name = {Path(r.path).name: r.split for r in full.manifest.rows}
    assert len(sample.manifest.rows) == 90 and len(by_name) == 360
    assert all(by_name[Path(r.path).name] == r.split for r in sample.manifest.rows)
    counts = {s: sum(r.split == s for r in full.manifest.rows) for s in ("train", "val", "test")}
    assert abs(counts["train"] / 360 - 0.7) < 0.08 and min(counts.values()) > 0


def test_groups_are_named_by_file_name_or_adapter_group() -> None:
    samples = [
        Sample("a/x.png", label="a"),
        Sample("b/y.png", label="b"),
        Sample("c.npz", locator="train_images/3", label="a"),
        Sample("d/z.png", label="a", group="lesion-7"),
    ]
    assert merge_groups(samples, [[0, 1]]) == ["x.png", "x.png", "c.npz#train_images/3", "lesion-7"]
    assert sample_key("COVID/images/COVID-1.png") == sample_key("COVID-1.png") == "COVID-1.png"
