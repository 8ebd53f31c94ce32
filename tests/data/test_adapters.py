"""Dataset adapters on fixtures that rebuild each public dataset's folder layout and file names.

Every fixture writes tiny images (40x32) under ``tmp_path`` with the names the published
archives use, so the adapters are checked on what users download: which files are samples,
their relative POSIX paths, labels, class order, official splits, groups and masks. The last
part runs :func:`medtl.data.prepare.prepare` on such fixtures: groups (lesions, duplicates)
must survive splitting, splits must be reproducible, and no manifest may hold an absolute path.
"""

from __future__ import annotations

import csv
import json
import shutil
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from medtl.data.adapters import (
    ADAPTERS,
    BRAIN_CLASSES,
    COVID_CLASSES,
    ISIC_CLASSES,
    KVASIR_CLASSES,
    AdapterResult,
)
from medtl.data.manifest import Manifest, row_id
from medtl.data.prepare import prepare
from medtl.errors import ConfigError, DataError
from tests.conftest import write_png

BUSI = "Dataset_BUSI_with_GT"
COVID = "COVID-19_Radiography_Dataset"
ISIC_HEADER = ["image", *ISIC_CLASSES]
HAM_HEADER = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


# -- helpers ---------------------------------------------------------------------------------
def image(path: Path, mode: str = "L") -> Path:
    """A 40x32 noise image whose content is fixed by its file name (distinct names differ)."""
    return write_png(path, (40, 32), seed=zlib.crc32(path.name.encode()), mode=mode)


def run(name: str, root: Path, **options: object) -> AdapterResult:
    return ADAPTERS.get(name)(root, **options)


def paths(result: AdapterResult) -> list[str]:
    return [s.path for s in result.samples]


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# -- BUSI ------------------------------------------------------------------------------------
def make_busi(
    root: Path, names: dict[str, Sequence[str]], masks: dict[str, int] | None = None
) -> Path:
    """``root/Dataset_BUSI_with_GT/<class>/<name>.png``; ``masks[name]`` lesion masks each
    (``<name>_mask.png``, ``<name>_mask_1.png``, ...), one mask when not listed."""
    masks = masks or {}
    for label, stems in names.items():
        for stem in stems:
            image(root / BUSI / label / f"{stem}.png")
            for k in range(masks.get(stem, 1)):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                image(root / BUSI / label / f"{stem}{suffix}.png")
    return root


@pytest.fixture
def busi_root(tmp_path: Path) -> Path:
    """BUSI as downloaded: three class folders, masks beside the images, numbered names."""
    root = make_busi(
        tmp_path / "busi",
        {
            "benign": ["benign (1)", "benign (2)", "benign (4)", "benign (10)"],
            "malignant": ["malignant (1)", "malignant (3)"],
            "normal": ["normal (1)"],
        },
        masks={"benign (4)": 2, "benign (10)": 0},
    )
    (root / BUSI / "benign" / ".DS_Store").write_bytes(b"\0")  # macOS litter is not a sample
    return root


def test_busi_samples_masks_and_natural_order(busi_root: Path) -> None:
    result = run("busi", busi_root)
    base = f"{BUSI}/benign"
    assert result.classes == ["benign", "malignant", "normal"]
    assert paths(result) == [
        f"{base}/benign (1).png",
        f"{base}/benign (2).png",
        f"{base}/benign (4).png",
        f"{base}/benign (10).png",  # natural sort: (10) after (4), not after (1)
        f"{BUSI}/malignant/malignant (1).png",
        f"{BUSI}/malignant/malignant (3).png",
        f"{BUSI}/normal/normal (1).png",
    ]
    assert [s.label for s in result.samples] == ["benign"] * 4 + ["malignant"] * 2 + ["normal"]
    assert [s.mask for s in result.samples[:4]] == [
        f"{base}/benign (1)_mask.png",  # not benign (10)'s: stems must match exactly
        f"{base}/benign (2)_mask.png",
        f"{base}/benign (4)_mask.png;{base}/benign (4)_mask_1.png",
        None,
    ]
    assert all("_mask" not in p for p in paths(result))
    assert all(s.split is None and s.group is None and s.locator == "" for s in result.samples)


def test_busi_masks_in_natural_order(tmp_path: Path) -> None:
    root = make_busi(tmp_path, {"malignant": ["malignant (7)"]}, masks={"malignant (7)": 11})
    (mask,) = [s.mask for s in run("busi", root).samples]
    assert mask is not None
    assert [Path(m).name for m in mask.split(";")] == ["malignant (7)_mask.png"] + [
        f"malignant (7)_mask_{k}.png" for k in range(1, 11)
    ]


