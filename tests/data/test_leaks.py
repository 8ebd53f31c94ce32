"""Official splits that leak: a Brain Tumor MRI layout with planted cross-split duplicates."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medtl.data.leaks import find_test_leaks, read_audit_clusters, resplit, split_leak_counts
from medtl.data.manifest import Manifest
from medtl.data.prepare import prepare
from medtl.data.split import carve_validation, group_split
from medtl.errors import DataError

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
PREFIX = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}


@dataclass
class Planted:
    root: Path
    manifest: Manifest
    path: Path
    leaking: set[str]  # test paths planted as copies of training images
    partners: set[str]  # the training images they copy
    test_only: set[str]  # a duplicate pair inside Testing: clean


def _noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(48, 48), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.as_posix()


def make_planted(root: Path) -> Planted:
    """``Training/<class>/Tr-xx_NNNN.png`` (12 a class) and ``Testing/<class>/Te-xx_NNNN.png``
    (5 a class); planted: two exact copies (bytes copied) and two near copies (one pixel
    changed) of training images in Testing, one duplicate pair inside Testing, one inside
    Training."""
    seed = 0
    for split, folder, n in (("Tr", "Training", 12), ("Te", "Testing", 5)):
        for cls in CLASSES:
            for i in range(n):
                seed += 1
                _save(root / folder / cls / f"{split}-{PREFIX[cls]}_{i:04d}.png", _noise(seed))
    leaking, partners = set(), set()
    for k, cls in enumerate(CLASSES):
        source = f"Training/{cls}/Tr-{PREFIX[cls]}_{k:04d}.png"
        target = f"Testing/{cls}/Te-{PREFIX[cls]}_{90 + k:04d}.png"
        if k < 2:  # exact: the same bytes
            shutil.copyfile(root / source, root / target)
        else:  # near: one pixel changed
            arr = np.array(Image.open(root / source))
            arr[0, 0] ^= 1
            _save(root / target, arr)
        leaking.add(target)
        partners.add(source)
    shutil.copyfile(root / "Testing/glioma/Te-gl_0000.png", root / "Testing/glioma/Te-gl_0095.png")
    shutil.copyfile(
        root / "Training/notumor/Tr-no_0005.png", root / "Training/notumor/Tr-no_0095.png"
    )
    path = root.parent / "manifest.csv"
    result = prepare(
        "brain_tumor_mri", root, path, ratios={"train": 0.7, "val": 0.15, "test": 0.15}
    )
    test_only = {"Testing/glioma/Te-gl_0000.png", "Testing/glioma/Te-gl_0095.png"}
    return Planted(root, result.manifest, path, leaking, partners, test_only)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    return make_planted(tmp_path_factory.mktemp("leaks") / "brain")


def _ids(manifest: Manifest, paths: set[str]) -> set[str]:
    return {r.id for r in manifest.rows if r.path in paths}


def test_clean_subset_excludes_exactly_the_planted_images(planted: Planted) -> None:
    leaks = find_test_leaks(planted.manifest, read_audit_clusters(planted.path))
    assert leaks.leaking == _ids(planted.manifest, planted.leaking)
    assert leaks.n_test == 4 * 5 + 4 + 1 and leaks.n_clean == leaks.n_test - 4
    assert leaks.n_groups == 4
    assert not _ids(planted.manifest, planted.test_only) & leaks.leaking  # test-only pair is clean


def test_the_manifest_groups_alone_give_the_same_subset(planted: Planted) -> None:
    assert find_test_leaks(planted.manifest).leaking == _ids(planted.manifest, planted.leaking)


def test_carved_validation_never_separates_a_cluster_from_its_test_members(
    planted: Planted,
) -> None:
    m = planted.manifest
    assert m.meta.split_source == "official+carved-val"
    test_groups = {r.group for r in m.rows if r.split == "test"}
    assert not [r.path for r in m.rows if r.split == "val" and r.group in test_groups]
    assert {r.split for r in m.rows if r.path in planted.partners} == {"train"}
    assert sum(r.split == "val" for r in m.rows) > 0


def test_carve_keeps_groups_touching_test_in_train_and_the_val_share() -> None:
    n = 200
    labels = ["a" if i % 3 else "b" for i in range(n)]
    groups = [f"g{i // 2}" for i in range(n)]  # pairs
    official = ["test" if i % 5 == 0 else "train" for i in range(n)]  # splits some pairs
    out = carve_validation(labels, groups, official, 0.15, seed=0)
    touching = {g for g, s in zip(groups, official, strict=True) if s == "test"}
    assert all(s != "val" for g, s in zip(groups, out, strict=True) if g in touching)
    free = [i for i in range(n) if official[i] == "train" and groups[i] not in touching]
    expected = group_split(
        [labels[i] for i in free], [groups[i] for i in free], {"train": 0.85, "val": 0.15}, 0
    )
    assert [out[i] for i in free] == expected  # the free groups carved at the recipe's share
    assert [s for s in out if s == "test"] == [s for s in official if s == "test"]


def test_carve_is_unchanged_where_no_group_touches_test() -> None:
    labels = ["a" if i % 3 else "b" for i in range(120)]
    groups = [f"g{i}" for i in range(120)]
    official = ["test" if i >= 100 else "train" for i in range(120)]
    out = carve_validation(labels, groups, official, 0.15, seed=4)
    expected = group_split(labels[:100], groups[:100], {"train": 0.85, "val": 0.15}, 4)
    assert out[:100] == expected


def test_carve_refuses_when_every_training_group_touches_test() -> None:
    with pytest.raises(DataError, match=r"data\.leaks=resplit"):
        carve_validation(["a"] * 4, ["g", "g", "h", "h"], ["train", "test"] * 2, 0.2, seed=0)


def test_no_choice_reads_the_test_labels(planted: Planted) -> None:
    """The clean subset and the carved validation depend on which rows are test, never on
    their labels."""
    m = planted.manifest
    relabelled = m.with_rows(
        [
            replace(r, label=CLASSES[(CLASSES.index(r.label) + 1) % 4]) if r.split == "test" else r
            for r in m.rows
        ]
    )
    assert find_test_leaks(relabelled).leaking == find_test_leaks(m).leaking
    labels = [r.label for r in m.rows]
    other = [r.label for r in relabelled.rows]
    official = ["test" if r.split == "test" else "train" for r in m.rows]
    groups = [r.group for r in m.rows]
    assert carve_validation(labels, groups, official, 0.15, 0) == carve_validation(
        other, groups, official, 0.15, 0
    )


def test_resplit_keeps_every_cluster_in_one_split(planted: Planted) -> None:
    fresh = resplit(
        planted.manifest,
        {"train": 0.7, "val": 0.15, "test": 0.15},
        0,
        read_audit_clusters(planted.path),
    )
    assert fresh.meta.split_source == "resplit"
    assert [r.id for r in fresh.rows] == [r.id for r in planted.manifest.rows]
    split_of: dict[str, set[str]] = {}
    for r in fresh.rows:
        split_of.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert find_test_leaks(fresh).leaking == frozenset()
    assert {r.split for r in fresh.rows} == {"train", "val", "test"}
    # saved and loaded again, the straddle check of a seeded split applies
    fresh.save(planted.path.parent / "resplit.csv")
    assert Manifest.load(planted.path.parent / "resplit.csv").meta.split_source == "resplit"


def test_split_leak_counts_of_the_fixture(planted: Planted) -> None:
    import json

    audit = json.loads(planted.path.with_name("manifest.audit.json").read_text())
    counts = split_leak_counts(planted.manifest, audit)
    assert counts["exact_clusters_across_splits"] == 2
    assert counts["near_clusters_across_splits"] == 4  # exact copies are near ones too
    assert counts["leaking_test_images"] == 4 and counts["groups_shared_with_test"] == 4


def test_breastmnist_official_split_leaks_are_counted() -> None:
    """The committed BreastMNIST manifest and its audit (of the real file): one exact-duplicate
    pair across train / test, and official test images that leak."""
    import json

    base = Path(__file__).resolve().parents[2] / "data_manifests"
    manifest = Manifest.load(base / "breastmnist.csv")
    audit = json.loads((base / "breastmnist.audit.json").read_text())
    counts = split_leak_counts(manifest, audit)
    assert counts["exact_clusters_across_splits"] == 1
    assert counts["leaking_test_images"] == len(find_test_leaks(manifest).leaking) > 0


@pytest.mark.parametrize("policy", ["keep", "drop", "resplit"])
def test_the_run_folder_manifest_of_each_policy(
    planted: Planted, policy: str, tmp_path: Path
) -> None:
    """keep and drop train on the official split (validation carved); resplit on a seeded
    group-aware split written to ``data/resplit.csv``, where nothing leaks."""
    from medtl.pipeline import PrepareStage
    from medtl.recipe import DataSection
    from medtl.runs import RESPLIT_FILE

    section = DataSection(adapter="brain_tumor_mri", manifest=str(planted.path), leaks=policy)
    manifest = PrepareStage().manifest(section, planted.root, tmp_path)
    if policy == "resplit":
        assert manifest.meta.split_source == "resplit"
        assert Manifest.load(tmp_path / RESPLIT_FILE).sha256 == manifest.sha256
        assert not find_test_leaks(manifest).leaking
    else:
        assert manifest.sha256 == planted.manifest.sha256
        assert not (tmp_path / RESPLIT_FILE).exists()
        assert len(find_test_leaks(manifest).leaking) == 4
