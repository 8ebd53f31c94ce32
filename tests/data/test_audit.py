from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from medtl.data.audit import (
    DEFAULT_NEAR_BITS,
    DEFAULT_PHASH_BITS,
    Inspection,
    Item,
    NearPair,
    build_report,
    constant_border,
    duplicate_clusters,
    inspect_all,
)
from tests.conftest import write_png


def test_constant_border_widths_by_hand() -> None:
    img = np.random.default_rng(0).uniform(0.2, 0.8, size=(20, 30))
    img[:3] = 0.0  # 3 black rows on top
    img[:, -5:] = 0.0  # 5 black columns on the right
    borders = constant_border(img)
    assert borders["top"] == 3 and borders["right"] == 5
    assert borders["bottom"] == 0 and borders["left"] == 0


def test_duplicates_conflicts_and_broken_files(tmp_path: Path) -> None:
    a = write_png(tmp_path / "a" / "1.png", (64, 64), seed=1)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "1copy.png").write_bytes(a.read_bytes())  # exact duplicate, other label
    near = np.asarray(Image.open(a)).copy()
    near[0, 0] ^= 1
    Image.fromarray(near).save(tmp_path / "a" / "1near.png")  # near-duplicate, same label
    write_png(tmp_path / "a" / "2.png", (64, 64), seed=2)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "trunc.png").write_bytes(a.read_bytes()[:200])
    items = [
        Item(p, p, label=p.split("/")[0])
        for p in ["a/1.png", "b/1copy.png", "a/1near.png", "a/2.png", "a/empty.png", "a/trunc.png"]
    ]
    ins = inspect_all(tmp_path, items, workers=2)
    assert [i.error_kind for i in ins] == ["", "", "", "", "zero-byte", "unreadable"]
    assert "trunc.png" in ins[5].error
    report, clusters = build_report(items, ins, ["a", "b", "c"], near_bits=10)
    assert report.exact_duplicates == [["a/1.png", "b/1copy.png"]]
    assert sorted(report.near_duplicates[0]["members"]) == ["a/1.png", "a/1near.png", "b/1copy.png"]
    assert len(report.label_conflicts) == 1
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["empty-class", "label-conflict", "unreadable", "zero-byte"]
    assert report.n_usable == 4
    assert any({0, 1, 2} <= set(c) for c in clusters)


def test_near_duplicate_threshold(tmp_path: Path) -> None:
    items = []
    for i in range(3):
        write_png(tmp_path / f"{i}.png", (64, 64), seed=i)
        items.append(Item(f"{i}.png", f"{i}.png"))
    ins = inspect_all(tmp_path, items)
    exact, near, _ = duplicate_clusters(ins, near_bits=10)
    assert exact == [] and near == []  # independent noise images are ~128 bits apart
    _, near_all, _ = duplicate_clusters(ins, near_bits=256)
    assert near_all == [[0, 1, 2]]


def test_mask_size_and_wrong_format(tmp_path: Path) -> None:
    write_png(tmp_path / "x.png", (40, 32))
    write_png(tmp_path / "x_mask.png", (41, 32))
    Image.new("RGB", (40, 32)).save(tmp_path / "y.png", format="JPEG")
    items = [Item("x.png", "x.png", mask="x_mask.png"), Item("y.png", "y.png")]
    report, _ = build_report(items, inspect_all(tmp_path, items), [], near_bits=0)
    kinds = {p.kind: p for p in report.problems}
    assert "41x32" in kinds["mask-size"].detail
    assert "JPEG" in kinds["wrong-format"].detail


def _smooth_scan(seed: int, side: int = 256) -> np.ndarray:
    """A speckled, smoothly varying grey image, like an ultrasound frame: [side, side] uint8."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(side, side)), 12) * 6
    field += gaussian_filter(rng.normal(size=(side, side)), 2) * 1.5
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def test_recropped_copy_is_a_near_duplicate_that_dhash_alone_misses(tmp_path: Path) -> None:
    """A copy cropped by 4 pixels and resized back (how BUSI's duplicates differ) moves the
    difference hash far past its threshold; the DCT hash still joins the pair."""
    scan = Image.fromarray(_smooth_scan(0))
    scan.save(tmp_path / "scan.png")
    scan.crop((4, 4, 256, 256)).resize((256, 256), Image.BILINEAR).save(tmp_path / "copy.png")
    Image.fromarray(_smooth_scan(100)).save(tmp_path / "other.png")
    items = [Item(p, p) for p in ("scan.png", "copy.png", "other.png")]
    ins = inspect_all(tmp_path, items)
    dhash_bits = int((ins[0].dhash != ins[1].dhash).sum())  # type: ignore[operator]
    assert dhash_bits > 2 * DEFAULT_NEAR_BITS
    exact, near, pairs = duplicate_clusters(ins, DEFAULT_NEAR_BITS, DEFAULT_PHASH_BITS)
    assert exact == [] and near == [[0, 1]]
    assert pairs[(0, 1)].dhash == dhash_bits and pairs[(0, 1)].phash <= DEFAULT_PHASH_BITS
    _, dhash_only, _ = duplicate_clusters(ins, DEFAULT_NEAR_BITS, phash_bits=-1)
    assert dhash_only == []  # each view can be switched off; the difference hash misses it


def _hashed(key: str, dhash_bits: list[int], phash_bits: list[int]) -> Inspection:
    """An inspection whose hashes have exactly the given bits set."""
    dhash, phash = np.zeros(256, bool), np.zeros(256, bool)
    dhash[dhash_bits], phash[phash_bits] = True, True
    return Inspection(key, sha256=key, width=8, height=8, channels=1, dhash=dhash, phash=phash)


def test_clusters_found_by_either_hash_are_merged() -> None:
    """a~b by the difference hash only (3 bits apart; 30 DCT bits), b~c by the DCT hash only
    (2 bits; 40 difference bits), a and c far apart in both, d far from all: a, b and c form
    one cluster (union-find over both views), d stays alone."""
    a = _hashed("a", [], [])
    b = _hashed("b", [0, 1, 2], list(range(30)))
    c = _hashed("c", [0, 1, 2, *range(100, 140)], list(range(32)))
    d = _hashed("d", list(range(200, 256)), list(range(100, 200)))
    exact, near, pairs = duplicate_clusters([a, b, c, d], near_bits=10, phash_bits=8)
    assert exact == [] and near == [[0, 1, 2]]
    assert pairs == {(0, 1): NearPair(dhash=3, phash=30), (1, 2): NearPair(dhash=40, phash=2)}
    _, dhash_only, _ = duplicate_clusters([a, b, c, d], near_bits=10, phash_bits=-1)
    _, phash_only, _ = duplicate_clusters([a, b, c, d], near_bits=-1, phash_bits=8)
    assert dhash_only == [[0, 1]] and phash_only == [[1, 2]]
    items = [Item(k, k, label="x") for k in "abcd"]
    report, _ = build_report(items, [a, b, c, d], ["x"], near_bits=10, phash_bits=8)
    assert report.near_duplicates[0]["members"] == ["a", "b", "c"]
    assert report.near_duplicates[0]["max_bits"] == 40  # over the pairs that linked the cluster
    assert report.near_duplicates[0]["max_phash_bits"] == 30
