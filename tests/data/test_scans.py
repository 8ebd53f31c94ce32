"""DICOM and NIfTI readers and adapters, on tiny files built in tmp_path."""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_windowing
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from medtl.data import ADAPTERS
from medtl.data.readers import read_array
from medtl.data.scans import read_dicom, read_nifti
from medtl.errors import DataError

NAME, PATIENT_ID, BIRTH, ACCESSION = "Doe^Jane", "PID123", "19700101", "ACC98765"


# -- fixtures -------------------------------------------------------------------------------
def write_dicom(path: Path, pixels: np.ndarray, **attrs: Any) -> Path:
    """A DICOM file holding ``pixels`` (grey ``[H, W]`` / ``[N, H, W]`` or RGB ``[..., 3]``).

    ``attrs`` set header elements; ``None`` removes one; ``PixelData=None`` writes no pixels.
    """
    rgb = pixels.dtype == np.uint8 and pixels.shape[-1] == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(path)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH
    ds.AccessionNumber = ACCESSION
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.4242"
    frames = pixels.shape[:-3] if rgb else pixels.shape[:-2]
    if frames:
        ds.NumberOfFrames = frames[0]
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    bits = 8 * pixels.dtype.itemsize
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(np.issubdtype(pixels.dtype, np.signedinteger))
    ds.PixelData = pixels.tobytes()
    with warnings.catch_warnings():  # some tests write deliberately invalid values
        warnings.simplefilter("ignore")
        for key, value in attrs.items():
            if value is None:
                del ds[key]
            else:
                setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey(*rows: list[int], dtype: Any = np.uint16) -> np.ndarray:
    return np.array(rows, dtype=dtype)


def write_nifti(path: Path, volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(volume, np.eye(4)).to_filename(str(path))
    return path


def slab_volume() -> np.ndarray:
    """``[6, 5, 4]`` zeros whose slices along axis 2 hold 0, 1, 2 and 30 bright voxels."""
    vol = np.zeros((6, 5, 4), dtype=np.float32)
    vol[0, 0, 1] = 5.0
    vol[0, :2, 2] = 5.0
    vol[:, :, 3] = np.arange(30, dtype=np.float32).reshape(6, 5) + 1.0
    return vol


dicom = ADAPTERS.get("dicom")
nifti = ADAPTERS.get("nifti")


# -- DICOM reader: value transforms ---------------------------------------------------------
def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    # modality values 2 * stored - 100 = [-100, 0, 100, 200]; window [-100, 100]
    f = write_dicom(
        tmp_path / "ct.dcm",
        grey([0, 50, 100, 150]),
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=0,
        WindowWidth=200,
        VOILUTFunction="LINEAR_EXACT",
    )
    out = read_dicom(f)
    assert out.shape == (1, 1, 4) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [0.0, 0.5, 1.0, 1.0])


def test_linear_window_edges_and_centre(tmp_path: Path) -> None:
    # DICOM LINEAR: 0 at x <= c - 0.5 - (w - 1) / 2 = 0, 1 above c - 0.5 + (w - 1) / 2 = 200
    f = write_dicom(
        tmp_path / "w.dcm", grey([0, 1, 100, 200, 250]), WindowCenter=100.5, WindowWidth=201
    )
    np.testing.assert_allclose(read_dicom(f)[0, 0], [0.0, 0.005, 0.5, 1.0, 1.0], atol=1e-7)


def test_first_of_several_windows_is_used(tmp_path: Path) -> None:
    f = write_dicom(
        tmp_path / "w.dcm", grey([0, 100, 200]), WindowCenter=[100.5, 5000], WindowWidth=[201, 10]
    )
    np.testing.assert_allclose(read_dicom(f)[0, 0], [0.0, 0.5, 1.0], atol=1e-7)


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_window_matches_pydicom(tmp_path: Path, function: str) -> None:
    """Oracle: pydicom's apply_windowing, mapped from its 16-bit output range to [0, 1]."""
    stored = np.arange(0, 4000, 5, dtype=np.uint16).reshape(20, 40)
    f = write_dicom(
        tmp_path / "w.dcm",
        stored,
        RescaleSlope=1.5,
        RescaleIntercept=-1024,
        WindowCenter=40,
        WindowWidth=400,
        VOILUTFunction=function,
    )
    ds = dcmread(f)
    y_min, y_max = -1024.0, (2**16 - 1) * 1.5 - 1024
    expected = (apply_windowing(apply_modality_lut(stored, ds), ds) - y_min) / (y_max - y_min)
    np.testing.assert_allclose(read_dicom(f)[0], expected, atol=1e-6)