def test_busi_root_may_be_the_dataset_folder_or_a_parent(busi_root: Path) -> None:
    inside = run("busi", busi_root / BUSI)
    holder = run("busi", busi_root)
    parent = run("busi", busi_root.parent)
    assert paths(inside)[0] == "benign/benign (1).png"
    assert paths(holder) == [f"{BUSI}/{p}" for p in paths(inside)]
    assert paths(parent) == [f"busi/{p}" for p in paths(holder)]
    assert parent.samples[2].mask == (
        f"busi/{BUSI}/benign/benign (4)_mask.png;busi/{BUSI}/benign/benign (4)_mask_1.png"
    )


def test_busi_wrong_folder_is_a_clear_error(tmp_path: Path) -> None:
    image(tmp_path / "benign" / "benign (1).png")
    with pytest.raises(DataError, match="Dataset_BUSI_with_GT"):
        run("busi", tmp_path)


# -- ISIC 2018 Task 3 ------------------------------------------------------------------------
def onehot(label: str) -> list[object]:
    return ["1.0" if c == label else "0.0" for c in ISIC_CLASSES]


def make_isic(
    root: Path,
    parts: dict[str, Sequence[tuple[str, str]]],
    lesions: dict[str, str] | None = None,
) -> Path:
    """``ISIC2018_Task3_<Part>_Input/<id>.jpg`` and ``..._GroundTruth/..._GroundTruth.csv``
    for each part (Training, Validation, Test) and ``HAM10000_metadata.csv`` from ``lesions``."""
    for part, rows in parts.items():
        inputs = root / f"ISIC2018_Task3_{part}_Input"
        for image_id, _ in rows:
            image(inputs / f"{image_id}.jpg", mode="RGB")
        (inputs / "LICENSE.txt").write_text("CC BY-NC 4.0\n")  # as in the archive
        truth = root / f"ISIC2018_Task3_{part}_GroundTruth"
        write_csv(
            truth / f"ISIC2018_Task3_{part}_GroundTruth.csv",
            ISIC_HEADER,
            [[i, *onehot(label)] for i, label in rows],
        )
    if lesions is not None:
        label_of = {i: label for rows in parts.values() for i, label in rows}
        write_csv(
            root / "HAM10000_metadata.csv",
            HAM_HEADER,
            [
                [lesion, i, label_of[i].lower(), "histo", 50, "female", "back"]
                for i, lesion in lesions.items()
            ],
        )
    return root


def isic_id(n: int) -> str:
    return f"ISIC_{24306 + n:07d}"


@pytest.fixture
def isic_root(tmp_path: Path) -> Path:
    train = [(isic_id(0), "MEL"), (isic_id(1), "NV"), (isic_id(2), "NV"), (isic_id(3), "VASC")]
    val = [(isic_id(100), "BCC")]
    test = [(isic_id(200), "AKIEC"), (isic_id(201), "DF")]
    lesions = {
        isic_id(0): "HAM_0000118",
        isic_id(1): "HAM_0002730",
        isic_id(2): "HAM_0002730",
        isic_id(3): "HAM_0001466",
        isic_id(100): "HAM_0007418",
    }
    return make_isic(
        tmp_path / "isic", {"Training": train, "Validation": val, "Test": test}, lesions
    )


def test_isic_samples_splits_and_lesion_groups(isic_root: Path) -> None:
    result = run("isic2018", isic_root)
    assert result.classes == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert [(s.path, s.label, s.split, s.group) for s in result.samples] == [
        ("ISIC2018_Task3_Training_Input/ISIC_0024306.jpg", "MEL", "train", "HAM_0000118"),
        ("ISIC2018_Task3_Training_Input/ISIC_0024307.jpg", "NV", "train", "HAM_0002730"),
        ("ISIC2018_Task3_Training_Input/ISIC_0024308.jpg", "NV", "train", "HAM_0002730"),
        ("ISIC2018_Task3_Training_Input/ISIC_0024309.jpg", "VASC", "train", "HAM_0001466"),
        ("ISIC2018_Task3_Validation_Input/ISIC_0024406.jpg", "BCC", "val", "HAM_0007418"),
        ("ISIC2018_Task3_Test_Input/ISIC_0024506.jpg", "AKIEC", "test", None),  # not in HAM
        ("ISIC2018_Task3_Test_Input/ISIC_0024507.jpg", "DF", "test", None),
    ]
    assert all(s.mask is None for s in result.samples)


def test_isic_without_validation_part_or_metadata(tmp_path: Path) -> None:
    root = make_isic(tmp_path, {"Training": [(isic_id(0), "BKL")], "Test": [(isic_id(9), "MEL")]})
    result = run("isic2018", root)
    assert [(s.split, s.group) for s in result.samples] == [("train", None), ("test", None)]


def test_isic_ground_truth_row_without_image(isic_root: Path) -> None:
    (isic_root / "ISIC2018_Task3_Training_Input" / "ISIC_0024308.jpg").unlink()
    with pytest.raises(
        DataError, match=r"lists ISIC_0024308 but .*ISIC_0024308\.jpg does not exist"
    ):
        run("isic2018", isic_root)


