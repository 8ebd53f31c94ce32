"""Typed artifacts that one stage hands to the next, written as JSON beside the files they describe.

Each artifact is a pydantic model with a ``schema_version``; it is validated when read, so an
older or hand-edited file stops with one line naming the file, the key and the fix instead of
a ``KeyError`` three stages later. Today:

- :class:`ModelCard` (``finetune/meta.json``): what a fine-tuned model is, written by fine-tuning,
  given its calibrator and thresholds by calibration, read by evaluation and the report.
- :class:`EncoderCard` (``pretrain/meta.json``): what an MAE pretraining run produced, with
  its corpus (:class:`CorpusRecord`) when ``pretrain.data`` names one.

:class:`EvaluationEntry` is one entry of ``evaluation.json``; the results of calibrate, evaluate
and report are in :mod:`medtl.results`. Model cards written before the schema was versioned
(no ``schema_version``) are read and upgraded in memory: their scalar ``temperature`` becomes
a temperature calibrator unless a ``calibrator`` record is present.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    computed_field,
    field_validator,
    model_validator,
)

from medtl.calibrate import (
    Calibrator,
    NoCalibration,
    PlattScaling,
    TemperatureScaling,
    VectorScaling,
    as_calibrator,
)
from medtl.errors import ConfigError, MedtlError
from medtl.io import write_json

MODEL_CARD_VERSION = 1
ENCODER_CARD_VERSION = 2  # 2: the pretraining corpus (``corpus``)
EVALUATION_ENTRY_VERSION = 1


def _calibrator(value: Any) -> Calibrator:
    """A calibrator from its record (``{"name": "vector", "scale": [...], ...}``) or itself."""
    if isinstance(value, Calibrator):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"expected a calibrator record with a 'name', got {value!r}")
    try:
        return Calibrator.from_dict(value)
    except MedtlError as exc:
        raise ValueError(str(exc)) from None


CalibratorField = Annotated[
    Calibrator,
    PlainValidator(_calibrator),
    PlainSerializer(lambda c: c.to_dict(), return_type=dict),
    WithJsonSchema({"type": "object", "required": ["name"]}),
]


class Artifact(BaseModel):
    """Base of every stage artifact: strict keys, a schema version, JSON read / write."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    VERSION: ClassVar[int] = 1

    schema_version: int

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if not 1 <= version <= cls.VERSION:
            raise ValueError(
                f"schema version {version} is not one this medtl reads (1 to {cls.VERSION}): "
                "a newer medtl wrote it (upgrade medtl), or it was edited by hand"
            )
        return version

    RERUN: ClassVar[str] = "re-run the medtl command that wrote it"  # the fix, in messages

    def save(self, path: Path) -> Path:
        """Write the artifact as JSON, atomically."""
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def load(cls, path: Path) -> Self:
        """Read and validate ``path``; a problem is one line naming the key and :attr:`RERUN`."""
        return read_artifact(cls, path, cls.RERUN)


class UnversionedIsCurrent(Artifact):
    """An artifact whose files written before ``schema_version`` existed hold the same keys as
    its current version: a file without the key reads as ``VERSION``."""

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        if isinstance(data, dict) and "schema_version" not in data:
            return dict(data, schema_version=cls.VERSION)
        return data


A = TypeVar("A", bound=Artifact)


