"""Data stage: adapters, readers, manifests, splits, the audit and MONAI loading."""

from __future__ import annotations

from medtl.data import adapters, scans  # noqa: F401  (registers the adapters)
from medtl.data.adapters import ADAPTERS, AdapterResult
from medtl.data.manifest import Manifest, Row, Sample

__all__ = ["ADAPTERS", "AdapterResult", "Manifest", "Row", "Sample"]
