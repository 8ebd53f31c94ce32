"""Recipes: one YAML file naming the data and the stages, validated before any work starts.

A recipe is loaded with ``yaml.safe_load`` (config never executes code), ``--set key=value``
overrides and the chosen ``preset`` are applied, and the result is validated by pydantic
models that refuse unknown keys. Every error is one line naming the file, the key and the
allowed values.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from medtl.data.adapters import ADAPTERS
from medtl.data.audit import DEFAULT_NEAR_BITS, DEFAULT_PHASH_BITS
from medtl.data.dataset import LoaderConfig
from medtl.data.leaks import LeakPolicy
from medtl.data.split import DEFAULT_RATIOS, check_ratios
from medtl.ensemble import EnsembleConfig
from medtl.errors import ConfigError
from medtl.evaluate import CalibrateConfig, EvaluateConfig, ReportConfig
from medtl.finetune.loop import FinetuneConfig
from medtl.finetune.search import BioTuneConfig
from medtl.pretrain.loop import PretrainConfig
from medtl.tracking import TrackingConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSection(Strict):
    """Where the images are and how they are split and loaded."""

    adapter: str = Field(description="dataset adapter name (`medtl list adapters`)")
    root: str | None = Field(None, description="data root; `--data-root` overrides it")
    manifest: str | None = Field(
        None,
        description="manifest CSV (must exist); when null, one is prepared into the run folder",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="adapter options")
    split_seed: int = Field(0, description="seed of the group-aware split")
    split_ratios: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_RATIOS), description="train/val/test shares"
    )
    near_dup_bits: int = Field(
        DEFAULT_NEAR_BITS, ge=0, le=256, description="near-duplicate threshold (bits)"
    )
    near_dup_phash_bits: int = Field(
        DEFAULT_PHASH_BITS,
        ge=0,
        le=256,
        description="near-duplicate threshold in bits of the 256-bit DCT hash; a pair within "
        "either threshold is one duplicate cluster",
    )
    loader: LoaderConfig = Field(
        default_factory=LoaderConfig,
        description="image size, channels, caching, normalisation (augmentation and batch size "
        "are set per stage: pretrain.*, finetune.*)",
    )
    leaks: LeakPolicy = Field(
        "keep",
        description="official test images sharing a duplicate cluster or lesion / patient group "
        "with train or val: keep (report official and clean test side by side), drop (clean "
        "test only), resplit (ignore the official split; a seeded group-aware split)",
    )

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, name: str) -> str:
        return ADAPTERS.validate(name)

    @field_validator("split_ratios")
    @classmethod
    def _ratios(cls, ratios: dict[str, float]) -> dict[str, float]:
        return check_ratios(ratios)


SECTION_MODELS: dict[str, type[BaseModel]] = {
    "data": DataSection,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "search": BioTuneConfig,
    "calibrate": CalibrateConfig,
    "evaluate": EvaluateConfig,
    "ensemble": EnsembleConfig,
    "report": ReportConfig,
    "tracking": TrackingConfig,
}


class Recipe:
    """A validated recipe: ``name``, ``seed``, ``preset`` and one model per present section."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source
        self.name: str = raw.get("name", Path(source).stem)
        self.seed: int = raw.get("seed", 0)
        self.preset: str | None = raw.get("preset")
        self.sections: dict[str, BaseModel] = {}
        for key, model in SECTION_MODELS.items():
            if raw.get(key) is not None:
                self.sections[key] = _validate(model, raw[key], key, source)

    def section(self, name: str) -> Any:
        if name not in self.sections:
            raise ConfigError(f"{self.source}: the recipe has no '{name}' section; add one")
        return self.sections[name]

    def has(self, name: str) -> bool:
        return name in self.sections

    def resolved(self) -> dict[str, Any]:
        """The recipe after presets and overrides, with every default filled in."""
        out: dict[str, Any] = {"name": self.name, "seed": self.seed}
        if self.preset:
            out["preset"] = self.preset
        for key, model in self.sections.items():
            out[key] = model.model_dump(mode="json")
        return out


TOP_KEYS = {"name", "seed", "preset", "presets", "description"}
# keys that recipes once set without any effect, and where the setting lives
MOVED = {
    "data.loader.batch_size": "set finetune.batch_size, pretrain.batch_size or evaluate.batch_size",
    "data.loader.augment": "set finetune.augment or pretrain.augment",
}


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, apply ``presets[preset]`` then ``overrides`` (``key.sub=value``), validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [], str(path))
    allowed = TOP_KEYS | set(SECTION_MODELS)
    for key in raw:
        if key not in allowed:
            raise ConfigError(_unknown(str(path), key, key, allowed))
    raw.pop("presets", None)
    return Recipe(raw, str(path))