def read_artifact(cls: type[A], path: Path, rerun: str) -> A:
    """Read and validate ``path`` as ``cls``; any problem is one line naming the key and ``rerun``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist; {rerun}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); {rerun}") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror or exc}); {rerun}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object; {rerun}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        key, msg = first_problem(exc)
        where = f"key '{key}': " if key else ""
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{path}: {where}{msg}{more}; {rerun}") from None


def first_problem(exc: ValidationError) -> tuple[str, str]:
    """The key and message to show of a validation error: an unknown key first (a hand edit
    most often renames one), with the missing key it most resembles as the fix."""
    errors = exc.errors()
    dotted = [".".join(str(p) for p in e["loc"]) for e in errors]
    unknown = [i for i, e in enumerate(errors) if e["type"] == "extra_forbidden"]
    if not unknown:
        return dotted[0], errors[0]["msg"].removeprefix("Value error, ")
    key = dotted[unknown[0]]
    missing = [d for d, e in zip(dotted, errors, strict=True) if e["type"] == "missing"]
    close = difflib.get_close_matches(key, missing, n=1)
    fix = f"did you mean '{close[0]}'?" if close else "remove it"
    return key, f"not a key of this file; {fix}"


# -- shared pieces -----------------------------------------------------------------------------
class Normalisation(BaseModel):
    """Per-channel input statistics baked into the model: where they came from and the values."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="'backbone' (the backbone's own) or 'dataset' (train split)")
    mean: list[float]
    std: list[float]


class WeightsProvenance(BaseModel):
    """Where a model's starting weights came from; every field is optional (random init: none)."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, description="registered pretrained source name")
    path: str | None = Field(None, description="the local weights file")
    sha256: str | None = Field(None, description="SHA-256 of the weights file")
    licence: str | None = Field(None, description="licence of the weights")

    @classmethod
    def of_file(cls, weights: str | Path | None) -> WeightsProvenance | None:
        """Provenance of the weights given to a stage: a local file's path and hash, or the
        name of a source that is not a local file; None without weights."""
        if weights is None or str(weights) == "":
            return None
        path = Path(weights)
        if path.is_file():
            return cls(path=str(weights), sha256=file_sha256(path))
        return cls(source=str(weights))

    @classmethod
    def merged(cls, given: Any, source: dict[str, Any]) -> dict[str, Any]:
        """``given`` provenance with its missing fields taken from a source registry record
        (``{"name", "path", "sha256", "licence", ...}``)."""
        if isinstance(given, WeightsProvenance):
            given = given.model_dump()
        known = {k: v for k, v in (given or {}).items() if v is not None}
        fields = {"source": source.get("name"), **{k: source.get(k) for k in ("path", "sha256")}}
        fields["licence"] = source.get("licence")
        return {**{k: v for k, v in fields.items() if v is not None}, **known}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the fine-tuned model's card -------------------------------------------------------------
class ModelCard(Artifact):
    """A fine-tuned classifier (``meta.json`` beside ``model.safetensors``).

    Fine-tuning writes it; calibration sets :attr:`calibrator` and :attr:`thresholds` (both
    chosen on VALIDATION); evaluation, ensembles and the report apply :attr:`calibrator`.
    """

    VERSION: ClassVar[int] = MODEL_CARD_VERSION
    schema_version: int = MODEL_CARD_VERSION
    medtl_version: str
    backbone: str
    weights: WeightsProvenance | None = None
    init_weights: str | None = Field(None, description="weights path as given to finetune")
    source: dict[str, Any] | None = Field(
        None, description="the pretrained source's record, as the source registry writes it"
    )
    classes: list[str] = Field(min_length=1)
    in_chans: int = Field(ge=1)
    image_size: int = Field(ge=1)
    resize: Literal["squash", "letterbox"] = "squash"
    normalize: Normalisation | None = None
    strategy: str
    genome: list[float] | None = Field(None, description="the genes of a BioTune genome")
    plan: dict[str, Any] = Field(default_factory=dict)
    seed: int = 0
    manifest_sha256: str
    best_epoch: int
    val_bacc: float
    epochs_run: int
    stopped_early: bool = False
    epoch_equivalents: float = 0.0
    seconds: float = 0.0
    calibrator: CalibratorField = Field(default_factory=NoCalibration)
    thresholds: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description="per class taken as positive: operating thresholds chosen on validation",
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="the finetune section, its start-dependent keys resolved",
    )
    defaults_for: Literal["pretrained", "scratch"] | None = Field(
        None, description="which start's defaults filled the finetune keys left unset"
    )
    recipe: dict[str, Any] = Field(default_factory=dict, description="the resolved recipe")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Cards from before ``schema_version``: the scalar ``temperature`` becomes a calibrator.
        A source registry record fills the weights provenance it knows."""
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("source"), dict):
            merged = WeightsProvenance.merged(data.get("weights"), data["source"])
            data = dict(
                data, weights=WeightsProvenance(**merged)
            )  # an object: see validate_assignment
        if "schema_version" in data:
            return _without_derived_temperature(data)
        data = dict(data, schema_version=MODEL_CARD_VERSION)
        temperature = data.pop("temperature", 1.0)
        if "calibrator" not in data:
            data["calibrator"] = as_calibrator(temperature)
        return data

    @model_validator(mode="after")
    def _calibrator_fits_the_classes(self) -> ModelCard:
        k, cal = len(self.classes), self.calibrator
        if (isinstance(cal, VectorScaling) and len(cal.scale) != k) or (
            isinstance(cal, PlattScaling) and k != 2
        ):
            raise ValueError(f"calibrator {cal.to_dict()} does not fit the {k} classes")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def temperature(self) -> float | None:
        """The calibration temperature when the calibrator is a temperature (or none: 1); null
        for vector and Platt scaling. Derived from :attr:`calibrator`, written for readers of
        ``meta.json`` that know only a temperature, never read back."""
        if isinstance(self.calibrator, TemperatureScaling):
            return self.calibrator.temperature
        return 1.0 if isinstance(self.calibrator, NoCalibration) else None

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        return read_artifact(cls, path, "re-run 'medtl finetune' to rewrite it")


def _without_derived_temperature(data: dict[str, Any]) -> dict[str, Any]:
    """A current card's ``temperature`` is derived from its calibrator: drop it, refusing a
    hand-edited value that disagrees (the calibrator is what is applied)."""
    if "temperature" not in data:
        return data
    data = dict(data)
    written = data.pop("temperature")
    try:
        cal = _calibrator(data.get("calibrator", {"name": "none"}))
    except ValueError:
        return data  # the calibrator's own error is reported
    derived = cal.temperature if isinstance(cal, TemperatureScaling) else None
    derived = 1.0 if isinstance(cal, NoCalibration) else derived
    if written != derived and not (
        isinstance(written, int | float) and derived is not None and abs(written - derived) < 1e-9
    ):
        raise ValueError(
            f"temperature {written!r} disagrees with the calibrator {cal.to_dict()}: the "
            "temperature is derived from 'calibrator'; edit the calibrator, not the temperature"
        )
    return data


