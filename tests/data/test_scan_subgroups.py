"""DICOM subgroups: PatientSex and a ten-year band of PatientAge, nothing finer, no identifier."""

from __future__ import annotations

from pathlib import Path

import pytest

from medtl.data import ADAPTERS
from medtl.data.manifest import parse_subgroups
from tests.data.test_scans import ACCESSION, BIRTH, NAME, PATIENT_ID, grey, write_dicom


@pytest.mark.parametrize(
    ("sex", "age", "expected"),
    [
        ("F", "045Y", {"sex": "female", "age": "40-49"}),
        ("M", "080Y", {"sex": "male", "age": "80-89"}),
        ("O", "006M", {"sex": "other", "age": "0-9"}),
        ("F", "45", {"sex": "female", "age": "unknown"}),  # not the DICOM AS format
        (None, "012Y", {"age": "10-19"}),
        ("M", None, {"sex": "male"}),
    ],
)
def test_dicom_sex_and_age_band(
    tmp_path: Path, sex: str | None, age: str | None, expected: dict[str, str]
) -> None:
    attrs = {k: v for k, v in (("PatientSex", sex), ("PatientAge", age)) if v is not None}
    write_dicom(tmp_path / "p1" / "1.dcm", grey([1, 2]), **attrs)
    (sample,) = ADAPTERS.get("dicom")(tmp_path).samples
    assert parse_subgroups(sample.subgroups or "") == expected
    for secret in (NAME, PATIENT_ID, BIRTH, ACCESSION, "045", "006M"):
        assert secret not in (sample.subgroups or "")


def test_dicom_without_sex_or_age_has_no_subgroups(tmp_path: Path) -> None:
    write_dicom(tmp_path / "p1" / "1.dcm", grey([1, 2]))  # the writer sets neither
    (sample,) = ADAPTERS.get("dicom")(tmp_path).samples
    assert sample.subgroups is None
