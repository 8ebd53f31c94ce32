"""A pretraining corpus of its own: sources pooled with weights, and the leakage guard."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from medtl.artifacts import ENCODER_CARD_VERSION, EncoderCard
from medtl.cli import main as medtl
from medtl.data.corpus import CorpusSource, build_corpus, corpus_dataset, epoch_draws
from medtl.data.dataset import DataConfig
from medtl.data.manifest import Manifest, resolve
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.errors import DataError
from medtl.pretrain.loop import CORPUS_EXCLUDED, META_FILE, PretrainConfig, pretrain
from tests.conftest import pretrain_killed_and_resumed, tiny_pretrain, write_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def labelled(tmp_path: Path) -> tuple[Manifest, Path]:
    """A labelled phantom dataset (64 px) with train / val / test splits."""
    root = make_phantom(tmp_path / "labelled", n=16, size=64, seed=1, duplicates=0)
    return prepare("folder", root, tmp_path / "labelled.csv").manifest, root


def split_images(manifest: Manifest, root: Path) -> list[Path]:
    return [resolve(root, r.path) for r in manifest.rows if r.split == "test"]


def write_npz(path: Path) -> Path:
    rng = np.random.default_rng(5)
    np.savez(
        path,
        train_images=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        train_labels=np.zeros(3, np.uint8),  # labels are ignored
        test_images=rng.integers(0, 256, (2, 28, 28, 3), dtype=np.uint8),
    )
    return path


def corpus_folder(tmp_path: Path, manifest: Manifest, root: Path) -> Path:
    """Grey and RGB images of several sizes, a renamed copy of a test image and a resized,
    JPEG re-encoded copy of another."""
    folder = tmp_path / "corpus"
    write_png(folder / "grey.png", (40, 32), seed=1)
    write_png(folder / "deep" / "rgb.png", (50, 70), seed=2, mode="RGB")
    write_png(folder / "scan_mask.png", (40, 32), seed=3)  # left out by `exclude`
    first, second = split_images(manifest, root)[:2]
    shutil.copy(first, folder / "renamed.png")
    with Image.open(second) as img:
        img.convert("RGB").resize((58, 58), Image.Resampling.BILINEAR).save(
            folder / "deep" / "other-name.jpg", quality=90
        )
    return folder


def test_corpus_pools_mixed_images_and_leaves_out_copies_of_test_images(
    tmp_path: Path, labelled: tuple[Manifest, Path]
) -> None:
    manifest, root = labelled
    folder = corpus_folder(tmp_path, manifest, root)
    sources = [
        CorpusSource(folder=str(folder), exclude=["*_mask*"]),
        CorpusSource(npz=str(write_npz(tmp_path / "extra.npz")), weight=2.0),
    ]
    corpus = build_corpus(sources, manifest, root, tmp_path / "hashes.json")
    first, second = corpus.record.sources
    assert (first.found, first.excluded_exact, first.excluded_near, first.used) == (4, 1, 1, 2)
    assert (second.found, second.excluded_exact, second.excluded_near, second.used) == (5, 0, 0, 5)
    assert first.share == pytest.approx(2 / 12) and second.share == pytest.approx(10 / 12)
    assert corpus.record.guard_images == sum(r.split != "train" for r in manifest.rows)
    assert {e["path"]: e["reason"] for e in corpus.excluded} == {
        "renamed.png": "exact",
        "deep/other-name.jpg": "near",
    }
    assert [i.path for i in corpus.items[:2]] == ["deep/rgb.png", "grey.png"]
    # grey, RGB, 28 px and 50 x 70 px all leave the loader as [3, 32, 32]
    ds = corpus_dataset(corpus, DataConfig(image_size=32, channels=3))
    shapes = {tuple(ds[i]["image"].shape) for i in range(len(ds))}
    assert shapes == {(3, 32, 32)}


def test_hashes_are_cached_by_file(tmp_path: Path, labelled: tuple[Manifest, Path]) -> None:
    manifest, root = labelled
    folder = corpus_folder(tmp_path, manifest, root)
    cache = tmp_path / "hashes.json"
    build_corpus([CorpusSource(folder=str(folder))], manifest, root, cache)
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 5 + sum(r.split != "train" for r in manifest.rows)
    key = next(k for k in entries if "grey.png" in k)
    entries[key]["dhash"] = "00" * 32  # a cached value is used, not recomputed
    cache.write_text(json.dumps({"format": 1, "entries": entries}))
    build_corpus([CorpusSource(folder=str(folder))], manifest, root, cache)
    assert json.loads(cache.read_text())["entries"][key]["dhash"] == "00" * 32


def test_epoch_draws_follow_the_weights_and_the_seed() -> None:
    draws = epoch_draws([4, 2], [1.0, 3.0], seed=0, epoch=0)
    assert len(draws) == 6
    assert sorted(draws[draws < 4]).__len__() == 2  # 4 x 1 / (4 + 6) of 6 draws, rounded
    assert np.bincount(draws[draws >= 4] - 4).tolist() == [2, 2]  # each image twice
    assert np.array_equal(draws, epoch_draws([4, 2], [1.0, 3.0], seed=0, epoch=0))
    plain = epoch_draws([4, 2], [1.0, 1.0], seed=0, epoch=1)
    assert sorted(plain.tolist()) == list(range(6))  # weights of 1: every image once
    assert any(
        not np.array_equal(epoch_draws([40], [1.0], 0, e), epoch_draws([40], [1.0], 0, 0))
        for e in (1, 2)
    )


def test_bad_sources_are_one_clear_error(tmp_path: Path, labelled: tuple[Manifest, Path]) -> None:
    manifest, root = labelled
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"pretrain.data\[0\] \(folder:.*empty\).*no image files"):
        build_corpus([CorpusSource(folder=str(tmp_path / "empty"))], manifest, root)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"pretrain.data\[0\] .*none of its 1 images can be read"):
        build_corpus([CorpusSource(folder=str(broken))], manifest, root)
    leaked = tmp_path / "leaked"
    leaked.mkdir()
    for k, image in enumerate(split_images(manifest, root)):
        shutil.copy(image, leaked / f"copy{k}.png")
    with pytest.raises(DataError, match=r"pretrain.data\[1\] \(folder:.*leaked\): every one"):
        build_corpus(
            [
                CorpusSource(folder=str(broken.parent / "labelled")),
                CorpusSource(folder=str(leaked)),
            ],
            manifest,
            root,
        )
    with pytest.raises(DataError, match=r"pretrain.data\[0\] \(npz:.*\).*does not exist"):
        build_corpus([CorpusSource(npz=str(tmp_path / "none.npz"))], manifest, root)


def test_a_source_names_exactly_one_kind() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        CorpusSource(folder="a", npz="b.npz")
    with pytest.raises(ValidationError, match="'root'"):
        CorpusSource(manifest="m.csv")
    with pytest.raises(ValidationError, match="'root'"):
        CorpusSource(folder="a", root="b")
    with pytest.raises(ValidationError, match="'splits'"):
        CorpusSource(folder="a", splits=["train"])
    with pytest.raises(ValidationError, match="greater than 0"):
        CorpusSource(folder="a", weight=0)


def test_a_killed_corpus_pretraining_resumes_bit_equal_and_its_card_lists_the_sources(
    tmp_path: Path, labelled: tuple[Manifest, Path]
) -> None:
    manifest, root = labelled
    folder = corpus_folder(tmp_path, manifest, root)
    cfg = tiny_pretrain(
        picture_every=1,
        data=[
            {"folder": str(folder), "exclude": ["*_mask*"]},
            {"npz": str(write_npz(tmp_path / "extra.npz")), "weight": 0.5},
            {"manifest": str(tmp_path / "labelled.csv"), "root": str(root), "splits": ["train"]},
        ],
    )
    data_cfg = DataConfig(image_size=64, channels=1)
    full, _ = pretrain_killed_and_resumed(cfg, manifest, root, data_cfg, tmp_path, 3)
    card = EncoderCard.load(tmp_path / "a" / META_FILE)
    assert card == full.card and card.schema_version == ENCODER_CARD_VERSION
    assert card.corpus is not None
    train = sum(r.split == "train" for r in manifest.rows)
    assert [s.used for s in card.corpus.sources] == [2, 5, train]
    assert card.train_images == 7 + train
    assert [s.excluded_exact + s.excluded_near for s in card.corpus.sources] == [2, 0, 0]
    excluded = json.loads((tmp_path / "a" / CORPUS_EXCLUDED).read_text())
    assert {e["path"] for e in excluded} == {"renamed.png", "deep/other-name.jpg"}


def test_without_a_corpus_pretraining_reads_the_train_split(
    tmp_path: Path, labelled: tuple[Manifest, Path]
) -> None:
    manifest, root = labelled
    cfg = PretrainConfig(
        backbone="test_resnet", epochs=1, batch_size=8, picture_every=0, decoder_dim=16
    )
    result = pretrain(cfg, manifest, root, DataConfig(image_size=64, channels=1), tmp_path / "p")
    assert result.card.corpus is None
    assert result.card.train_images == sum(r.split == "train" for r in manifest.rows)


def test_prepare_makes_an_unlabelled_dicom_manifest_without_identifiers(
    tmp_path: Path,
    labelled: tuple[Manifest, Path],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.data.test_scans import ACCESSION, BIRTH, NAME, PATIENT_ID, write_dicom

    tree = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for k in range(6):
        write_dicom(
            tree / f"series{k % 2}" / f"img{k}.dcm",
            rng.integers(0, 4000, (24, 20), dtype=np.uint16),
        )
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "m" / "scans.csv"
    assert medtl(["prepare", "dicom", str(tree), "-o", str(out), "--split-ratios", "1,0,0"]) == 0
    written = Manifest.load(out)
    assert written.classes == [] and all(r.label == "" for r in written.rows)
    assert len(written.rows) == 6
    text = "\n".join(
        [p.read_text() for p in out.parent.iterdir()] + [caplog.text, *capsys.readouterr()]
    )
    for secret in (NAME, "Doe", "Jane", PATIENT_ID, BIRTH, ACCESSION):
        assert secret.lower() not in text.lower()
    manifest, root = labelled
    corpus = build_corpus([CorpusSource(manifest=str(out), root=str(tree))], manifest, root)
    assert corpus.record.sources[0].used == 6


def test_prepare_makes_an_unlabelled_manifest_from_a_bare_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "bare" / "a.png", seed=1)
    write_png(tmp_path / "bare" / "day2" / "b.png", (30, 50), seed=2, mode="RGB")
    out = tmp_path / "bare.csv"
    assert (
        medtl(
            ["prepare", "images", str(tmp_path / "bare"), "-o", str(out), "--split-ratios", "1,0,0"]
        )
        == 0
    )
    written = Manifest.load(out)
    assert written.classes == [] and [r.label for r in written.rows] == ["", ""]
    assert {r.split for r in written.rows} == {"train"}


def test_medtl_check_names_a_missing_corpus_source(tmp_path: Path) -> None:
    from medtl.recipe import load_recipe
    from medtl.runs import check_named_files

    recipe_file = Path(__file__).resolve().parents[2] / "recipes" / "busi.yaml"
    (tmp_path / "here").mkdir()
    ok = load_recipe(recipe_file, [f"pretrain.data=[{{folder: {tmp_path / 'here'}}}]"])
    assert check_named_files(ok, None)[-1].endswith(": exists")
    bad = load_recipe(recipe_file, [f"pretrain.data=[{{npz: {tmp_path / 'no.npz'}}}]"])
    with pytest.raises(DataError, match=r"pretrain.data\[0\] \(npz:.*no.npz\): .*does not exist"):
        check_named_files(bad, None)


def test_the_stage_key_follows_the_corpus_files(tmp_path: Path) -> None:
    from medtl.data.corpus import listing_key

    write_png(tmp_path / "c" / "a.png", seed=1)
    sources = [CorpusSource(folder=str(tmp_path / "c"))]
    key = listing_key(sources)
    assert listing_key(sources) == key
    write_png(tmp_path / "c" / "deep" / "b.png", seed=2)
    assert listing_key(sources) != key


def test_dicom_and_nifti_trees_are_sources(tmp_path: Path, labelled: tuple[Manifest, Path]) -> None:
    from tests.data.test_scans import slab_volume, write_dicom, write_nifti

    rng = np.random.default_rng(1)
    write_dicom(tmp_path / "dcm" / "a" / "1.dcm", rng.integers(0, 4000, (24, 20), dtype=np.uint16))
    write_dicom(tmp_path / "dcm" / "b" / "cine.dcm", rng.integers(0, 99, (3, 16, 16), np.uint16))
    write_nifti(tmp_path / "nii" / "vol.nii.gz", slab_volume())
    manifest, root = labelled
    corpus = build_corpus(
        [CorpusSource(dicom=str(tmp_path / "dcm")), CorpusSource(nifti=str(tmp_path / "nii"))],
        manifest,
        root,
    )
    assert [(s.found, s.used) for s in corpus.record.sources] == [(4, 4), (2, 2)]
    ds = corpus_dataset(corpus, DataConfig(image_size=32, channels=3))
    assert {tuple(ds[i]["image"].shape) for i in range(len(ds))} == {(3, 32, 32)}