# -- the pretraining result ------------------------------------------------------------------
class CorpusSourceRecord(BaseModel):
    """One source of a pretraining corpus (``pretrain.data``) and what the leakage guard did."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="'<kind>:<path>' as the recipe gave it")
    kind: str = Field(description="manifest, folder, dicom, nifti or npz")
    weight: float = Field(gt=0, description="per-image sampling weight")
    found: int = Field(ge=0, description="images the source lists")
    unreadable: int = Field(0, ge=0, description="left out: could not be read")
    excluded_exact: int = Field(
        0, ge=0, description="left out: same file or pixel sha256 as a validation / test image"
    )
    excluded_near: int = Field(
        0, ge=0, description="left out: a near duplicate (difference or DCT hash) of one"
    )
    used: int = Field(ge=0, description="images pretraining draws from")
    share: float = Field(ge=0, le=1, description="expected share of each epoch's draws")


class CorpusRecord(BaseModel):
    """The pretraining corpus: its sources and the leakage guard's settings."""

    model_config = ConfigDict(extra="forbid")

    sources: list[CorpusSourceRecord]
    guard_images: int = Field(ge=0, description="validation and test images checked against")
    near_duplicate_bits: int = Field(description="difference-hash threshold (bits of 256)")
    near_duplicate_phash_bits: int = Field(description="DCT-hash threshold (bits of 256)")
    sha256: str = Field(description="hash of the list of images used (source, path, locator)")


class EncoderCard(UnversionedIsCurrent):
    """An MAE-pretrained encoder (``meta.json`` beside ``encoder.safetensors``)."""

    VERSION: ClassVar[int] = ENCODER_CARD_VERSION
    schema_version: int = ENCODER_CARD_VERSION
    medtl_version: str
    backbone: str
    in_chans: int = Field(ge=1)
    image_size: int = Field(ge=1)
    patch_size: int = Field(ge=1)
    normalize: Normalisation | None = None
    masking: dict[str, Any] = Field(default_factory=dict, description="strategy and options")
    epochs: int
    epochs_run: int
    final_loss: float | None = None
    train_images: int
    manifest_sha256: str
    seed: int = 0
    seconds: float = 0.0
    init_weights: str | None = None
    weights: WeightsProvenance | None = None
    config: dict[str, Any] = Field(default_factory=dict, description="the pretrain section")
    recipe: dict[str, Any] = Field(default_factory=dict, description="the resolved recipe")
    corpus: CorpusRecord | None = Field(
        None, description="pretrain.data's sources (None: the manifest's train split)"
    )

    @classmethod
    def load(cls, path: Path) -> EncoderCard:
        return read_artifact(cls, path, "re-run 'medtl pretrain' to rewrite it")


# -- the evaluation result -------------------------------------------------------------------
class EvaluationEntry(UnversionedIsCurrent):
    """One model on one dataset split in ``evaluation.json`` (``medtl evaluate``); the report
    validates each entry when it reads one. A failed entry has ``status: failed`` and its
    ``error``; an ok one its predictions, calibrator and metrics."""

    VERSION: ClassVar[int] = EVALUATION_ENTRY_VERSION
    schema_version: int = EVALUATION_ENTRY_VERSION
    model: str
    model_dir: str | None = None
    dataset: str
    split: str
    manifest: str | None = None
    status: Literal["ok", "failed"]
    error: str | None = None
    predictions: str | None = None
    val_predictions: str | None = None
    temperature: float | None = Field(
        1.0, description="the scalar temperature; null when the calibrator is not a temperature"
    )
    calibrator: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    model_meta: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    leaks: dict[str, Any] | None = None
    conformal: dict[str, Any] | None = Field(None, description="conformal sets on this split")
    site_thresholds: dict[str, Any] | None = Field(
        None, description="operating thresholds chosen on another labelled split of the data"
    )

    @model_validator(mode="after")
    def _ok_has_metrics(self) -> EvaluationEntry:
        if self.status == "ok" and self.metrics is None:
            raise ValueError("status 'ok' needs 'metrics'")
        return self


def check_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with its ``schema_version``, after validating it as an :class:`EvaluationEntry`
    (the dict itself is written, so the JSON keeps its keys and numbers as they are)."""
    entry = {"schema_version": EVALUATION_ENTRY_VERSION, **entry}
    EvaluationEntry.model_validate(entry)
    return entry


def entry_problem(entry: Any) -> str | None:
    """Why ``entry`` is not a valid :class:`EvaluationEntry`, as one line naming the key;
    ``None`` when it is."""
    try:
        EvaluationEntry.model_validate(entry)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "entry"
        message = err["msg"].removeprefix("Value error, ")
        return f"{where}: {message}"
    return None