def test_voi_lut_sequence_then_min_max(tmp_path: Path) -> None:
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [4, 0, 16])
    item.add_new("LUTData", "US", [0, 10, 20, 1000])
    f = write_dicom(tmp_path / "lut.dcm", grey([0, 1, 2, 3]), VOILUTSequence=[item])
    np.testing.assert_allclose(read_dicom(f)[0, 0], [0.0, 0.01, 0.02, 1.0], atol=1e-7)


def test_without_voi_values_are_min_maxed(tmp_path: Path) -> None:
    f = write_dicom(tmp_path / "plain.dcm", grey([10, 20], [30, 50]))
    np.testing.assert_allclose(read_dicom(f)[0], [[0.0, 0.25], [0.5, 1.0]])


def test_signed_pixels(tmp_path: Path) -> None:
    f = write_dicom(tmp_path / "s.dcm", grey([-1000, 0, 1000], dtype=np.int16))
    np.testing.assert_allclose(read_dicom(f)[0, 0], [0.0, 0.5, 1.0])


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = grey([0, 300, 900], [1200, 60, 5])
    two = read_dicom(write_dicom(tmp_path / "m2.dcm", pixels))
    one = read_dicom(
        write_dicom(tmp_path / "m1.dcm", pixels, PhotometricInterpretation="MONOCHROME1")
    )
    np.testing.assert_allclose(one, 1.0 - two, atol=1e-7)
    assert one[0, 0, 0] == 1.0 and two[0, 0, 0] == 0.0


def test_rgb_gives_three_channels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = read_dicom(write_dicom(tmp_path / "rgb.dcm", pixels))
    assert out.shape == (3, 5, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.moveaxis(pixels, -1, 0) / 255.0, atol=1e-7)


def test_nan_pixels_are_refused(tmp_path: Path) -> None:
    arr = np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32)
    f = write_dicom(
        tmp_path / "nan.dcm",
        grey([0, 0], [0, 0]),
        PixelData=None,
        FloatPixelData=arr.tobytes(),
        BitsAllocated=32,
        BitsStored=None,
        HighBit=None,
        PixelRepresentation=None,
    )
    with pytest.raises(DataError, match=r"nan\.dcm.*NaN"):
        read_dicom(f)


# -- DICOM reader: frames and broken files ----------------------------------------------------
def test_each_frame_reads_its_own_pixels(tmp_path: Path) -> None:
    frames = np.stack([np.full((3, 4), v, dtype=np.uint16) for v in (0, 25, 50)])
    f = write_dicom(
        tmp_path / "cine.dcm",
        frames,
        WindowCenter=50,
        WindowWidth=100,
        VOILUTFunction="LINEAR_EXACT",
    )
    for k, expected in enumerate([0.0, 0.25, 0.5]):
        out = read_dicom(f, f"frame={k}")
        assert out.shape == (1, 3, 4)
        np.testing.assert_array_equal(out, expected)
    for bad in ("", "frame=3", "slice=1"):
        with pytest.raises(DataError, match=r"cine\.dcm.*frame=0"):
            read_dicom(f, bad)


def test_multiframe_gives_one_sample_per_frame(tmp_path: Path) -> None:
    write_dicom(tmp_path / "cine.dcm", np.zeros((4, 3, 3), dtype=np.uint16))
    write_dicom(tmp_path / "single.dcm", grey([1, 2]))
    samples = dicom(tmp_path).samples
    assert [s.key for s in samples] == [
        "cine.dcm#frame=0",
        "cine.dcm#frame=1",
        "cine.dcm#frame=2",
        "cine.dcm#frame=3",
        "single.dcm",
    ]


def test_no_pixel_data_is_refused_with_the_file_name(tmp_path: Path) -> None:
    f = write_dicom(tmp_path / "series" / "DICOMDIR.dcm", grey([1, 2]), PixelData=None)
    with pytest.raises(DataError, match=r"DICOMDIR\.dcm has no pixel data.*remove it"):
        read_dicom(f)
    with pytest.raises(DataError, match=r"DICOMDIR\.dcm has no pixel data"):
        dicom(tmp_path)


