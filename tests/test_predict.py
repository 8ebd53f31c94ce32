"""``medtl predict``: a tiny calibrated model applied to folders, manifests and DICOM trees;
training's preprocessing, resuming after a kill, skipped files, and the refusals."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medtl.cli import main
from medtl.conformal import ConformalCard
from medtl.data.manifest import Manifest
from medtl.errors import ConfigError
from medtl.evaluate import CalibrateConfig, calibrate_model
from medtl.predict import PartialOutput, PredictOptions, predict_images
from medtl.predictions import Predictions
from tests.conftest import train_tiny, write_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A tiny model fine-tuned for one epoch on a phantom, before and after calibration:
    (raw model folder, calibrated model folder, phantom manifest)."""
    base = tmp_path_factory.mktemp("predict")
    train_tiny(base, base / "raw", n=32, size=40, epochs=1, batch_size=8)
    shutil.copytree(base / "raw", base / "calibrated")
    calibrate_model(base / "calibrated", CalibrateConfig())
    return base / "raw", base / "calibrated", base / "m.csv"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_manifest_input_matches_trainings_preprocessing(trained, tmp_path: Path) -> None:
    """Predicting the validation split from its manifest gives the calibrated probabilities of
    the validation predictions that fine-tuning wrote (same transforms, same normalisation)."""
    _, model, manifest = trained
    root = model.parents[0] / "phantom"
    result = predict_images(
        model, manifest, tmp_path / "out", PredictOptions(split="val", progress=False), root
    )
    val = Predictions.load(model / "predictions_val.csv")
    card = json.loads((model / "meta.json").read_text())
    from medtl.artifacts import ModelCard

    calibrator = ModelCard.model_validate(card).calibrator
    expected = dict(zip(val.ids, val.probs(calibrator), strict=True))
    rows = _rows(result.files["predictions.csv"])
    assert result.predicted == len(val.ids) == len(rows)
    for row in rows:
        got = [float(row["prob_benign"]), float(row["prob_malignant"])]
        np.testing.assert_allclose(got, expected[row["id"]], atol=1e-5)
    conformal = ConformalCard.load(model / "conformal.json")
    probs = np.array([[float(r["prob_benign"]), float(r["prob_malignant"])] for r in rows])
    members = conformal.sets(probs)
    assert [r["set"] for r in rows] == [
        "|".join(c for c, m in zip(conformal.classes, row, strict=True) if m) for row in members
    ]
    assert all(r["abstain"] == str(int(r["set_size"]) != 1).lower() for r in rows)
    # binary, no positive class named: class 1 at the Youden threshold chosen on validation
    youden = ModelCard.model_validate(card).thresholds["malignant"]["youden"]
    clear = [r for r in rows if abs(float(r["prob_malignant"]) - youden) > 1e-5]  # the
    # threshold is one of these validation images' own probabilities, which the CSV rounds
    called = ["malignant" if float(r["prob_malignant"]) >= youden else "benign" for r in clear]
    assert len(clear) >= len(rows) - 1 and [r["predicted"] for r in clear] == called


def test_folder_with_corrupt_file_and_other_channel_counts(trained, tmp_path: Path) -> None:
    _, model, _ = trained
    folder = tmp_path / "in"
    write_png(folder / "a" / "grey.png", mode="L")
    write_png(folder / "rgb.png", mode="RGB", seed=1)  # RGB into a 1-channel model: luminance
    write_png(folder / "rgba.png", mode="RGBA", seed=2)  # alpha dropped
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    assert (
        main(
            ["predict", str(model), str(folder), "--out", str(tmp_path / "out"), "--device", "cpu"]
        )
        == 0
    )
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [r["path"] for r in rows] == ["a/grey.png", "rgb.png", "rgba.png"]
    for r in rows:
        assert float(r["prob_benign"]) + float(r["prob_malignant"]) == pytest.approx(1, abs=1e-5)
        assert r["predicted"] in ("benign", "malignant")
    skipped = _rows(tmp_path / "out" / "skipped.csv")
    assert sorted(s["path"] for s in skipped) == ["corrupt.png", "notes.txt"]
    assert all(str(folder) not in s["reason"] for s in skipped)
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["path"] for line in lines] == ["a/grey.png", "rgb.png", "rgba.png"]
    assert not (tmp_path / "out" / ".partial").exists()