@pytest.mark.parametrize("values", [["1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"], ["0.0"] * 7])
def test_isic_row_that_is_not_onehot(isic_root: Path, values: list[str]) -> None:
    truth = isic_root / "ISIC2018_Task3_Test_GroundTruth" / "ISIC2018_Task3_Test_GroundTruth.csv"
    with open(truth, "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow([isic_id(201), *values])
    with pytest.raises(DataError, match=r"line 4: ISIC_0024507 is not one-hot"):
        run("isic2018", isic_root)


@pytest.mark.parametrize("row", ["ISIC_0024506,1.0,0.0,0.0,0.0,0.0,0.0,x", "ISIC_0024506,1.0,0.0"])
def test_isic_unreadable_cell_is_a_data_error(tmp_path: Path, row: str) -> None:
    root = make_isic(tmp_path, {"Training": [(isic_id(0), "MEL")]})
    truth = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth.write_text(",".join(ISIC_HEADER) + "\n" + row + "\n", encoding="utf-8")
    with pytest.raises(
        DataError, match=r"GroundTruth\.csv line 2: the class columns must hold numbers"
    ):
        run("isic2018", root)


def test_isic_incomplete_or_absent(tmp_path: Path, isic_root: Path) -> None:
    shutil.rmtree(isic_root / "ISIC2018_Task3_Test_Input")
    with pytest.raises(DataError, match="Test part is incomplete: ISIC2018_Task3_Test_Input/"):
        run("isic2018", isic_root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="does not look like ISIC 2018"):
        run("isic2018", tmp_path / "empty")


def test_isic_ground_truth_without_columns(tmp_path: Path) -> None:
    root = make_isic(tmp_path, {"Training": [(isic_id(0), "MEL")]})
    truth = root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv"
    truth.write_text("image,MEL,NV\nISIC_0024306,1.0,0.0\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks column"):
        run("isic2018", root)


# -- Kvasir ----------------------------------------------------------------------------------
def kvasir_names(label: str, n: int) -> list[str]:
    """Kvasir v2 file names are UUIDs (``0a7bdce4-ac0d-44ef-93ee-92dfc8fe0b81.jpg``)."""
    return sorted(f"{uuid.uuid5(uuid.NAMESPACE_URL, f'{label}/{i}')}.jpg" for i in range(n))


def make_kvasir(base: Path, n: int = 2) -> list[str]:
    """``base/<class>/<uuid>.jpg`` for the 8 classes; returns the paths relative to ``base``."""
    out = []
    for label in KVASIR_CLASSES:
        for name in kvasir_names(label, n):
            image(base / label / name, mode="RGB")
            out.append(f"{label}/{name}")
    return out


@pytest.mark.parametrize("folder", ["kvasir-dataset-v2", "kvasir-dataset"])
def test_kvasir_v2_and_v1(tmp_path: Path, folder: str) -> None:
    expected = make_kvasir(tmp_path / folder)
    result = run("kvasir", tmp_path)
    assert result.classes == KVASIR_CLASSES
    assert len(KVASIR_CLASSES) == 8
    assert paths(result) == [f"{folder}/{p}" for p in expected]
    assert [s.label for s in result.samples] == [c for c in KVASIR_CLASSES for _ in range(2)]
    assert all(s.split is None and s.group is None and s.mask is None for s in result.samples)


def test_kvasir_root_may_be_the_dataset_folder_or_a_parent(tmp_path: Path) -> None:
    expected = make_kvasir(tmp_path / "downloads" / "kvasir-dataset-v2", n=1)
    assert paths(run("kvasir", tmp_path / "downloads" / "kvasir-dataset-v2")) == expected
    assert paths(run("kvasir", tmp_path / "downloads")) == [
        f"kvasir-dataset-v2/{p}" for p in expected
    ]


def test_kvasir_other_folder_is_a_clear_error(tmp_path: Path) -> None:
    image(tmp_path / "polyp" / "a.jpg")
    with pytest.raises(DataError, match="does not look like Kvasir"):
        run("kvasir", tmp_path)


# -- COVID-19 Radiography --------------------------------------------------------------------
def test_covid_old_layout(tmp_path: Path) -> None:
    base = tmp_path / COVID
    for label in ["Viral Pneumonia", "COVID", "Normal"]:  # created out of order on purpose
        for n in (1, 2, 10):
            image(base / label / f"{label}-{n}.png")
    (base / "COVID.metadata.xlsx").write_bytes(b"PK")  # files beside the class folders
    (base / "README.md.txt").write_text("readme")
    result = run("covid19_radiography", tmp_path)
    assert result.classes == ["COVID", "Normal", "Viral Pneumonia"]  # only those present
    assert paths(result) == [
        f"{COVID}/{label}/{label}-{n}.png"
        for label in result.classes
        for n in (1, 10, 2)  # sorted by name
    ]
    assert [s.label for s in result.samples] == [c for c in result.classes for _ in range(3)]
    assert all(s.mask is None and s.split is None for s in result.samples)


def test_covid_new_layout_attaches_masks(tmp_path: Path) -> None:
    base = tmp_path / COVID
    for label in COVID_CLASSES:
        for n in (1, 2):
            image(base / label / "images" / f"{label}-{n}.png")
            if not (label == "Normal" and n == 2):  # one image without its mask
                image(base / label / "masks" / f"{label}-{n}.png")
    result = run("covid19_radiography", base)  # the dataset folder itself as root
    assert result.classes == ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    assert [(s.path, s.label, s.mask) for s in result.samples] == [
        (
            f"{label}/images/{label}-{n}.png",
            label,
            None if (label == "Normal" and n == 2) else f"{label}/masks/{label}-{n}.png",
        )
        for label in COVID_CLASSES
        for n in (1, 2)
    ]


def test_covid_class_order_is_fixed(tmp_path: Path) -> None:
    image(tmp_path / COVID / "Viral Pneumonia" / "Viral Pneumonia-1.png")
    image(tmp_path / COVID / "Lung_Opacity" / "Lung_Opacity-1.png")
    result = run("covid19_radiography", tmp_path)
    assert result.classes == ["Lung_Opacity", "Viral Pneumonia"]
    assert [s.label for s in result.samples] == ["Lung_Opacity", "Viral Pneumonia"]


def test_covid_without_class_folders(tmp_path: Path) -> None:
    image(tmp_path / COVID / "Pneumonia" / "x.png")
    with pytest.raises(DataError, match="none of the class folders"):
        run("covid19_radiography", tmp_path)


# -- Brain Tumor MRI -------------------------------------------------------------------------
BRAIN_PREFIX = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}