def test_corrupt_dicom_names_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(DataError, match=r"junk\.dcm is not a readable DICOM file"):
        read_dicom(junk)
    with pytest.raises(DataError, match=r"junk\.dcm is not a readable DICOM file"):
        dicom(tmp_path)
    whole = write_dicom(tmp_path / "cut.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    whole.write_bytes(whole.read_bytes()[:-40])  # truncated inside the pixel data
    with pytest.raises(DataError, match=r"cut\.dcm: its pixel data cannot be decoded"):
        read_dicom(whole)


# -- DICOM adapter ---------------------------------------------------------------------------
def test_dicom_unlabelled_for_pretraining(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a" / "1.dcm", grey([1, 2]))
    write_dicom(tmp_path / "a" / ".hidden.dcm", grey([1, 2]))
    write_dicom(tmp_path / ".cache" / "2.dcm", grey([1, 2]))
    write_dicom(tmp_path / "a" / "IM0002", grey([1, 2]))  # found by its DICM marker
    (tmp_path / "a" / "notes.txt").write_text("not a scan")
    result = dicom(tmp_path)
    assert result.classes == []
    assert [s.path for s in result.samples] == ["a/1.dcm", "a/IM0002"]
    assert all(s.label is None for s in result.samples)


def test_dicom_labels_from_folder(tmp_path: Path) -> None:
    write_dicom(tmp_path / "normal" / "s1" / "1.dcm", grey([1, 2]))
    write_dicom(tmp_path / "pneumonia" / "2.dcm", grey([1, 2]))
    result = dicom(tmp_path, label_from="folder")
    assert result.classes == ["normal", "pneumonia"]
    assert [s.label for s in result.samples] == ["normal", "pneumonia"]
    write_dicom(tmp_path / "loose.dcm", grey([1, 2]))
    with pytest.raises(DataError, match=r"loose\.dcm lies directly in the data root"):
        dicom(tmp_path, label_from="folder")


def test_dicom_labels_from_csv_longest_prefix_wins(tmp_path: Path) -> None:
    for rel in ("study1/s1/1.dcm", "study1/s2/1.dcm", "study1/s2/2.dcm", "study2/1.dcm"):
        write_dicom(tmp_path / rel, grey([1, 2]))
    (tmp_path / "labels.csv").write_text(
        "path,label\nstudy1,benign\nstudy1/s2/,malignant\nstudy1/s2/2.dcm,benign\nstudy2/1.dcm,\n"
    )
    result = dicom(tmp_path, labels="labels.csv")
    assert result.classes == ["benign", "malignant"]
    assert [s.label for s in result.samples] == ["benign", "malignant", "benign", None]
    write_dicom(tmp_path / "study3" / "1.dcm", grey([1, 2]))
    with pytest.raises(DataError, match=r"study3/1\.dcm matches no row of .*labels\.csv"):
        dicom(tmp_path, labels="labels.csv")


def test_dicom_label_options_are_checked(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a" / "1.dcm", grey([1, 2]))
    with pytest.raises(DataError, match="label_from='csv' is not one of none, folder"):
        dicom(tmp_path, label_from="csv")
    with pytest.raises(DataError, match="not both"):
        dicom(tmp_path, labels="labels.csv", label_from="folder")
    with pytest.raises(DataError, match=r"label table .*missing\.csv does not exist"):
        dicom(tmp_path, labels="missing.csv")


def test_groups_are_pseudonyms_in_order_of_first_appearance(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a" / "1.dcm", grey([1, 2]), PatientID="ZZZ-2")
    write_dicom(tmp_path / "b" / "1.dcm", grey([1, 2]), PatientID="AAA-1")
    write_dicom(tmp_path / "b" / "2.dcm", grey([1, 2]), PatientID="AAA-1")
    write_dicom(tmp_path / "c" / "1.dcm", grey([1, 2]), PatientID="ZZZ-2")
    groups = [s.group for s in dicom(tmp_path).samples]
    assert groups == ["patient-0001", "patient-0002", "patient-0002", "patient-0001"]


def test_group_falls_back_to_study_then_folder(tmp_path: Path) -> None:
    study = {"PatientID": None, "StudyInstanceUID": "1.2.3.4"}
    bare = {"PatientID": None, "StudyInstanceUID": None}
    write_dicom(tmp_path / "a" / "1.dcm", grey([1, 2]), **study)
    write_dicom(tmp_path / "b" / "1.dcm", grey([1, 2]), **study)
    write_dicom(tmp_path / "c" / "1.dcm", grey([1, 2]), **bare)
    write_dicom(tmp_path / "c" / "2.dcm", grey([1, 2]), **bare)
    write_dicom(tmp_path / "d" / "1.dcm", grey([1, 2]), **bare)
    groups = [s.group for s in dicom(tmp_path).samples]
    assert groups == ["patient-0001"] * 2 + ["patient-0002"] * 2 + ["patient-0003"]


def test_no_identifier_reaches_samples_warnings_or_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # an invalid UI value makes pydicom's validation quote it in a warning and a log line
    bad_uid = "1.2.SECRET-UID"
    write_dicom(
        tmp_path / "x" / "1.dcm",
        grey([1, 2]),
        PatientID=None,
        StudyInstanceUID=bad_uid,
        PatientName="Roe^Richard",
    )
    write_dicom(tmp_path / "y" / "cine.dcm", np.zeros((2, 2, 2), dtype=np.uint16))
    caplog.clear()  # writing the fixture logged the invalid UID; reading it must not
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = dicom(tmp_path, label_from="folder").samples
    text = repr(samples) + "\n".join(str(w.message) for w in caught) + caplog.text
    assert len(samples) == 3
    for secret in (
        NAME,
        "Doe",
        "Jane",
        "Roe",
        "Richard",
        PATIENT_ID,
        BIRTH,
        ACCESSION,
        bad_uid,
        "1.2.826.0.1.3680043.8.498.4242",
    ):
        assert secret.lower() not in text.lower()


@pytest.mark.parametrize("folder", ["PID123", "scans/pid123_ct", "doe_jane", "JANE DOE"])
def test_path_with_patient_identifier_is_refused_without_printing_it(
    tmp_path: Path, folder: str
) -> None:
    write_dicom(tmp_path / "0-anon" / "1.dcm", grey([1, 2]), PatientID="X9", PatientName="A^B")
    write_dicom(tmp_path / folder / "img.dcm", grey([1, 2]))
    with pytest.raises(DataError) as info:
        dicom(tmp_path)
    message = str(info.value)
    assert "DICOM file no. 2" in message and "pseudonyms" in message
    for secret in ("pid123", "doe", "jane", folder.lower(), str(tmp_path).lower()):
        assert secret not in message.lower()


def test_ids_inside_longer_words_and_placeholders_are_not_refused(tmp_path: Path) -> None:
    # ID 001 inside IMG0001, family name Lee inside 'sleep', 2-letter names ignored
    write_dicom(
        tmp_path / "sleep" / "IMG0001.dcm", grey([1, 2]), PatientID="001", PatientName="Lee^Al"
    )
    write_dicom(tmp_path / "al" / "1.dcm", grey([1, 2]), PatientName="Lee^Al")
    # anonymisers' placeholders do not block the pseudonymous layout the refusal advises
    write_dicom(
        tmp_path / "patient-0003" / "1.dcm",
        grey([1, 2]),
        PatientID="ANON",
        PatientName="Anonymous^Patient",
    )
    write_dicom(tmp_path / "scan---4" / "1.dcm", grey([1, 2]), PatientID="---")
    assert len(dicom(tmp_path).samples) == 4


def test_empty_dicom_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="holds no DICOM files"):
        dicom(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        dicom(tmp_path / "absent")


# -- NIfTI reader ----------------------------------------------------------------------------
def expected_slice(plane: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(plane, [0.5, 99.5])
    return np.clip((plane - lo) / (hi - lo), 0, 1)


def test_slice_equals_the_volume_slice_after_scaling(tmp_path: Path) -> None:
    vol = np.random.default_rng(1).normal(100, 30, (8, 7, 5)).astype(np.float32)
    f = write_nifti(tmp_path / "v.nii.gz", vol)
    out = read_nifti(f, "axis=2/slice=3")
    assert out.shape == (1, 8, 7) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], expected_slice(vol[:, :, 3]), atol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(
        read_nifti(f, "axis=0/slice=1")[0], expected_slice(vol[1]), atol=1e-6
    )


def test_constant_slice_reads_as_zeros(tmp_path: Path) -> None:
    vol = np.full((4, 4, 2), 7.0, dtype=np.float32)
    f = write_nifti(tmp_path / "flat.nii", vol)
    np.testing.assert_array_equal(read_nifti(f, "axis=2/slice=1"), np.zeros((1, 4, 4)))


def test_nan_slice_is_refused(tmp_path: Path) -> None:
    vol = np.ones((4, 4, 3), dtype=np.float32)
    vol[1, 1, 2] = np.nan
    f = write_nifti(tmp_path / "nan.nii.gz", vol)
    assert read_nifti(f, "axis=2/slice=0").shape == (1, 4, 4)
    with pytest.raises(DataError, match=r"nan\.nii\.gz .*NaN.*fix or mask the NaNs"):
        read_nifti(f, "axis=2/slice=2")


def test_bad_nifti_locators_and_shapes(tmp_path: Path) -> None:
    f = write_nifti(tmp_path / "v.nii", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(DataError, match=re.escape("must be 'axis=<0|1|2>/slice=<k>'")):
        read_nifti(f, "slice=1")
    with pytest.raises(DataError, match="has 3 slices along axis 2, not 4"):
        read_nifti(f, "axis=2/slice=3")
    four = write_nifti(tmp_path / "fmri.nii.gz", np.zeros((4, 4, 3, 2), dtype=np.float32))
    with pytest.raises(
        DataError, match=r"fmri\.nii\.gz has shape \(4, 4, 3, 2\); .*3D volumes only"
    ):
        read_nifti(four, "axis=2/slice=0")


# -- NIfTI adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize(("axis", "count", "shape"), [(0, 6, (1, 5, 4)), (2, 4, (1, 6, 5))])
def test_slices_along_an_axis(
    tmp_path: Path, axis: int, count: int, shape: tuple[int, ...]
) -> None:
    vol = np.random.default_rng(2).uniform(1, 2, (6, 5, 4)).astype(np.float32)
    write_nifti(tmp_path / "v.nii.gz", vol)
    result = nifti(tmp_path, axis=axis, min_foreground=0.0)
    assert result.classes == []
    assert [s.locator for s in result.samples] == [f"axis={axis}/slice={k}" for k in range(count)]
    assert {s.group for s in result.samples} == {"v.nii.gz"}
    assert all(s.label is None for s in result.samples)
    assert read_array(tmp_path / "v.nii.gz", result.samples[-1].locator).shape == shape


def test_empty_slices_are_skipped(tmp_path: Path) -> None:
    # 1st percentile is 0 (background); slices hold 0/30, 1/30, 2/30 and 30/30 voxels above it
    write_nifti(tmp_path / "v.nii.gz", slab_volume())
    kept = [s.locator for s in nifti(tmp_path).samples]  # min_foreground 0.05
    assert kept == ["axis=2/slice=2", "axis=2/slice=3"]
    kept = [s.locator for s in nifti(tmp_path, min_foreground=0.03).samples]
    assert kept == ["axis=2/slice=1", "axis=2/slice=2", "axis=2/slice=3"]
    as_text = nifti(tmp_path, axis="2", min_foreground="0.03").samples  # as -O passes them
    assert [s.locator for s in as_text] == kept


def test_negative_background_counts_as_empty(tmp_path: Path) -> None:
    vol = slab_volume() - 1024.0  # CT-like air at -1024
    write_nifti(tmp_path / "ct.nii", vol)
    assert [s.locator for s in nifti(tmp_path).samples] == ["axis=2/slice=2", "axis=2/slice=3"]


def test_nan_volume_is_refused_at_scan_time(tmp_path: Path) -> None:
    vol = np.ones((4, 4, 3), dtype=np.float32)
    vol[0, 0, 0] = np.nan
    write_nifti(tmp_path / "sub" / "bad.nii.gz", vol)
    with pytest.raises(DataError, match=r"bad\.nii\.gz contains NaN"):
        nifti(tmp_path)


def test_nifti_labels_and_groups(tmp_path: Path) -> None:
    vol = np.random.default_rng(3).uniform(1, 2, (4, 4, 2)).astype(np.float32)
    for rel in ("tumour/a.nii.gz", "tumour/b.nii", "healthy/c.nii.gz"):
        write_nifti(tmp_path / rel, vol)
    by_folder = nifti(tmp_path, label_from="folder", min_foreground=0.0)
    assert by_folder.classes == ["healthy", "tumour"]
    assert [(s.path, s.label, s.group) for s in by_folder.samples][::2] == [
        ("healthy/c.nii.gz", "healthy", "healthy/c.nii.gz"),
        ("tumour/a.nii.gz", "tumour", "tumour/a.nii.gz"),
        ("tumour/b.nii", "tumour", "tumour/b.nii"),
    ]
    (tmp_path / "labels.csv").write_text(
        "path,label,group\ntumour/a.nii.gz,grade2,MRN-555\ntumour/b.nii,grade3,MRN-555\n"
        "healthy,normal,\n"
    )
    by_csv = nifti(tmp_path, labels="labels.csv", min_foreground=0.0)
    assert by_csv.classes == ["grade2", "grade3", "normal"]
    assert [(s.label, s.group) for s in by_csv.samples][::2] == [
        ("normal", "healthy/c.nii.gz"),
        ("grade2", "patient-0001"),
        ("grade3", "patient-0001"),
    ]
    assert "MRN-555" not in repr(by_csv.samples)


def test_nifti_options_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no NIfTI volumes"):
        nifti(tmp_path)
    write_nifti(tmp_path / "v.nii", np.zeros((3, 3, 3), dtype=np.float32))
    with pytest.raises(DataError, match="axis=3 is not 0, 1 or 2"):
        nifti(tmp_path, axis=3)
    with pytest.raises(DataError, match=r"min_foreground=1\.5 must be in \[0, 1\)"):
        nifti(tmp_path, min_foreground=1.5)
    with pytest.raises(DataError, match="no slice of the 1 volume"):
        nifti(tmp_path)


# -- dispatch through readers.read_array -------------------------------------------------------
def test_read_array_dispatches_dicom_and_nifti(tmp_path: Path) -> None:
    pixels = grey([10, 20], [30, 50])
    expected = np.array([[[0.0, 0.25], [0.5, 1.0]]])
    np.testing.assert_allclose(read_array(write_dicom(tmp_path / "a.dcm", pixels)), expected)
    np.testing.assert_allclose(read_array(write_dicom(tmp_path / "IM0001", pixels)), expected)
    vol = np.random.default_rng(4).normal(0, 1, (5, 6, 3)).astype(np.float32)
    f = write_nifti(tmp_path / "v.nii.gz", vol)
    np.testing.assert_allclose(
        read_array(f, "axis=1/slice=2")[0], expected_slice(vol[:, 2]), atol=1e-6
    )


def test_deflated_files_are_checked_for_pixel_data(tmp_path: Path) -> None:
    for name, pixel_data in (("with.dcm", grey([0, 2]).tobytes()), ("without.dcm", None)):
        f = write_dicom(tmp_path / name, grey([0, 2]), PixelData=pixel_data)
        ds = dcmread(f)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    np.testing.assert_array_equal(read_dicom(tmp_path / "with.dcm"), [[[0.0, 1.0]]])
    with pytest.raises(DataError, match=r"without\.dcm has no pixel data"):
        read_dicom(tmp_path / "without.dcm")


def test_an_empty_volume_and_empty_slices_are_counted_and_listed(tmp_path: Path) -> None:
    from medtl.data.prepare import prepare

    write_nifti(tmp_path / "a.nii.gz", slab_volume())
    write_nifti(tmp_path / "zero.nii.gz", np.zeros((6, 5, 4), dtype=np.float32))
    result = nifti(tmp_path)
    assert {s.path for s in result.samples} == {"a.nii.gz"}
    assert [(e.what, e.count) for e in result.left_out] == [
        ("zero.nii.gz", 4),
        ("the other 1 volume(s)", 4 - len(result.samples)),
    ]
    assert "empty or constant volume" in result.left_out[0].reason
    audit = prepare("nifti", tmp_path, tmp_path / "out" / "m.csv", ratios={"train": 1.0}).audit
    assert [e["what"] for e in audit.left_out] == ["zero.nii.gz", "the other 1 volume(s)"]
    assert "left out: 4 from zero.nii.gz" in audit.summary()
