"""Typed stage artifacts: each round-trips through its JSON file, older files are upgraded, and a
broken or hand-edited file stops with one line naming the key and the fix."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from medtl.artifacts import ENCODER_CARD_VERSION, EncoderCard, ModelCard, WeightsProvenance
from medtl.calibrate import NoCalibration, PlattScaling, TemperatureScaling, VectorScaling
from medtl.errors import ConfigError


def v0_meta(**changes: Any) -> dict[str, Any]:
    """A fine-tuned model's meta.json as medtl wrote it before the card had a schema version."""
    meta = {
        "medtl_version": "0.1.0",
        "backbone": "medtl_tiny_convnext",
        "classes": ["benign", "malignant"],
        "in_chans": 1,
        "image_size": 32,
        "resize": "squash",
        "normalize": {"source": "backbone", "mean": [0.45], "std": [0.226]},
        "strategy": "full",
        "plan": {"strategy": "full", "groups": []},
        "init_weights": None,
        "seed": 0,
        "manifest_sha256": "ab" * 32,
        "best_epoch": 3,
        "val_bacc": 0.75,
        "epochs_run": 5,
        "stopped_early": False,
        "epoch_equivalents": 5.0,
        "seconds": 12.5,
        "temperature": 1.0,
        "thresholds": {},
        "config": {"backbone": "medtl_tiny_convnext", "epochs": 5},
        "recipe": {"name": "toy"},
    }
    return {**meta, **changes}


def card(**changes: Any) -> ModelCard:
    meta = {k: v for k, v in v0_meta().items() if k != "temperature"}
    return ModelCard(**{**meta, **changes})


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize(
    "calibrator",
    [
        NoCalibration(),
        TemperatureScaling(temperature=1.7, n_fit=40),
        VectorScaling(scale=[1.2, 0.8], bias=[0.1, -0.1], n_fit=40, n_ignored=2),
        PlattScaling(a=1.5, b=-0.2, n_fit=40),
    ],
)
def test_model_card_round_trips_with_its_calibrator(calibrator: Any, tmp_path: Path) -> None:
    written = card(
        calibrator=calibrator,
        thresholds={"malignant": {"argmax": None, "youden": 0.42}},
        weights=WeightsProvenance(source="imagenet:x", sha256="cd" * 32, licence="MIT"),
        strategy="genome",
        genome=[0.2, 0.9, 0.5],
    )
    path = written.save(tmp_path / "meta.json")
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["calibrator"]["name"] == calibrator.name
    assert raw["temperature"] == {"none": 1.0, "temperature": 1.7}.get(calibrator.name)
    read = ModelCard.load(path)
    assert read == written and read.calibrator == calibrator
    assert type(read.calibrator) is type(calibrator)


def test_encoder_card_round_trips(tmp_path: Path) -> None:
    written = EncoderCard(
        medtl_version="0.1.0",
        backbone="medtl_tiny_vit",
        in_chans=1,
        image_size=64,
        patch_size=8,
        normalize={"source": "dataset", "mean": [0.3], "std": [0.2]},
        masking={"name": "entropy", "temperature": 1.0},
        epochs=2,
        epochs_run=2,
        final_loss=0.8,
        train_images=20,
        manifest_sha256="ef" * 32,
        weights=WeightsProvenance(path="enc.safetensors", sha256="01" * 32),
    )
    read = EncoderCard.load(written.save(tmp_path / "meta.json"))
    assert read == written and read.schema_version == ENCODER_CARD_VERSION
    older = written.model_dump(mode="json")
    del older["schema_version"]
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert EncoderCard.load(tmp_path / "older.json") == written


def test_weights_provenance_hashes_a_local_file_and_names_anything_else(tmp_path: Path) -> None:
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights" * 1000)
    local = WeightsProvenance.of_file(weights)
    assert local is not None and local.sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert WeightsProvenance.of_file("imagenet:resnet18") == WeightsProvenance(
        source="imagenet:resnet18"
    )
    assert WeightsProvenance.of_file(None) is None


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        (v0_meta(), NoCalibration()),
        (v0_meta(temperature=0.7), TemperatureScaling(temperature=0.7)),
        (  # calibrated by vector scaling: the old card said temperature 1.0
            v0_meta(calibrator={"name": "vector", "scale": [2.0, 1.0], "bias": [0.0, 0.5]}),
            VectorScaling(scale=[2.0, 1.0], bias=[0.0, 0.5]),
        ),
    ],
)
def test_cards_from_before_the_schema_version_are_upgraded(
    meta: dict[str, Any], expected: Any, tmp_path: Path
) -> None:
    read = ModelCard.load(_write(tmp_path / "meta.json", meta))
    assert read.calibrator == expected and read.schema_version == 1
    assert read.classes == ["benign", "malignant"] and read.val_bacc == 0.75


def test_a_source_record_fills_the_weights_provenance(tmp_path: Path) -> None:
    source = {"name": "imagenet:r", "arch": "resnet18", "licence": "BSD-3", "sha256": "aa" * 32}
    read = ModelCard.load(_write(tmp_path / "meta.json", v0_meta(source=source)))
    assert read.weights == WeightsProvenance(source="imagenet:r", sha256="aa" * 32, licence="BSD-3")
    assert read.source == source


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{truncated", "is not valid JSON"),
        ([1, 2], "must hold a JSON object"),
        ({k: v for k, v in v0_meta().items() if k != "classes"}, "key 'classes': Field required"),
        (v0_meta(in_chans="three"), "key 'in_chans'"),
        (v0_meta(clases=["a", "b"]), "key 'clases': not a key of this file; remove it"),
        (v0_meta(resize="crop"), "key 'resize'"),
        (v0_meta(calibrator={"name": "vectr"}), "did you mean 'vector'"),
        ({**card().model_dump(mode="json"), "schema_version": 99}, "key 'schema_version'"),
        (
            v0_meta(calibrator={"name": "vector", "scale": [1.0] * 3, "bias": [0.0] * 3}),
            "does not fit the 2 classes",
        ),
        (  # the temperature is derived from the calibrator, never read back
            {**card(calibrator=PlattScaling(a=2.0)).model_dump(mode="json"), "temperature": 2.0},
            "edit the calibrator, not the temperature",
        ),
    ],
)
def test_a_broken_card_is_one_line_naming_the_key_and_the_fix(
    data: Any, message: str, tmp_path: Path
) -> None:
    path = _write(tmp_path / "meta.json", data)
    with pytest.raises(ConfigError) as info:
        ModelCard.load(path)
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text
    assert "re-run 'medtl finetune'" in text


def test_a_missing_encoder_card_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="re-run 'medtl pretrain'"):
        EncoderCard.load(tmp_path / "meta.json")


def test_evaluation_entry_round_trip_and_older_entries() -> None:
    """``check_entry`` adds the schema version and keeps every key; an entry written before
    the version existed reads as version 1; a failed entry needs no metrics, an ok one does."""
    from medtl.artifacts import EvaluationEntry, check_entry, entry_problem

    failed = {"model": "m", "model_dir": None, "dataset": "d", "split": "test",
              "manifest": None, "status": "failed", "error": "boom"}  # fmt: skip
    written = check_entry(failed)
    assert written == {"schema_version": 1, **failed}
    again = EvaluationEntry.model_validate(json.loads(json.dumps(written)))
    assert again.model_dump(exclude_unset=True) == written
    assert EvaluationEntry.model_validate(failed).schema_version == 1
    assert entry_problem(dict(failed, status="ok")) == "entry: status 'ok' needs 'metrics'"
    assert entry_problem(dict(failed, split=3)) == "split: Input should be a valid string"