def make_brain(root: Path, train: Sequence[int] = (10, 11), test: Sequence[int] = (1,)) -> Path:
    for label, short in BRAIN_PREFIX.items():
        for n in train:
            image(root / "Training" / label / f"Tr-{short}_{n:04d}.jpg", mode="RGB")
        for n in test:
            image(root / "Testing" / label / f"Te-{short}_{n:04d}.jpg")
    return root


def test_brain_tumor_mri_official_train_and_test(tmp_path: Path) -> None:
    root = make_brain(tmp_path / "brain")
    for result, prefix in [
        (run("brain_tumor_mri", root), ""),
        (run("brain_tumor_mri", tmp_path), "brain/"),
    ]:
        assert result.classes == BRAIN_CLASSES == ["glioma", "meningioma", "notumor", "pituitary"]
        expected = [
            (f"{prefix}Training/{label}/Tr-{s}_{n:04d}.jpg", label, "train")
            for label, s in BRAIN_PREFIX.items()
            for n in (10, 11)
        ] + [
            (f"{prefix}Testing/{label}/Te-{s}_0001.jpg", label, "test")
            for label, s in BRAIN_PREFIX.items()
        ]
        assert [(s.path, s.label, s.split) for s in result.samples] == expected


def test_brain_tumor_mri_without_training_folder(tmp_path: Path) -> None:
    image(tmp_path / "Testing" / "glioma" / "Te-gl_0001.jpg")
    with pytest.raises(DataError, match="'Training'"):
        run("brain_tumor_mri", tmp_path)


