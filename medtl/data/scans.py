"""Private scans: DICOM and NIfTI readers and adapters (being written)."""

from __future__ import annotations