class DuplicateKeyError(ConfigError):
    """A mapping names one key twice (YAML would keep the last one silently)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise DuplicateKeyError(
                        f"line {line}: key {key!r} appears twice in one section (first on line "
                        f"{first[key]}); YAML would keep only the last: delete one"
                    )
                first[key] = line
            except TypeError:  # an unhashable key: SafeLoader names it below
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (config never executes code)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: no code runs


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """The preset named by ``preset`` (after ``--set preset=...``) first, then each override."""
    raw = copy.deepcopy(raw)
    pairs = [_parse_override(o) for o in overrides]
    for key, value in pairs:
        if key == "preset":
            raw["preset"] = value
    preset = raw.get("preset")
    if preset is not None:
        presets = raw.get("presets") or {}
        if preset not in presets:
            raise ConfigError(
                f"{source}: preset {preset!r} is not defined (presets: {', '.join(presets) or 'none'})"
            )
        for key, value in (presets[preset] or {}).items():
            _set(raw, key, value)
    for key, value in pairs:
        if key != "preset":
            _set(raw, key, value)
    return raw


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r} must look like section.key=value")
    return key.strip(), yaml.safe_load(value) if value.strip() else None


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise ConfigError(f"cannot set {dotted}: {part} is not a section")
        node = node[part]
    node[parts[-1]] = value


def _validate(model: type[BaseModel], data: Any, section: str, source: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ConfigError as exc:  # raised by a validator that is not a ValueError
        raise ConfigError(f"{source}: {section}: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join([section, *(str(p) for p in err["loc"])])
        if err["type"] == "extra_forbidden" and where in MOVED:
            moved = f"{source}: {where}: unknown key (it has no effect); {MOVED[where]}"
            raise ConfigError(moved) from None
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                _unknown(source, where, str(err["loc"][-1]), _fields(model, err["loc"][:-1]))
            ) from None
        message = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where}: {message}") from None


def _fields(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str]:
    current: Any = model
    for part in loc:
        info = getattr(current, "model_fields", {}).get(part)
        if info is None:
            return set()
        current = info.annotation
    return set(getattr(current, "model_fields", {}))


def _unknown(source: str, where: str, key: str, allowed: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{source}: {where}: unknown key{hint} (allowed: {', '.join(sorted(allowed))})"


def keys_markdown() -> str:
    """Every recipe key with its type, default and description, from the models themselves
    (``docs/recipe_keys.md`` is this text; a test keeps the two equal)."""
    lines = [
        "# Recipe keys",
        "",
        "Generated from medtl's recipe models (`python -m medtl.recipe`); do not edit by hand.",
        "",
    ]
    lines += [
        "Top level: `name`, `description`, `seed` (default 0), `preset` (a key of `presets`), `presets`",
        "(name -> `{dotted.key: value}` overrides applied before `--set`).",
        "",
    ]
    for section, model in SECTION_MODELS.items():
        lines += [f"## `{section}`", "", (model.__doc__ or "").strip().splitlines()[0], ""]
        lines += _model_rows(model, section)
    return "\n".join(lines) + "\n"


def _model_rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            nested.append((f"{prefix}.{name}", annotation))
            rows.append(f"| `{prefix}.{name}` | section | | {info.description or ''} (below) |")
            continue
        item = _listed_model(annotation)
        if item is not None:  # a list of sections (pretrain.data): each entry's keys below
            nested.append((f"{prefix}.{name}[]", item))
            rows.append(
                f"| `{prefix}.{name}` | list of sections | `{info.default!r}` | "
                f"{(info.description or '').replace('|', chr(92) + '|')} (each entry: below) |"
            )
            continue
        default = (
            "required"
            if info.is_required()
            else f"`{info.get_default(call_default_factory=True)!r}`"
        )
        type_name = str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")
        cells = [f"`{prefix}.{name}`", type_name, default, info.description or ""]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    out = [*rows, ""]
    for name, sub in nested:
        out += [f"### `{name}`", "", *_model_rows(sub, name)]
    return out


def _listed_model(annotation: Any) -> type[BaseModel] | None:
    """``X`` when ``annotation`` is ``list[X]`` or ``list[X] | None`` with ``X`` a model."""
    import typing

    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list:
            (item,) = typing.get_args(arg)
            if isinstance(item, type) and issubclass(item, BaseModel):
                return item
    return None


if __name__ == "__main__":
    print(keys_markdown(), end="")