def test_resume_after_a_kill_completes_without_duplicates(
    trained, tmp_path: Path, monkeypatch
) -> None:
    _, model, _ = trained
    folder = tmp_path / "in"
    for i in range(7):
        write_png(folder / f"img{i}.png", seed=i)
    (folder / "bad.png").write_bytes(b"broken")
    opts = PredictOptions(batch_size=2, progress=False)
    reference = predict_images(model, folder, tmp_path / "ref", opts)

    calls = {"n": 0}
    append = PartialOutput.append

    def dying_append(self, rows, records):  # the second batch is torn mid-line, then "kill"
        calls["n"] += 1
        if calls["n"] == 2:
            with open(self.csv, "a") as handle:
                handle.write("torn,half")
            raise KeyboardInterrupt
        append(self, rows, records)

    monkeypatch.setattr(PartialOutput, "append", dying_append)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict_images(model, folder, out, opts)
    assert not (out / "predictions.csv").exists()  # nothing final while incomplete
    monkeypatch.setattr(PartialOutput, "append", append)
    resumed = predict_images(model, folder, out, opts)
    assert resumed.resumed == 3  # bad.png (skipped) and the first batch of two
    for name in ("predictions.csv", "skipped.csv"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text()
    assert resumed.predicted == reference.predicted == 7 and resumed.skipped == 1
    again = predict_images(model, folder, out, opts)  # complete: nothing redone
    assert again.predicted == 7


def test_unfinished_run_of_another_model_is_refused(trained, tmp_path: Path) -> None:
    raw, model, _ = trained
    folder = tmp_path / "in"
    write_png(folder / "x.png")
    out = tmp_path / "out"
    predict_images(model, folder, out, PredictOptions(progress=False))
    with pytest.raises(Exception, match="another model or input"):
        predict_images(raw, folder, out, PredictOptions(progress=False, uncalibrated=True))


def test_uncalibrated_model_is_refused_with_the_fix(trained, tmp_path: Path, capsys) -> None:
    raw, _, _ = trained
    folder = tmp_path / "in"
    write_png(folder / "x.png")
    out = tmp_path / "out"
    assert main(["predict", str(raw), str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"medtl calibrate {raw}" in err[0] and "--uncalibrated" in err[0]
    assert not out.exists()
    assert main(["predict", str(raw), str(folder), "--out", str(out), "--uncalibrated"]) == 0
    row = _rows(out / "predictions.csv")[0]
    assert row["set"] == "" and row["abstain"] == ""


def test_unknown_operating_point_is_refused(trained, tmp_path: Path) -> None:
    _, model, _ = trained
    with pytest.raises(ConfigError, match="known:"):
        predict_images(model, tmp_path, tmp_path / "out", PredictOptions(operating_point="best"))


def test_dicom_tree_written_with_pseudonyms_only(trained, tmp_path: Path) -> None:
    from tests.data.test_scans import NAME, PATIENT_ID, write_dicom

    _, model, _ = trained
    pixels = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)
    folder = tmp_path / "scans"
    write_dicom(folder / "study1" / "img1.dcm", pixels)
    write_dicom(folder / "study1" / "img2.dcm", pixels[::-1].copy())
    write_dicom(folder / "study2" / "img.dcm", pixels, PatientID="OTHER99")
    write_dicom(folder / "PID123" / "leak.dcm", pixels)  # the path spells the patient's ID
    out = tmp_path / "out"
    result = predict_images(model, folder, out, PredictOptions(progress=False))
    assert result.predicted == 3 and result.skipped == 1
    rows = _rows(out / "predictions.csv")
    assert [r["group"] for r in rows] == ["patient-0001", "patient-0001", "patient-0002"]
    for name in ("predictions.csv", "predictions.jsonl", "skipped.csv", "summary.json"):
        text = (out / name).read_text()
        for word in (PATIENT_ID, "OTHER99", NAME, "Doe", "Jane"):
            assert word not in text, (name, word)


def test_manifest_needs_its_data_root(trained, tmp_path: Path) -> None:
    _, model, manifest = trained
    assert Manifest.load(manifest).rows
    assert main(["predict", str(model), str(manifest), "--out", str(tmp_path / "o")]) == 2


def test_throughput_benchmark_runs_and_writes_its_section(trained, tmp_path: Path) -> None:
    from tests.test_benchmark_scripts import load_script

    _, model, _ = trained
    folder = tmp_path / "in"
    for i in range(3):
        write_png(folder / f"x{i}.png", seed=i)
    write_png(folder / "x0_mask.png")  # masks are left out
    doc = tmp_path / "performance.md"
    section = load_script("predict_throughput").main(
        ["--model", str(model), "--input", str(folder), "--n", "5", "--out", str(doc)]
    )
    assert "| 3 |" in section and "images/s" in doc.read_text()


def test_nifti_volume_predicted_per_kept_slice(trained, tmp_path: Path) -> None:
    import nibabel as nib

    _, model, _ = trained
    volume = np.zeros((24, 20, 6), dtype=np.float32)
    volume[4:20, 4:16, 1:5] = np.linspace(1, 2, 16 * 12 * 4).reshape(16, 12, 4)  # slices 1-4
    folder = tmp_path / "vols"
    folder.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), folder / "case.nii.gz")
    result = predict_images(model, folder, tmp_path / "out", PredictOptions(progress=False))
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert result.predicted == 4
    assert [r["locator"] for r in rows] == [f"axis=2/slice={k}" for k in range(1, 5)]
    assert {r["group"] for r in rows} == {"case.nii.gz"}


