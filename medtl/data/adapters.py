"""Dataset adapters: each turns one dataset's folder layout into :class:`Sample` s.

An adapter is a function ``(root: Path, **options) -> AdapterResult`` registered by name in
:data:`ADAPTERS`. It only finds files and reads labels, official splits and groups; hashing,
the audit and splitting are shared (:mod:`medtl.data.prepare`). The private-scan adapters
(``dicom``, ``nifti``) live in :mod:`medtl.data.scans`.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtl.data.manifest import Sample, check_relative_path
from medtl.data.readers import IMAGE_SUFFIXES, npz_locator
from medtl.errors import DataError
from medtl.registry import Registry


@dataclass(frozen=True)
class LeftOut:
    """Images an adapter found but did not make samples of: where, how many, and why."""

    what: str  # a file, or a part of one ("train_images of breastmnist.npz")
    count: int
    reason: str


@dataclass
class AdapterResult:
    """What an adapter found: samples and class names in label-index order ([] if unlabelled),
    and what it found but left out (never silently: prepare lists each in the audit)."""

    samples: list[Sample]
    classes: list[str]
    left_out: list[LeftOut] = field(default_factory=list)


Adapter = Callable[..., AdapterResult]
ADAPTERS: Registry[Adapter] = Registry("dataset adapter")


# -- helpers ------------------------------------------------------------------------------
def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def find_dir(root: Path, name: str, dataset: str, where: str) -> Path:
    """``root/name`` or ``root/*/name``: users point at the dataset folder or its parent."""
    for candidate in (root / name, *sorted(root.glob(f"*/{name}"))):
        if candidate.is_dir():
            return candidate
    if root.name == name and root.is_dir():
        return root
    raise DataError(
        f"{root} does not look like {dataset}: no folder {name!r} found; point --data-root at "
        f"the folder that holds {where}"
    )


def require_root(root: Path) -> Path:
    if not root.exists():
        raise DataError(f"data root {root} does not exist; pass the folder that holds the dataset")
    return root


def present_classes(folder: Path, known: Iterable[str]) -> list[str]:
    return [c for c in known if (folder / c).is_dir()]


