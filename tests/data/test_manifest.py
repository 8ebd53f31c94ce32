from __future__ import annotations

import json
from pathlib import Path

import pytest

from medtl.data.manifest import (
    Manifest,
    ManifestMeta,
    Row,
    check_relative_path,
    check_root,
    resolve,
    row_id,
)
from medtl.errors import DataError


def _meta(**kw: object) -> ManifestMeta:
    base: dict = dict(
        adapter="folder",
        classes=["a", "b"],
        split_seed=0,
        split_ratios={"train": 0.7, "val": 0.15, "test": 0.15},
        split_source="seeded",
    )
    base.update(kw)
    return ManifestMeta(**base)


def _row(path: str, label: str = "a", split: str = "train", group: str | None = None) -> Row:
    return Row(row_id(path), path, label, split, group or row_id(path), "0" * 64, 10, 10)


def test_save_load_round_trip(tmp_path: Path) -> None:
    m = Manifest([_row("a/1.png"), _row("b/2.png", "b", "test")], _meta())
    out = m.save(tmp_path / "m.csv")
    loaded = Manifest.load(out)
    assert loaded.rows == m.rows
    assert loaded.classes == ["a", "b"]
    side = json.loads((tmp_path / "m.json").read_text())
    assert side["csv_sha256"] == loaded.sha256
    assert side["counts"] == {"test": {"b": 1}, "train": {"a": 1}}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_row_ids_are_stable() -> None:
    assert row_id("a/1.png") == row_id("a/1.png")
    assert row_id("x.npz", "train_images/1") != row_id("x.npz", "train_images/2")


@pytest.mark.parametrize(
    "bad", ["../../etc/passwd", "/etc/passwd", "a/../../x.png", "C:\\x.png", ""]
)
def test_paths_outside_the_root_are_refused(bad: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data root"):
        check_relative_path(bad)
    with pytest.raises(DataError):
        resolve(tmp_path, bad)


def test_resolve_keeps_inside_root(tmp_path: Path) -> None:
    assert resolve(tmp_path, "a/b.png") == tmp_path / "a" / "b.png"


def test_label_outside_class_list_is_refused() -> None:
    with pytest.raises(DataError, match=r"label 'c'.*not in the class list"):
        Manifest([_row("c/1.png", "c")], _meta())


def test_group_straddling_splits_is_refused_for_seeded_splits() -> None:
    rows = [_row("a/1.png", group="g"), _row("a/2.png", split="test", group="g")]
    with pytest.raises(DataError, match="straddles"):
        Manifest(rows, _meta())


def test_empty_split_is_a_clear_error() -> None:
    m = Manifest([_row("a/1.png")], _meta())
    with pytest.raises(DataError, match="split 'test' of this manifest is empty"):
        m.split("test")


def test_load_reports_line_of_bad_row(tmp_path: Path) -> None:
    m = Manifest([_row("a/1.png")], _meta())
    out = m.save(tmp_path / "m.csv")
    text = out.read_text().replace("a/1.png", "../../etc/passwd")
    out.write_text(text)
    with pytest.raises(DataError, match=r"m.csv line 2: .*escapes the data root"):
        Manifest.load(out)


def test_missing_manifest_and_sidecar(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Manifest.load(tmp_path / "nope.csv")
    (tmp_path / "m.csv").write_text("id\n")
    with pytest.raises(DataError, match="sidecar"):
        Manifest.load(tmp_path / "m.csv")


def test_links_pointing_outside_the_root_are_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"x")
    (root / "inside.png").write_bytes(b"x")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "sub" / "folder").symlink_to(outside, target_is_directory=True)
    (root / "alias.png").symlink_to(root / "inside.png")  # a link inside the root is fine
    assert resolve(root, "alias.png") == root / "alias.png"
    for path in ("link.png", "sub/folder/secret.png"):
        with pytest.raises(DataError, match=rf"{path} is a link to .*outside the data root"):
            resolve(root, path)
    linked_root = tmp_path / "root-link"  # the data root itself may be a link
    linked_root.symlink_to(root, target_is_directory=True)
    assert resolve(linked_root, "inside.png") == linked_root / "inside.png"


def test_a_data_root_that_is_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("x")
    with pytest.raises(DataError, match=r"data root .*data\.csv is a file, not a folder"):
        check_root(tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"data root .*nope does not exist"):
        check_root(tmp_path / "nope")
    assert check_root(tmp_path) == tmp_path
