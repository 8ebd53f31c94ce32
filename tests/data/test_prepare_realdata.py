"""``prepare`` on the real datasets in ``../shared/data`` (see its DATA.md).

Each dataset is prepared once per module (the work is reading every image); each test skips
with a reason when its folder is absent. The expected figures are those DATA.md documents:
row counts, classes, official splits and the known problems (BUSI's duplicate scan with two
labels, the mask whose size differs from its image, ISIC's lesions).
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from medtl.data.prepare import PrepareResult, prepare
from tests.conftest import shared

pytestmark = pytest.mark.realdata

BUSI = "Dataset_BUSI_with_GT"
DATASETS = {  # fixture name: (adapter, folder or file under ../shared/data)
    "busi": ("busi", "busi"),
    "busi_subset": ("busi", "busi_original_subset"),
    "brain": ("brain_tumor_mri", "brain_tumor_mri_sample"),
    "covid": ("covid19_radiography", "covid19_radiography_sample"),
    "isic": ("isic2018", "isic2018_sample"),
    "breastmnist": ("medmnist", "medmnist/breastmnist.npz"),
    "pneumonia_reduced": ("medmnist", "medmnist/pneumoniamnist_reduced_train.npz"),
    "pneumonia_balanced": ("medmnist", "medmnist/pneumoniamnist_balanced_subset.npz"),
}


def _prepare(name: str, tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    adapter, sub = DATASETS[name]
    out = tmp_path_factory.mktemp(name) / f"{name}.csv"
    return prepare(adapter, shared(sub), out, seed=0, workers=2)


@pytest.fixture(scope="module")
def busi(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("busi", tmp_path_factory)


@pytest.fixture(scope="module")
def busi_subset(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("busi_subset", tmp_path_factory)


@pytest.fixture(scope="module")
def brain(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("brain", tmp_path_factory)


@pytest.fixture(scope="module")
def covid(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("covid", tmp_path_factory)


@pytest.fixture(scope="module")
def isic(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("isic", tmp_path_factory)


@pytest.fixture(scope="module")
def breastmnist(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("breastmnist", tmp_path_factory)


@pytest.fixture(scope="module")
def pneumonia_reduced(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("pneumonia_reduced", tmp_path_factory)


@pytest.fixture(scope="module")
def pneumonia_balanced(tmp_path_factory: pytest.TempPathFactory) -> PrepareResult:
    return _prepare("pneumonia_balanced", tmp_path_factory)


def split_sizes(result: PrepareResult) -> dict[str, int]:
    return dict(Counter(r.split for r in result.manifest.rows))


def group_splits(result: PrepareResult) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in result.manifest.rows:
        out.setdefault(r.group, set()).add(r.split)
    return out


# -- every dataset ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(DATASETS))
def test_manifest_is_relative_and_complete(name: str, request: pytest.FixtureRequest) -> None:
    result: PrepareResult = request.getfixturevalue(name)
    adapter, sub = DATASETS[name]
    data = shared(sub)
    root = data.parent if data.is_file() else data
    m = result.manifest
    assert result.audit.n_items == result.audit.n_usable == len(m.rows)  # nothing unreadable
    csv_text = result.manifest_path.read_text(encoding="utf-8")
    side_text = result.manifest_path.with_suffix(".json").read_text(encoding="utf-8")
    for text in (csv_text, side_text):
        assert str(root) not in text and str(root.resolve()) not in text
    assert json.loads(side_text)["adapter"] == adapter
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert len(rows) == len(m.rows)
    for row in rows[:: max(1, len(rows) // 50)]:  # a sample of rows: paths resolve under root
        assert not row["path"].startswith("/")
        assert (root / row["path"]).is_file()
    assert {r.split for r in m.rows} == {"train", "val", "test"}


# -- BUSI ------------------------------------------------------------------------------------
def test_busi_rows_classes_and_seeded_split(busi: PrepareResult) -> None:
    m = busi.manifest
    assert len(m.rows) == 780
    assert m.classes == ["benign", "malignant", "normal"]
    assert Counter(r.label for r in m.rows) == {"benign": 437, "malignant": 210, "normal": 133}
    assert m.meta.split_source == "seeded"
    assert all(len(s) == 1 for s in group_splits(busi).values())


def test_busi_label_conflict_is_one_group_and_split(busi: PrepareResult) -> None:
    a, b = f"{BUSI}/benign/benign (131).png", f"{BUSI}/malignant/malignant (51).png"
    conflicts = [c for c in busi.audit.label_conflicts if a in c["members"]]
    assert len(conflicts) == 1 and b in conflicts[0]["members"]
    rows = {r.path: r for r in busi.manifest.rows}
    assert rows[a].label == "benign" and rows[b].label == "malignant"
    assert rows[a].group == rows[b].group
    assert rows[a].split == rows[b].split
    assert any(p.kind == "label-conflict" for p in busi.audit.problems)


def test_busi_near_duplicates_do_not_straddle_splits(busi: PrepareResult) -> None:
    near = busi.audit.near_duplicates
    assert len(near) >= 12  # DATA.md: about 12 pairs within 5 bits, 65 within 10
    assert all(len(set(c["splits"])) == 1 for c in near)
    assert not [p for p in busi.audit.problems if p.kind == "cross-split-duplicate"]
    rows = {r.path: r for r in busi.manifest.rows}
    for cluster in near:
        assert len({rows[k].group for k in cluster["members"]}) == 1


@pytest.mark.parametrize(
    "a, b", [("benign (13).png", "benign (330).png"), ("benign (177).png", "benign (35).png")]
)
def test_busi_recropped_duplicates_share_a_cluster_and_split(
    busi: PrepareResult, a: str, b: str
) -> None:
    """Two copies of one scan that the difference hash puts 11-13 bits apart (a shift of a
    pixel and resampling) and the DCT hash 0-2 bits: one cluster, one group, one split."""
    a, b = f"{BUSI}/benign/{a}", f"{BUSI}/benign/{b}"
    assert [c for c in busi.audit.near_duplicates if a in c["members"] and b in c["members"]]
    rows = {r.path: r for r in busi.manifest.rows}
    assert rows[a].group == rows[b].group
    assert rows[a].split == rows[b].split


def test_busi_subset_gets_the_full_sets_split_for_every_shared_image(
    busi: PrepareResult, tmp_path: Path
) -> None:
    """A copy holding every third BUSI image: each image whose duplicate cluster is the same in
    both copies is in the same split in both manifests. (Copies, not links: links that leave the
    data root are refused.)"""
    root = shared("busi")
    for row in busi.manifest.rows[::3]:
        copy = tmp_path / "subset" / row.path
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / row.path, copy)
    sub = prepare("busi", tmp_path / "subset", tmp_path / "subset.csv", seed=0, workers=2)
    full = {r.path: r for r in busi.manifest.rows}
    same_group = [r for r in sub.manifest.rows if r.group == full[r.path].group]
    assert len(sub.manifest.rows) == 260 and len(same_group) > 200
    assert all(r.split == full[r.path].split for r in same_group)


def test_busi_subset_masks_are_attached_not_samples(busi_subset: PrepareResult) -> None:
    m = busi_subset.manifest
    assert len(m.rows) == 45
    assert not [r.path for r in m.rows if "_mask" in r.path]
    assert all(r.mask for r in m.rows)  # every image of the subset comes with its mask(s)
    masks = [mask for r in m.rows for mask in r.mask.split(";")]
    assert len(masks) == 92 - 45 and all("_mask" in x for x in masks)
    rows = {r.path: r for r in m.rows}
    assert rows[f"{BUSI}/benign/benign (4).png"].mask == (
        f"{BUSI}/benign/benign (4)_mask.png;{BUSI}/benign/benign (4)_mask_1.png"
    )


def test_busi_subset_mask_size_problem(busi_subset: PrepareResult) -> None:
    problems = [p for p in busi_subset.audit.problems if p.kind == "mask-size"]
    assert [p.file for p in problems] == [f"{BUSI}/benign/benign (4).png"]
    assert "benign (4)_mask_1.png" in problems[0].detail


# -- Brain Tumor MRI, COVID-19 Radiography, ISIC 2018 ----------------------------------------
def test_brain_tumor_mri_official_test_and_carved_validation(brain: PrepareResult) -> None:
    m = brain.manifest
    assert len(m.rows) == 180
    assert m.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    assert m.meta.split_source == "official+carved-val"
    test = [r for r in m.rows if r.split == "test"]
    assert len(test) == 60 and all(r.path.startswith("Testing/") for r in test)
    assert Counter(r.label for r in test) == {c: 15 for c in m.classes}
    others = [r for r in m.rows if r.split != "test"]
    assert all(r.path.startswith("Training/") for r in others)
    assert 0 < split_sizes(brain)["val"] < 60


def test_covid_rows_and_present_classes(covid: PrepareResult) -> None:
    m = covid.manifest
    assert len(m.rows) == 150
    assert m.classes == ["COVID", "Normal", "Viral Pneumonia"]
    assert Counter(r.label for r in m.rows) == {c: 50 for c in m.classes}
    assert all(r.path.startswith(f"COVID-19_Radiography_Dataset/{r.label}/") for r in m.rows)
    assert m.meta.split_source == "seeded"


def test_isic_official_test_and_lesion_groups(isic: PrepareResult) -> None:
    m = isic.manifest
    assert len(m.rows) == 245
    assert m.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    test = [r for r in m.rows if r.split == "test"]
    assert len(test) == 70 and all(r.path.startswith("ISIC2018_Task3_Test_Input/") for r in test)
    assert Counter(r.label for r in test) == {c: 10 for c in m.classes}
    meta = shared("isic2018_sample") / "HAM10000_metadata.csv"
    with open(meta, newline="", encoding="utf-8") as handle:
        lesion = {r["image_id"]: r["lesion_id"] for r in csv.DictReader(handle)}
    train = [r for r in m.rows if r.split != "test"]
    assert len(train) == 175
    assert all(r.group == lesion[Path(r.path).stem] for r in train)
    by_lesion: dict[str, set[str]] = {}
    for r in train:
        by_lesion.setdefault(r.group, set()).add(r.split)
    assert all(len(s) == 1 for s in by_lesion.values())


# -- MedMNIST --------------------------------------------------------------------------------
def test_breastmnist_official_splits(breastmnist: PrepareResult) -> None:
    m = breastmnist.manifest
    assert split_sizes(breastmnist) == {"train": 546, "val": 78, "test": 156}
    assert m.classes == ["malignant", "normal, benign"]
    assert m.meta.split_source == "official"
    assert m.meta.adapter_options == {"file": "breastmnist.npz"}
    assert {r.path for r in m.rows} == {"breastmnist.npz"}
    assert m.rows[0].locator == "train_images/0" and (m.rows[0].width, m.rows[0].height) == (28, 28)


def test_pneumoniamnist_reduced_train(pneumonia_reduced: PrepareResult) -> None:
    assert split_sizes(pneumonia_reduced) == {"train": 3882, "val": 524, "test": 624}
    assert pneumonia_reduced.manifest.classes == ["normal", "pneumonia"]


def test_pneumoniamnist_balanced_subset(pneumonia_balanced: PrepareResult) -> None:
    m = pneumonia_balanced.manifest
    assert m.classes == ["normal", "pneumonia"]
    counts = m.counts()
    assert counts == {
        "train": {"normal": 1214, "pneumonia": 1214},
        "val": {"normal": 135, "pneumonia": 135},
        "test": {"normal": 234, "pneumonia": 234},
    }