def natural_key(text: str) -> list[object]:
    """Sort ``benign (2)`` before ``benign (10)``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# -- BUSI ---------------------------------------------------------------------------------
BUSI_CLASSES = ["benign", "malignant", "normal"]
_BUSI_MASK = re.compile(r"^(?P<stem>.+?)_mask(?:_\d+)?$")


@ADAPTERS.register("busi")
def busi(root: Path) -> AdapterResult:
    """BUSI: ``Dataset_BUSI_with_GT/{benign,malignant,normal}/benign (N).png``.

    ``*_mask.png`` / ``*_mask_1.png`` are segmentation masks (one per lesion), never samples:
    all are attached to their image, ``;``-separated. No official split.
    """
    base = find_dir(require_root(root), "Dataset_BUSI_with_GT", "BUSI", "Dataset_BUSI_with_GT/")
    samples = []
    for label in present_classes(base, BUSI_CLASSES):
        files = image_files(base / label)
        masks: dict[str, list[Path]] = {}
        images = []
        for f in files:
            m = _BUSI_MASK.match(f.stem)
            if m:
                masks.setdefault(m["stem"], []).append(f)
            else:
                images.append(f)
        for f in sorted(images, key=lambda p: natural_key(p.name)):
            own = sorted(masks.get(f.stem, []), key=lambda p: natural_key(p.name))
            mask = ";".join(rel(m, root) for m in own) or None
            samples.append(Sample(rel(f, root), label, mask=mask))
    return AdapterResult(samples, BUSI_CLASSES)


# -- ISIC 2018 / HAM10000 -------------------------------------------------------------------
ISIC_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
_ISIC_SPLITS = {"Training": "train", "Validation": "val", "Test": "test"}


@ADAPTERS.register("isic2018")
def isic2018(root: Path) -> AdapterResult:
    """ISIC 2018 Task 3: ``ISIC2018_Task3_<Part>_Input/*.jpg`` + one-hot ground-truth CSVs.

    Training, Validation and Test parts are the official splits, used as found.
    ``HAM10000_metadata.csv`` (when present anywhere under the root) maps each image to its
    ``lesion_id``, so all images of one lesion form one group, and gives its subgroups for the
    report: ``age`` in ten-year bands, ``sex``, ``localization`` and ``dataset`` (the columns
    present; never an identifier).
    """
    require_root(root)
    lesions = _ham_lesions(root)
    subgroups = _ham_subgroups(root)
    samples, left_out = [], []
    for part, split in _ISIC_SPLITS.items():
        inputs = next(iter(sorted(root.rglob(f"ISIC2018_Task3_{part}_Input"))), None)
        truth = next(iter(sorted(root.rglob(f"ISIC2018_Task3_{part}_GroundTruth.csv"))), None)
        if inputs is None and truth is None:
            continue
        if inputs is None or truth is None:
            missing = (
                f"ISIC2018_Task3_{part}_Input/"
                if inputs is None
                else f"ISIC2018_Task3_{part}_GroundTruth.csv"
            )
            raise DataError(f"{root}: ISIC 2018 {part} part is incomplete: {missing} not found")
        listed = _read_onehot(truth)
        for image_id, label in listed:
            f = inputs / f"{image_id}.jpg"
            if not f.is_file():
                raise DataError(
                    f"{truth} lists {image_id} but {f} does not exist; restore the image or "
                    "remove its row"
                )
            samples.append(
                Sample(
                    rel(f, root),
                    label,
                    split=split,
                    group=lesions.get(image_id),
                    subgroups=subgroups.get(image_id),
                )
            )
        unlisted = {f.stem for f in inputs.glob("*.jpg")} - {image_id for image_id, _ in listed}
        if unlisted:
            left_out.append(
                LeftOut(
                    rel(inputs, root),
                    len(unlisted),
                    f"not listed in {truth.name}, so without a label (e.g. "
                    f"{min(unlisted)}.jpg); add their rows or remove them",
                )
            )
    if not samples:
        raise DataError(
            f"{root} does not look like ISIC 2018 Task 3: no ISIC2018_Task3_Training_Input/ with "
            "its ISIC2018_Task3_Training_GroundTruth.csv found"
        )
    return AdapterResult(samples, ISIC_CLASSES, left_out)


def _read_onehot(truth: Path) -> list[tuple[str, str]]:
    with open(truth, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ["image", *ISIC_CLASSES] if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{truth} lacks column(s) {', '.join(missing)}")
        out = []
        for line, rec in enumerate(reader, start=2):
            try:
                hot = [c for c in ISIC_CLASSES if float(rec[c]) >= 0.5]
            except (TypeError, ValueError):
                raise DataError(
                    f"{truth} line {line}: the class columns must hold numbers 0 or 1"
                ) from None
            if len(hot) != 1:
                raise DataError(f"{truth} line {line}: {rec['image']} is not one-hot ({hot})")
            out.append((rec["image"], hot[0]))
    return out


def _ham_metadata(root: Path) -> tuple[Path, list[str], list[dict[str, str]]] | None:
    """HAM10000_metadata.csv under ``root`` (the first by path): its path, columns and rows;
    None when there is none."""
    meta = next(iter(sorted(root.rglob("HAM10000_metadata.csv"))), None)
    if meta is None:
        return None
    with open(meta, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        return meta, list(reader.fieldnames or []), list(reader)


def _ham_lesions(root: Path) -> dict[str, str]:
    found = _ham_metadata(root)
    if found is None:
        return {}
    meta, fields, rows = found
    if not {"lesion_id", "image_id"} <= set(fields):
        raise DataError(f"{meta} lacks the lesion_id / image_id columns")
    return {r["image_id"]: r["lesion_id"] for r in rows}


HAM_SUBGROUPS = ("age", "sex", "localization", "dataset")


def age_band(age: str, width: int = 10) -> str:
    """``"57"`` / ``"57.0"`` -> ``"50-59"``; blank or unreadable -> ``"unknown"``. Only coarse
    bands are kept, never the exact age."""
    try:
        years = int(float(age))
    except ValueError:
        return "unknown"
    if years < 0:
        return "unknown"
    low = years // width * width
    return f"{low}-{low + width - 1}"


def _ham_subgroups(root: Path) -> dict[str, str]:
    """``{image_id: "age=50-59;localization=back;sex=female"}`` from HAM10000_metadata.csv."""
    from medtl.data.manifest import format_subgroups

    found = _ham_metadata(root)
    if found is None:
        return {}
    _, fields, rows = found
    columns = [c for c in HAM_SUBGROUPS if c in fields]
    out = {}
    for r in rows:
        values = {c: (r[c] or "").strip() or "unknown" for c in columns}
        if "age" in values:
            values["age"] = age_band(r["age"] or "")
        out[r["image_id"]] = format_subgroups(values) if values else ""
    return out


# -- Kvasir -------------------------------------------------------------------------------
KVASIR_CLASSES = [
    "dyed-lifted-polyps",
    "dyed-resection-margins",
    "esophagitis",
    "normal-cecum",
    "normal-pylorus",
    "normal-z-line",
    "polyps",
    "ulcerative-colitis",
]


@ADAPTERS.register("kvasir")
def kvasir(root: Path) -> AdapterResult:
    """Kvasir v2 (``kvasir-dataset-v2/<class>/<name>.jpg``) or v1 (``kvasir-dataset/``)."""
    require_root(root)
    base = None
    for name in ("kvasir-dataset-v2", "kvasir-dataset"):
        try:
            base = find_dir(root, name, "Kvasir", "")
            break
        except DataError:
            continue
    if base is None:
        if present_classes(root, KVASIR_CLASSES):
            base = root
        else:
            raise DataError(
                f"{root} does not look like Kvasir: no kvasir-dataset-v2/ (or kvasir-dataset/) "
                f"with class folders {', '.join(KVASIR_CLASSES)}"
            )
    samples = [
        Sample(rel(f, root), label)
        for label in present_classes(base, KVASIR_CLASSES)
        for f in image_files(base / label)
    ]
    return AdapterResult(samples, KVASIR_CLASSES)


# -- COVID-19 Radiography -------------------------------------------------------------------
COVID_CLASSES = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]


@ADAPTERS.register("covid19_radiography")
def covid19_radiography(root: Path) -> AdapterResult:
    """COVID-19 Radiography Database, old (``<class>/<class>-N.png``) or new layout
    (``<class>/images/*.png`` with ``<class>/masks/`` beside: masks attached, never samples).
    Classes are those of COVID, Lung_Opacity, Normal, Viral Pneumonia that exist."""
    base = find_dir(
        require_root(root),
        "COVID-19_Radiography_Dataset",
        "the COVID-19 Radiography Database",
        "COVID-19_Radiography_Dataset/",
    )
    classes = present_classes(base, COVID_CLASSES)
    if not classes:
        raise DataError(f"{base} holds none of the class folders {', '.join(COVID_CLASSES)}")
    samples = []
    for label in classes:
        folder = base / label
        images = folder / "images"
        masks = folder / "masks"
        for f in image_files(images if images.is_dir() else folder):
            mask = masks / f.name
            samples.append(
                Sample(rel(f, root), label, mask=rel(mask, root) if mask.is_file() else None)
            )
    return AdapterResult(samples, classes)


# -- Brain Tumor MRI ------------------------------------------------------------------------
BRAIN_CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


@ADAPTERS.register("brain_tumor_mri")
def brain_tumor_mri(root: Path) -> AdapterResult:
    """Brain Tumor MRI (Nickparvar): ``Training/<class>/`` and ``Testing/<class>/``.

    The official Training / Testing split is kept; validation is carved from Training."""
    require_root(root)
    train = find_dir(root, "Training", "the Brain Tumor MRI dataset", "Training/ and Testing/")
    test = train.parent / "Testing"
    samples = []
    for folder, split in ((train, "train"), (test, "test")):
        if not folder.is_dir():
            continue
        for label in present_classes(folder, BRAIN_CLASSES):
            samples += [
                Sample(rel(f, root), label, split=split) for f in image_files(folder / label)
            ]
    return AdapterResult(samples, BRAIN_CLASSES)


# -- MedMNIST -------------------------------------------------------------------------------
# Class names from MedMNIST v2's INFO table for the 2D single-label datasets.
MEDMNIST_CLASSES = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
    "dermamnist": [
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ],
    "octmnist": ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
    "bloodmnist": [
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ],
    "retinamnist": ["0", "1", "2", "3", "4"],
}
_MEDMNIST_SPLITS = {"train": "train", "val": "val", "test": "test"}


@ADAPTERS.register("medmnist")
def medmnist(root: Path, file: str | None = None) -> AdapterResult:
    """A MedMNIST ``.npz`` (``{train,val,test}_images`` / ``_labels``): official splits kept.

    ``root`` is the folder holding the ``.npz``; ``file`` names it when there are several.
    Labels may be stored ``(N, 1)`` or ``(N,)``; multi-label files (ChestMNIST) are refused.
    """
    npz = _medmnist_file(root, file)
    try:
        with np.load(npz, allow_pickle=False) as data:
            labels = {s: data[f"{s}_labels"] for s in _MEDMNIST_SPLITS if f"{s}_labels" in data}
            images = {s: data[f"{s}_images"].shape[0] for s in labels}
            unlabelled = {
                s: data[f"{s}_images"].shape[0]
                for s in _MEDMNIST_SPLITS
                if f"{s}_images" in data and s not in labels
            }
    except Exception as exc:
        raise DataError(f"{npz} is not a readable MedMNIST .npz ({exc})") from None
    if not labels:
        raise DataError(f"{npz} has no train_labels / val_labels / test_labels arrays")
    flat = {s: _medmnist_labels(npz, s, y, images[s]) for s, y in labels.items()}
    n_classes = int(max(y.max() for y in flat.values())) + 1
    stem = npz.stem.lower()
    known = next((v for k, v in MEDMNIST_CLASSES.items() if stem.startswith(k)), None)
    classes = known if known and len(known) >= n_classes else [str(i) for i in range(n_classes)]
    path = rel(npz, root)
    samples = [
        Sample(path, classes[int(label)], split=split, locator=npz_locator(f"{split}_images", i))
        for split, y in flat.items()
        for i, label in enumerate(y)
    ]
    left_out = [
        LeftOut(
            f"{s}_images of {path}",
            n,
            f"the file has no {s}_labels array; restore the complete .npz to use this split",
        )
        for s, n in unlabelled.items()
    ]
    return AdapterResult(samples, classes, left_out)


def _medmnist_file(root: Path, file: str | None) -> Path:
    """The ``.npz`` under ``root``: the one named by ``file``, else the only one there."""
    require_root(root)
    if file is None:
        found = sorted(root.glob("*.npz"))
        if len(found) != 1:
            raise DataError(
                f"{root} holds {len(found)} .npz files; name one with -O file=<name>.npz"
            )
        npz = found[0]
    else:
        npz = root / check_relative_path(file, "file")
    if not npz.is_file():
        raise DataError(f"{npz} does not exist; name an existing .npz with -O file=...")
    return npz


def _medmnist_labels(npz: Path, split: str, y: np.ndarray, n_images: int) -> np.ndarray:
    """The labels of ``split`` as integers ``[N]``, checked: one per image, single-label and
    non-negative."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(
            f"{npz}: {split}_labels has shape {y.shape}; multi-label MedMNIST is not supported"
        )
    if y.size and y.min() < 0:
        raise DataError(f"{npz}: {split}_labels holds negative labels; MedMNIST labels start at 0")
    if len(y) != n_images:
        raise DataError(
            f"{npz}: {split}_images has {n_images} images but {split}_labels {len(y)} labels"
        )
    return y.astype(int)


# -- generic layouts ---------------------------------------------------------------------------
_SPLIT_DIRS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@ADAPTERS.register("folder")
def folder(root: Path) -> AdapterResult:
    """Class-per-folder: ``<root>/<class>/*.png``, or ``<root>/{train,val,test}/<class>/``
    (then the split folders are the official split). Classes are sorted by name."""
    require_root(root)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in _SPLIT_DIRS]
    parts = [(p, _SPLIT_DIRS[p.name.lower()]) for p in split_dirs] if split_dirs else [(root, None)]
    samples = []
    classes: set[str] = set()
    for base, split in parts:
        for cls_dir in sorted(
            p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
        ):
            files = image_files(cls_dir)
            classes.add(cls_dir.name)
            samples += [Sample(rel(f, root), cls_dir.name, split=split) for f in files]
    if not classes:
        raise DataError(f"{root} has no class folders; expected <root>/<class>/<image files>")
    where = "<root>/<split>/<class>/" if split_dirs else "<root>/<class>/"
    return AdapterResult(samples, sorted(classes), unused_images(root, samples, where))


@ADAPTERS.register("images")
def images(root: Path) -> AdapterResult:
    """Unlabelled images for pretraining: every image file under ``root``, at any depth, sorted
    by path (hidden files and folders skipped); no classes. For DICOM / NIfTI trees use the
    ``dicom`` / ``nifti`` adapters, which are unlabelled by default."""
    require_root(root)
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise DataError(
            f"{root} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); point "
            "'medtl prepare images' at a folder of images"
        )
    return AdapterResult([Sample(rel(f, root)) for f in files], [])


def unused_images(root: Path, samples: list[Sample], where: str) -> list[LeftOut]:
    """Image files under ``root`` (hidden ones aside) that no sample uses: a stray folder or an
    image outside the layout is counted and listed, not passed over."""
    used = {s.path for s in samples}
    stray = sorted(
        rel(p, root)
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and rel(p, root) not in used
    )
    if not stray:
        return []
    reason = f"not directly in a class folder ({where}), e.g. {stray[0]}; move them or remove them"
    return [LeftOut("image files under the data root", len(stray), reason)]


@ADAPTERS.register("csv")
def csv_table(root: Path, file: str = "labels.csv", classes: str | None = None) -> AdapterResult:
    """A CSV with columns ``path,label`` and optional ``split,group``; paths relative to root.

    ``classes`` (comma-separated) fixes the class order; otherwise labels are sorted. A row with
    an empty label is an unlabelled image (for pretraining).
    """
    require_root(root)
    table = root / check_relative_path(file, "file")
    if not table.is_file():
        raise DataError(f"label table {table} does not exist; name it with -O file=<name>.csv")
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise DataError(f"{table} needs the columns path,label (optional: split, group)")
        rows = list(reader)
    samples = []
    for line, r in enumerate(rows, start=2):
        split = (r.get("split") or "").strip().lower() or None
        if split is not None and split not in _SPLIT_DIRS:
            raise DataError(f"{table} line {line}: split {r['split']!r} is not train, val or test")
        path = check_relative_path(r["path"].strip(), f"{table} line {line}: path")
        samples.append(
            Sample(
                path,
                (r["label"] or "").strip() or None,
                split=_SPLIT_DIRS[split] if split else None,
                group=(r.get("group") or "").strip() or None,
            )
        )
    found = sorted({s.label for s in samples if s.label})
    order = [c.strip() for c in classes.split(",")] if classes else found
    unknown = sorted(set(found) - set(order))
    if unknown:
        raise DataError(
            f"{table} has label(s) {unknown} not in classes={order}; fix the labels or the class list"
        )
    return AdapterResult(samples, order)
