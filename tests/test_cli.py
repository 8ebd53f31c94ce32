"""The command line: each bad input is one clear line naming the file, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from medtl.cli import main
from medtl.data.readers import read_array
from medtl.errors import DataError
from tests.conftest import write_png


def _dataset(root: Path, n: int = 12) -> Path:
    for i in range(n):
        write_png(root / ("a" if i % 2 else "b") / f"{i}.png", (40, 32), seed=i)
    return root


def _prepared(tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    root = _dataset(tmp_path / "data")
    out = tmp_path / "m.csv"
    assert main(["-q", "prepare", "folder", str(root), "-o", str(out), *extra]) == 0
    return root, out


def _user_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run ``argv``; expect exit 2 and a one-line message containing ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("medtl: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def test_prepare_writes_manifest_sidecar_and_audit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out = _prepared(tmp_path)
    assert out.is_file() and out.with_suffix(".json").is_file()
    audit = json.loads((tmp_path / "m.audit.json").read_text())
    assert audit["n_items"] == 12 and audit["problems"] == []
    assert "manifest" in capsys.readouterr().out


def test_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _user_error(
        capsys,
        ["prepare", "busi", str(tmp_path / "nope"), "-o", str(tmp_path / "m.csv")],
        "nope",
        "does not exist",
    )
    assert not (tmp_path / "m.csv").exists()


def test_load_missing_data_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out = _prepared(tmp_path)
    _user_error(
        capsys, ["load", str(out), "--data-root", str(tmp_path / "gone")], "gone", "--data-root"
    )


def test_manifest_row_whose_file_is_gone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "1,0,0")
    (root / "a" / "1.png").unlink()
    _user_error(capsys, ["load", str(out), "--data-root", str(root)], "1.png", "does not exist")
    assert main(["audit", str(out), "--data-root", str(root), "--strict"]) == 1
    audit = json.loads((tmp_path / "m.audit.json").read_text())
    assert audit["problem_counts"] == {"missing": 1}


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd"])
def test_manifest_path_escaping_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    root, out = _prepared(tmp_path)
    out.write_text(out.read_text().replace("a/1.png", bad))
    _user_error(capsys, ["load", str(out), "--data-root", str(root)], bad, "data root")


@pytest.mark.parametrize("kind", ["zero-byte", "truncated"])
def test_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "1,0,0")
    victim = root / "a" / "3.png"
    victim.write_bytes(b"" if kind == "zero-byte" else victim.read_bytes()[:150])
    _user_error(capsys, ["load", str(out), "--data-root", str(root)], "3.png")
    # prepare leaves the broken file out of the manifest and lists it in the audit
    assert main(["-q", "prepare", "folder", str(root), "-o", str(tmp_path / "m2.csv")]) == 0
    assert "a/3.png" not in (tmp_path / "m2.csv").read_text()
    audit = json.loads((tmp_path / "m2.audit.json").read_text())
    assert [p["file"] for p in audit["problems"]] == ["a/3.png"]
    assert (
        main(["-q", "prepare", "folder", str(root), "-o", str(tmp_path / "m3.csv"), "--strict"])
        == 1
    )


def test_decompression_bomb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "1,0,0")
    Image.new("1", (12000, 12000)).save(root / "a" / "1.png")  # 144 MP in a few kB
    # the manifest knew another image: loading stops at the changed file before decoding it
    _user_error(capsys, ["load", str(out), "--data-root", str(root)], "1.png", "changed since")
    with pytest.raises(DataError, match=r"1\.png is too large .*decompression bomb"):
        read_array(root / "a" / "1.png")
    assert main(["-q", "prepare", "folder", str(root), "-o", str(tmp_path / "m2.csv")]) == 0
    audit = json.loads((tmp_path / "m2.audit.json").read_text())
    assert audit["problem_counts"] == {"too-large": 1}


def test_label_not_in_class_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    (root / "labels.csv").write_text("path,label\na/1.png,a\nb/0.png,c\n")
    _user_error(
        capsys,
        ["prepare", "csv", str(root), "-o", str(tmp_path / "m.csv"), "-O", "classes=a,b"],
        "labels.csv",
        "'c'",
    )
    _, out = _prepared(tmp_path)
    out.write_text(out.read_text().replace(",a,", ",z,", 1))
    _user_error(capsys, ["load", str(out), "--data-root", str(root)], "m.csv", "'z'", "class list")


def test_empty_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "0.8,0.2,0")
    _user_error(
        capsys, ["load", str(out), "--data-root", str(root), "--split", "test"], "'test'", "empty"
    )


def test_unknown_adapter_and_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _user_error(
        capsys,
        ["prepare", "bsui", str(tmp_path), "-o", str(tmp_path / "m.csv")],
        "did you mean 'busi'",
    )
    _user_error(
        capsys,
        ["prepare", "busi", str(tmp_path), "-o", str(tmp_path / "m.csv"), "-O", "axis=1"],
        "no option(s) axis",
    )


def test_bad_split_ratios(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _user_error(
        capsys,
        [
            "prepare",
            "folder",
            str(tmp_path),
            "-o",
            str(tmp_path / "m.csv"),
            "--split-ratios",
            "0.5,0.5",
        ],
        "--split-ratios",
    )


def test_load_reads_a_split(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "1,0,0")
    assert main(["load", str(out), "--data-root", str(root), "--image-size", "32"]) == 0
    assert "loaded 12 images" in capsys.readouterr().out


def test_list_adapters(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "adapters"]) == 0
    out = capsys.readouterr().out
    for name in (
        "busi",
        "isic2018",
        "kvasir",
        "covid19_radiography",
        "brain_tumor_mri",
        "medmnist",
        "folder",
        "csv",
        "dicom",
        "nifti",
    ):
        assert f"  {name} " in out


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medtl.cli",
            "prepare",
            "busi",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "x.csv"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_worker_traceback_is_reduced_to_the_message() -> None:
    from medtl.cli import one_line
    from medtl.errors import DataError

    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nmedtl.errors.DataError: /d/a.png does not exist; restore it'
    )
    assert one_line(wrapped) == "/d/a.png does not exist; restore it"


def test_dicom_without_pixel_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from tests.data.test_scans import write_dicom

    root = tmp_path / "scans"
    write_dicom(root / "a" / "ok.dcm", np.zeros((8, 8), np.uint16))
    write_dicom(root / "a" / "report.dcm", np.zeros((8, 8), np.uint16), PixelData=None)
    _user_error(
        capsys,
        ["prepare", "dicom", str(root), "-o", str(tmp_path / "m.csv")],
        "report.dcm",
        "no pixel data",
    )
    assert not (tmp_path / "m.csv").exists()


def test_nifti_with_nans(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from tests.data.test_scans import write_nifti

    volume = np.ones((8, 8, 4), np.float32)
    volume[2, 2, 1] = np.nan
    write_nifti(tmp_path / "vols" / "v1.nii.gz", volume)
    _user_error(
        capsys,
        ["prepare", "nifti", str(tmp_path / "vols"), "-o", str(tmp_path / "m.csv")],
        "v1.nii.gz",
        "NaN",
    )


def test_no_patient_identifier_reaches_manifest_audit_or_output(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    import numpy as np

    from tests.data import test_scans as scans

    root = tmp_path / "scans"
    rng = np.random.default_rng(0)
    for i in range(8):
        scans.write_dicom(
            root / ("a" if i % 2 else "b") / f"img{i}.dcm",
            rng.integers(0, 4000, (40, 40)).astype(np.uint16),
            PatientID=f"PID-{i % 3:04d}77",
        )
    assert (
        main(
            [
                "prepare",
                "dicom",
                str(root),
                "-o",
                str(tmp_path / "m.csv"),
                "-O",
                "label_from=folder",
            ]
        )
        == 0
    )
    written = "".join(p.read_text() for p in tmp_path.glob("m*"))
    said = capsys.readouterr()
    text = written + said.out + said.err + caplog.text
    for secret in (
        scans.NAME,
        "Doe",
        "Jane",
        scans.BIRTH,
        scans.ACCESSION,
        *(f"PID-{k:04d}77" for k in range(3)),
    ):
        assert secret not in text, secret
    assert {"patient-0001", "patient-0002", "patient-0003"} <= set(
        written.replace(",", " ").split()
    )


def test_a_data_root_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, out = _prepared(tmp_path, "--split-ratios", "1,0,0")
    image = root / "a" / "1.png"
    _user_error(capsys, ["prepare", "busi", str(image), "-o", str(tmp_path / "x.csv")], "is a file")
    _user_error(
        capsys, ["load", str(out), "--data-root", str(image)], "1.png is a file, not a folder"
    )
    _user_error(capsys, ["audit", str(out), "--data-root", str(image)], "is a file, not a folder")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{adapter: folder, manifest: {out}}}\n")
    _user_error(capsys, ["check", str(recipe), "--data-root", str(image)], "is a file")


def test_a_link_out_of_the_data_root_is_left_out_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    write_png(tmp_path / "elsewhere" / "x.png", seed=99)
    (root / "a" / "x.png").symlink_to(tmp_path / "elsewhere" / "x.png")
    out = tmp_path / "m.csv"
    assert main(["-q", "prepare", "folder", str(root), "-o", str(out), "--strict"]) == 1
    audit = json.loads((tmp_path / "m.audit.json").read_text())
    assert audit["problem_counts"] == {"outside-root": 1}
    assert "a/x.png" not in out.read_text()


def test_a_message_of_several_lines_keeps_the_file_and_the_fix() -> None:
    from medtl.cli import one_line
    from medtl.errors import ConfigError

    exc = ConfigError(
        "weights file /w/x.pt cannot be read (Weights only load failed.\n\tdetail); fix it"
    )
    assert (
        one_line(exc)
        == "weights file /w/x.pt cannot be read (Weights only load failed. detail); fix it"
    )


def test_an_option_given_twice_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _dataset(tmp_path / "data")
    argv = ["prepare", "nifti", str(root), "-o", str(tmp_path / "m.csv"), "-O", "axis=0"]
    _user_error(capsys, [*argv, "-O", "axis=2"], "option 'axis' is given twice")


@pytest.mark.parametrize(
    ("argv", "method"),
    [
        (["calibrate", "m1", "--method", "vector"], "CalibrateStage.calibrate"),
        (["evaluate", "--model", "m", "--data", "d.csv:r", "--out", "o"], "EvaluateStage.evaluate"),
        (["report", "ev", "--out", "o", "--rank-by", "official"], "ReportStage.report"),
    ],
)
def test_single_stage_commands_run_the_stage_objects_of_medtl_run(
    argv: list[str],
    method: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``medtl calibrate / evaluate / report`` reach their stage through the same objects that
    ``medtl run`` uses, configured from the command line."""
    import medtl.pipeline as pipeline
    from medtl.errors import ConfigError

    calls: list[tuple[object, tuple[object, ...]]] = []

    def reached(self: object, *args: object, **kwargs: object) -> None:
        calls.append((self, args))
        raise ConfigError("reached")

    owner, name = method.split(".")
    monkeypatch.setattr(getattr(pipeline, owner), name, reached)
    assert main(argv) == 2 and "reached" in capsys.readouterr().err
    assert len(calls) == 1
    stage, args = calls[0]
    if owner == "CalibrateStage":
        assert stage.config.method == "vector" and args == (Path("m1"),)  # type: ignore[attr-defined]
    elif owner == "EvaluateStage":
        assert stage.config.splits == ["test"] and args[2] == Path("o")  # type: ignore[attr-defined]
    else:
        assert stage.config.rank_by == "official" and args[:2] == (Path("ev"), Path("o"))  # type: ignore[attr-defined]
