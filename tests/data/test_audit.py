from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medtl.data.audit import Item, build_report, constant_border, duplicate_clusters, inspect_all
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