# -- MedMNIST --------------------------------------------------------------------------------
def write_npz(path: Path, labels: dict[str, np.ndarray]) -> Path:
    """A MedMNIST ``.npz``: ``<split>_images`` [N, 28, 28] uint8 and ``<split>_labels``."""
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    arrays = {}
    for split, y in labels.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (len(y), 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = y
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


BREAST = {"train": [0, 1, 1, 0, 1], "val": [1, 0], "test": [0, 1, 1]}


@pytest.mark.parametrize("shape", ["(N,1)", "(N,)"])
def test_medmnist_labels_either_shape_and_official_splits(tmp_path: Path, shape: str) -> None:
    labels = {s: np.array(y, dtype=np.uint8) for s, y in BREAST.items()}
    if shape == "(N,1)":
        labels = {s: y[:, None] for s, y in labels.items()}
    write_npz(tmp_path / "breastmnist.npz", labels)
    result = run("medmnist", tmp_path)
    assert result.classes == ["malignant", "normal, benign"]  # 0 = malignant, 1 = normal, benign
    expected = [
        ("breastmnist.npz", f"{split}_images/{i}", split, ["malignant", "normal, benign"][y])
        for split, ys in BREAST.items()
        for i, y in enumerate(ys)
    ]
    assert [(s.path, s.locator, s.split, s.label) for s in result.samples] == expected


def test_medmnist_unknown_file_gets_numbered_classes(tmp_path: Path) -> None:
    write_npz(tmp_path / "mine.npz", {"train": np.array([[0], [2]]), "test": np.array([[1]])})
    result = run("medmnist", tmp_path)
    assert result.classes == ["0", "1", "2"]
    assert [s.label for s in result.samples] == ["0", "2", "1"]


def test_medmnist_multilabel_is_refused(tmp_path: Path) -> None:
    write_npz(tmp_path / "chestmnist.npz", {"train": np.zeros((4, 14), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"shape \(4, 14\); multi-label"):
        run("medmnist", tmp_path)


def test_medmnist_two_files_need_the_file_option(tmp_path: Path) -> None:
    write_npz(tmp_path / "breastmnist.npz", {"train": np.array([0, 1])})
    write_npz(tmp_path / "pneumoniamnist.npz", {"train": np.array([[1], [0], [1]])})
    with pytest.raises(DataError, match=r"holds 2 \.npz files; name one with -O file="):
        run("medmnist", tmp_path)
    chosen = run("medmnist", tmp_path, file="pneumoniamnist.npz")
    assert chosen.classes == ["normal", "pneumonia"]
    assert [(s.path, s.label) for s in chosen.samples] == [
        ("pneumoniamnist.npz", "pneumonia"),
        ("pneumoniamnist.npz", "normal"),
        ("pneumoniamnist.npz", "pneumonia"),
    ]
    with pytest.raises(DataError, match="escapes the data root"):
        run("medmnist", tmp_path, file="../breastmnist.npz")
    with pytest.raises(DataError, match="does not exist"):
        run("medmnist", tmp_path, file="dermamnist.npz")


def test_medmnist_images_and_labels_disagree(tmp_path: Path) -> None:
    npz = tmp_path / "breastmnist.npz"
    np.savez(npz, train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([0, 1]))
    with pytest.raises(DataError, match="train_images has 3 images but train_labels 2 labels"):
        run("medmnist", tmp_path)


def test_medmnist_negative_label_is_refused(tmp_path: Path) -> None:
    write_npz(tmp_path / "breastmnist.npz", {"train": np.array([0, 1, -1])})
    with pytest.raises(DataError, match="train_labels holds negative labels"):
        run("medmnist", tmp_path)


# -- folder ----------------------------------------------------------------------------------
def test_folder_without_split_folders(tmp_path: Path) -> None:
    for rel in ["normal/b.png", "normal/a.png", "abnormal/x.jpg", ".hidden/y.png"]:
        image(tmp_path / rel)
    (tmp_path / "normal" / "notes.txt").write_text("not an image")
    result = run("folder", tmp_path)
    assert result.classes == ["abnormal", "normal"]
    assert [(s.path, s.label, s.split) for s in result.samples] == [
        ("abnormal/x.jpg", "abnormal", None),
        ("normal/a.png", "normal", None),
        ("normal/b.png", "normal", None),
    ]


def test_folder_with_split_folders(tmp_path: Path) -> None:
    for rel in [
        "train/cat/1.png",
        "train/dog/2.png",
        "Validation/cat/3.png",
        "test/dog/4.png",
        "test/bird/5.png",
    ]:
        image(tmp_path / rel)
    result = run("folder", tmp_path)
    assert result.classes == ["bird", "cat", "dog"]
    assert sorted((s.path, s.label, s.split) for s in result.samples) == [
        ("Validation/cat/3.png", "cat", "val"),
        ("test/bird/5.png", "bird", "test"),
        ("test/dog/4.png", "dog", "test"),
        ("train/cat/1.png", "cat", "train"),
        ("train/dog/2.png", "dog", "train"),
    ]


def test_folder_without_class_folders(tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        run("folder", tmp_path)


def test_images_finds_every_image_unlabelled(tmp_path: Path) -> None:
    image(tmp_path / "b.png")
    image(tmp_path / "scans" / "day1" / "a.jpg")
    image(tmp_path / ".cache" / "c.png")
    image(tmp_path / "scans" / ".d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    result = run("images", tmp_path)
    assert paths(result) == ["b.png", "scans/day1/a.jpg"]
    assert result.classes == [] and all(s.label is None for s in result.samples)


def test_images_in_an_empty_folder_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"holds no image files .*'medtl prepare images'"):
        run("images", tmp_path)


# -- csv -------------------------------------------------------------------------------------
def test_csv_path_label_split_group(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "labels.csv",
        ["path", "label", "split", "group"],
        [
            ["img/p1_a.png", "tumour", "train", "patient-1"],
            ["img/p1_b.png", "healthy", "Train", "patient-1"],
            ["img\\p2.png", "healthy", "testing", ""],
            ["img/p3.png", "", "valid", "patient-3"],
        ],
    )
    result = run("csv", tmp_path)
    assert result.classes == ["healthy", "tumour"]  # sorted when classes= is not given
    assert [(s.path, s.label, s.split, s.group) for s in result.samples] == [
        ("img/p1_a.png", "tumour", "train", "patient-1"),
        ("img/p1_b.png", "healthy", "train", "patient-1"),
        ("img/p2.png", "healthy", "test", None),
        ("img/p3.png", None, "val", "patient-3"),  # an empty label is an unlabelled image
    ]
    ordered = run("csv", tmp_path, classes="tumour, healthy, other")
    assert ordered.classes == ["tumour", "healthy", "other"]


def test_csv_other_file_name_and_no_split(tmp_path: Path) -> None:
    write_csv(tmp_path / "meta" / "table.csv", ["label", "path"], [["b", "x.png"], ["a", "y.png"]])
    result = run("csv", tmp_path, file="meta/table.csv")
    assert [(s.path, s.label, s.split, s.group) for s in result.samples] == [
        ("x.png", "b", None, None),
        ("y.png", "a", None, None),
    ]


def test_csv_label_outside_classes(tmp_path: Path) -> None:
    write_csv(
        tmp_path / "labels.csv", ["path", "label"], [["a.png", "benign"], ["b.png", "malignent"]]
    )
    with pytest.raises(
        DataError, match=r"label\(s\) \['malignent'\] not in classes=\['benign', 'malignant'\]"
    ):
        run("csv", tmp_path, classes="benign,malignant")


@pytest.mark.parametrize("bad", ["../outside.png", "img/../../outside.png", "/etc/passwd"])
def test_csv_path_outside_the_root(tmp_path: Path, bad: str) -> None:
    write_csv(tmp_path / "labels.csv", ["path", "label"], [["a.png", "x"], [bad, "x"]])
    with pytest.raises(DataError, match=r"labels\.csv line 3: path"):
        run("csv", tmp_path)


def test_csv_bad_split_columns_and_file(tmp_path: Path) -> None:
    write_csv(tmp_path / "labels.csv", ["path", "label", "split"], [["a.png", "x", "holdout"]])
    with pytest.raises(DataError, match="line 2: split 'holdout' is not train, val or test"):
        run("csv", tmp_path)
    write_csv(tmp_path / "labels.csv", ["file", "class"], [["a.png", "x"]])
    with pytest.raises(DataError, match="needs the columns path,label"):
        run("csv", tmp_path)
    with pytest.raises(DataError, match=r"label table .*missing\.csv does not exist"):
        run("csv", tmp_path, file="missing.csv")


def test_csv_row_without_label_field_is_unlabelled(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("path,label\na.png,x\nb.png\n", encoding="utf-8")
    result = run("csv", tmp_path)
    assert [(s.path, s.label) for s in result.samples] == [("a.png", "x"), ("b.png", None)]


# -- registry and roots ----------------------------------------------------------------------
def test_registry_names_and_did_you_mean() -> None:
    expected = {
        "busi",
        "isic2018",
        "kvasir",
        "covid19_radiography",
        "brain_tumor_mri",
        "medmnist",
        "folder",
        "csv",
    }
    assert expected <= set(ADAPTERS.names())
    with pytest.raises(ConfigError, match=r"unknown dataset adapter 'bsui'; did you mean 'busi'\?"):
        ADAPTERS.get("bsui")
    with pytest.raises(ConfigError, match="did you mean 'isic2018'"):
        ADAPTERS.get("isic")


@pytest.mark.parametrize(
    "name",
    [
        "busi",
        "isic2018",
        "kvasir",
        "covid19_radiography",
        "brain_tumor_mri",
        "medmnist",
        "folder",
        "csv",
    ],
)
def test_missing_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match=r"data root .*nowhere does not exist"):
        run(name, tmp_path / "nowhere")


def test_prepare_missing_root_and_unknown_option(tmp_path: Path, busi_root: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        prepare("busi", tmp_path / "nowhere", tmp_path / "m.csv")
    with pytest.raises(
        ConfigError, match=r"adapter 'csv' has no option\(s\) clases \(allowed: file, classes\)"
    ):
        prepare("csv", busi_root, tmp_path / "m.csv", options={"clases": "a,b"})
    with pytest.raises(ConfigError, match=r"no option\(s\) file \(allowed: none\)"):
        prepare("busi", busi_root, tmp_path / "m.csv", options={"file": "x"})
    with pytest.raises(ConfigError, match="did you mean 'busi'"):
        prepare("bsui", busi_root, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


# -- prepare on fixtures ---------------------------------------------------------------------
def group_splits(manifest: Manifest) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in manifest.rows:
        out.setdefault(r.group, set()).add(r.split)
    return out


@pytest.fixture
def busi_many(tmp_path: Path) -> Path:
    """BUSI with 12 benign, 8 malignant and 6 normal images, masks beside them."""
    counts = {"benign": 12, "malignant": 8, "normal": 6}
    return make_busi(
        tmp_path / "data", {c: [f"{c} ({i})" for i in range(1, n + 1)] for c, n in counts.items()}
    )


def test_prepare_isic_keeps_a_lesion_in_one_split(tmp_path: Path) -> None:
    train, lesions = [], {}
    for c, label in enumerate(ISIC_CLASSES):  # 4 images a class: lesions of 2, 1 and 1 images
        for k in range(4):
            image_id = isic_id(10 * c + k)
            train.append((image_id, label))
            lesions[image_id] = f"HAM_{c:05d}{max(k, 1)}"
    test = [(isic_id(500 + c), label) for c, label in enumerate(ISIC_CLASSES)]
    root = make_isic(tmp_path / "isic", {"Training": train, "Test": test}, lesions)
    pair_in_val = 0
    for seed in range(4):
        result = prepare("isic2018", root, tmp_path / f"m{seed}.csv", seed=seed, workers=2)
        m = result.manifest
        assert m.meta.split_source == "official+carved-val"
        by_id = {Path(r.path).stem: r for r in m.rows}
        for c in range(len(ISIC_CLASSES)):
            a, b = by_id[isic_id(10 * c)], by_id[isic_id(10 * c + 1)]
            assert a.group == b.group == f"HAM_{c:05d}1"
            assert a.split == b.split != "test"
            pair_in_val += a.split == "val"
        assert [Path(r.path).stem for r in m.rows if r.split == "test"] == [i for i, _ in test]
        assert all(len(s) == 1 for s in group_splits(m).values())
    assert pair_in_val > 0  # the carved validation set did take lesions of two images


def test_prepare_busi_duplicate_across_classes(tmp_path: Path, busi_many: Path) -> None:
    base = busi_many / BUSI
    shutil.copyfile(base / "benign" / "benign (3).png", base / "malignant" / "malignant (9).png")
    result = prepare("busi", busi_many, tmp_path / "m.csv", seed=0, workers=2)
    a, b = f"{BUSI}/benign/benign (3).png", f"{BUSI}/malignant/malignant (9).png"
    assert result.audit.exact_duplicates == [[a, b]]
    assert [c["members"] for c in result.audit.label_conflicts] == [[a, b]]
    assert result.audit.label_conflicts[0]["labels"] == ["benign", "malignant"]
    assert [p.kind for p in result.audit.problems] == ["label-conflict"]
    rows = {r.path: r for r in result.manifest.rows}
    assert len(rows) == 27
    assert rows[a].group == rows[b].group
    assert rows[a].split == rows[b].split
    assert rows[a].mask == f"{BUSI}/benign/benign (3)_mask.png"
    assert rows[b].mask == ""  # the planted copy has no mask
    others = [r.group for p, r in rows.items() if p not in (a, b)]
    assert len(set(others)) == len(others) == 25 and rows[a].group not in others


def test_prepare_split_is_deterministic_for_a_seed(tmp_path: Path, busi_many: Path) -> None:
    texts = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        out = prepare(
            "busi", busi_many, tmp_path / f"{name}.csv", seed=seed, workers=2
        ).manifest_path
        texts[name] = out.read_text(encoding="utf-8")
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]
    loaded = Manifest.load(tmp_path / "c.csv")
    assert loaded.meta.split_seed == 1 and loaded.meta.split_source == "seeded"
    assert {r.split for r in loaded.rows} == {"train", "val", "test"}


def test_prepare_seeded_groups_lie_in_one_split(tmp_path: Path) -> None:
    rows = []
    for patient in range(12):  # 3 images a patient, 4 patients a class
        label = ["normal", "pneumonia", "covid"][patient % 3]
        for k in range(3):
            rel = f"scans/p{patient:02d}_{k}.png"
            image(tmp_path / "data" / rel)
            rows.append([rel, label, f"patient-{patient:02d}"])
    write_csv(tmp_path / "data" / "labels.csv", ["path", "label", "group"], rows)
    for seed in range(3):
        m = prepare(
            "csv", tmp_path / "data", tmp_path / f"m{seed}.csv", seed=seed, workers=2
        ).manifest
        splits = group_splits(m)
        assert sorted(splits) == [f"patient-{p:02d}" for p in range(12)]
        assert all(len(s) == 1 for s in splits.values())
        assert {s for ss in splits.values() for s in ss} == {"train", "val", "test"}


@pytest.mark.parametrize("dataset", ["busi", "medmnist", "csv"])
def test_manifest_holds_no_absolute_path(tmp_path: Path, dataset: str) -> None:
    data = tmp_path / "data"
    if dataset == "busi":
        root: Path = make_busi(
            data, {c: [f"{c} ({i})" for i in (1, 2, 3)] for c in ["benign", "malignant"]}
        )
        expect = {"adapter_options": {}}
    elif dataset == "medmnist":
        root = write_npz(data / "breastmnist.npz", {s: np.array(y) for s, y in BREAST.items()})
        expect = {"adapter_options": {"file": "breastmnist.npz"}}  # a file root: its name only
    else:
        names = [f"img/{i}.png" for i in range(6)]
        for n in names:
            image(data / n)
        write_csv(
            data / "labels.csv", ["path", "label"], [[n, "ab"[i % 2]] for i, n in enumerate(names)]
        )
        root, expect = data, {"adapter_options": {}}
    result = prepare(dataset, root, tmp_path / "out" / "m.csv", workers=2)
    csv_text = result.manifest_path.read_text(encoding="utf-8")
    side_text = (tmp_path / "out" / "m.json").read_text(encoding="utf-8")
    for text in (csv_text, side_text):
        assert str(data) not in text and str(tmp_path) not in text
        assert data.as_posix() not in text
    side = json.loads(side_text)
    assert side["adapter_options"] == expect["adapter_options"]
    for row in csv.DictReader(csv_text.splitlines()):
        assert not row["path"].startswith("/") and ".." not in row["path"].split("/")
        assert (data / row["path"]).is_file()
        assert row["id"] == row_id(row["path"], row["locator"])


def test_medmnist_split_without_labels_is_counted_and_listed(tmp_path: Path) -> None:
    from medtl.data.prepare import prepare

    labels = {s: np.array(y, dtype=np.uint8) for s, y in BREAST.items()}
    path = write_npz(tmp_path / "breastmnist.npz", labels)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if k != "test_labels"}
    np.savez_compressed(path, **arrays)  # the test split's labels are lost
    result = run("medmnist", tmp_path)
    assert {s.split for s in result.samples} == {"train", "val"}
    assert [(e.what, e.count) for e in result.left_out] == [("test_images of breastmnist.npz", 3)]
    assert "no test_labels" in result.left_out[0].reason
    prepared = prepare("medmnist", tmp_path, tmp_path / "out" / "m.csv", seed=0)
    assert prepared.audit.left_out == [
        {"what": "test_images of breastmnist.npz", "count": 3, "reason": result.left_out[0].reason}
    ]
    assert [p.kind for p in prepared.audit.problems] == ["left-out"]
    assert "left out: 3 from test_images of breastmnist.npz" in prepared.audit.summary()


def test_isic_images_without_a_ground_truth_row_are_counted_and_listed(isic_root: Path) -> None:
    image(isic_root / "ISIC2018_Task3_Training_Input" / "ISIC_0099999.jpg", mode="RGB")
    result = run("isic2018", isic_root)
    assert len(result.samples) == 7  # the unlisted image is not a sample
    assert [(e.what, e.count) for e in result.left_out] == [("ISIC2018_Task3_Training_Input", 1)]
    assert "ISIC_0099999.jpg" in result.left_out[0].reason


def test_folder_images_outside_the_layout_are_counted_and_listed(tmp_path: Path) -> None:
    for name in ("train/a/1.png", "train/b/2.png", "test/a/3.png", "test/b/4.png"):
        image(tmp_path / name)
    image(tmp_path / "extra" / "a" / "5.png")  # beside the split folders: not read
    image(tmp_path / "train" / "a" / "deeper" / "6.png")  # below a class folder: not read
    image(tmp_path / "7.png")
    image(tmp_path / ".hidden" / "8.png")  # hidden: skipped on purpose, not listed
    result = run("folder", tmp_path)
    assert len(result.samples) == 4
    assert [(e.what, e.count) for e in result.left_out] == [("image files under the data root", 3)]
    assert "<root>/<split>/<class>/), e.g. 7.png" in result.left_out[0].reason


def test_ham_metadata_gives_lesions_and_coarse_subgroups_or_one_clear_error(
    tmp_path: Path,
) -> None:
    from medtl.data.adapters import _ham_lesions, _ham_subgroups

    assert _ham_lesions(tmp_path) == {} and _ham_subgroups(tmp_path) == {}
    meta = tmp_path / "part" / "HAM10000_metadata.csv"
    meta.parent.mkdir()
    meta.write_text(
        "lesion_id,image_id,dx,age,sex,localization\n"
        "HAM_1,ISIC_1,nv,57.0,female,back\n"
        "HAM_1,ISIC_2,nv,,male,\n",
        encoding="utf-8-sig",
    )
    assert _ham_lesions(tmp_path) == {"ISIC_1": "HAM_1", "ISIC_2": "HAM_1"}
    subgroups = _ham_subgroups(tmp_path)
    assert set(subgroups) == {"ISIC_1", "ISIC_2"}
    assert "age=50-59" in subgroups["ISIC_1"] and "localization=back" in subgroups["ISIC_1"]
    assert "age=unknown" in subgroups["ISIC_2"] and "localization=unknown" in subgroups["ISIC_2"]
    meta.write_text("image_id,dx\nISIC_1,nv\n")
    with pytest.raises(DataError, match="lacks the lesion_id / image_id columns"):
        _ham_lesions(tmp_path)