def test_operating_point_decision_by_hand(trained) -> None:
    from medtl.artifacts import ModelCard
    from medtl.calibrate import NoCalibration
    from medtl.predict import Decision

    _, model, _ = trained
    card = ModelCard.load(model / "meta.json")
    rule = Decision(card, NoCalibration(), None, positive=1, threshold=0.3, rule="youden")
    probs = np.array([[0.6, 0.4], [0.75, 0.25]])
    _, called, sets = rule.rows(np.log(probs))
    assert called.tolist() == [1, 0]  # 0.4 >= 0.3 is called positive although argmax is 0
    assert sets is None
    three = Decision(card, NoCalibration(), None, positive=2, threshold=0.34, rule="youden")
    _, called, _ = three.rows(np.log(np.array([[0.2, 0.45, 0.35], [0.5, 0.2, 0.3]])))
    assert called.tolist() == [2, 0]  # below the threshold: the most probable other class


def test_explain_writes_one_overlay_per_image_named_by_its_id(trained, tmp_path: Path) -> None:
    """``--explain``: a PNG of the image and its maps per predicted image, named by the row id
    (never the file name); the predictions themselves are the same as without it."""
    from PIL import Image

    _, model, _ = trained
    folder = tmp_path / "in"
    write_png(folder / "patient_name_scan.png", mode="L")
    write_png(folder / "b.png", mode="L", seed=1)
    base = ["predict", str(model), str(folder), "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--out", str(tmp_path / "out"), "--explain"]) == 0
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert rows == _rows(tmp_path / "plain" / "predictions.csv")
    pictures = sorted((tmp_path / "out" / "explanations").iterdir())
    assert [p.name for p in pictures] == sorted(f"{r['id']}.png" for r in rows)
    assert all(Image.open(p).size[0] > 50 for p in pictures)
    assert not (tmp_path / "plain" / "explanations").exists()
    assert main([*base, "--out", str(tmp_path / "bad"), "--explain", "gradcam,saliency"]) == 2
    assert not (tmp_path / "bad").exists()  # refused before anything is written
