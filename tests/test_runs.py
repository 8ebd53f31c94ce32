"""Run folders and batches: one writer at a time, honest exit codes, clear lines for broken
models and unwritable outputs, no stray temporary files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medtl.cli import main
from medtl.demo import make_phantom
from medtl.errors import EXIT_FAILURES, EXIT_USER_ERROR

RECIPE = """\
name: tiny
data:
  adapter: folder
  loader: {image_size: 32, channels: 1}
finetune:
  backbone: medtl_tiny_convnext
  strategy: full
  epochs: 1
  batch_size: 16
evaluate:
  n_boot: 100
report:
  thumbnails: false
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished ``medtl run`` (fine-tune 1 epoch, calibrate, evaluate, report) on a phantom."""
    base = tmp_path_factory.mktemp("tiny")
    make_phantom(base / "data", n=24, size=32, seed=1)
    (base / "tiny.yaml").write_text(RECIPE)
    assert main(["-q", *run_args(base)]) == 0
    return base


def run_args(base: Path, out: str = "run") -> list[str]:
    return [
        "run",
        str(base / "tiny.yaml"),
        "--data-root",
        str(base / "data"),
        "--out",
        str(base / out),
        "--device",
        "cpu",
    ]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- one writer per run folder ----------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(
    tiny_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from medtl.runs import RunLock; "
            "RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)",
            str(tiny_run / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done = {p: p.read_text() for p in (tiny_run / "run").glob("*/DONE")}
        assert main(["-q", *run_args(tiny_run)]) == EXIT_USER_ERROR
        err = one_error_line(capsys)
        assert f"is in use by process {holder.pid}" in err and "LOCK" in err
        assert {p: p.read_text() for p in (tiny_run / "run").glob("*/DONE")} == done
    finally:
        holder.send_signal(signal.SIGKILL)  # the lock dies with its process
        holder.wait()
    assert main(["-q", *run_args(tiny_run)]) == 0


def test_stray_temporary_files_are_removed_when_a_run_completes(tiny_run: Path) -> None:
    stray = tiny_run / "run" / "finetune" / ".model.safetensors.k2j4h5.tmp"
    stray.write_bytes(b"half a checkpoint")  # what kill -9 during an atomic write leaves
    keep = tiny_run / "run" / "finetune" / "notes.tmp"  # not an atomic write's name
    keep.write_text("mine")
    assert main(["-q", *run_args(tiny_run)]) == 0
    assert not stray.exists() and keep.exists()


# -- exit codes of a batch ---------------------------------------------------------------------
def evaluate_args(tiny_run: Path, out: Path, *models: Path) -> list[str]:
    data = f"{tiny_run / 'run' / 'data' / 'manifest.csv'}:{tiny_run / 'data'}@phantom"
    model_args = [a for m in models for a in ("--model", str(m))]
    return ["-q", "evaluate", *model_args, "--data", data, "--out", str(out), "--n-boot", "100"]


def test_evaluate_with_failures_exits_non_zero_and_lists_them(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good, gone = tiny_run / "run" / "finetune", tmp_path / "no-such-model"
    capsys.readouterr()
    assert main(evaluate_args(tiny_run, tmp_path / "some", good, gone)) == EXIT_FAILURES
    err = capsys.readouterr().err
    assert "1 of 2 evaluation(s) failed" in err and "no-such-model" in err
    entries = json.loads((tmp_path / "some" / "evaluation.json").read_text())["entries"]
    assert [e["status"] for e in entries] == ["ok", "failed"]
    assert main(evaluate_args(tiny_run, tmp_path / "none", gone)) == EXIT_FAILURES
    assert "1 of 1 evaluation(s) failed" in capsys.readouterr().err
    assert main(["-q", "report", str(tmp_path / "some"), "--out", str(tmp_path / "rep")]) == 0
    assert "no-such-model" in (tmp_path / "rep" / "report.html").read_text()
    assert EXIT_FAILURES not in (0, 1, EXIT_USER_ERROR)


def test_a_truncated_model_is_one_clear_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "cut"
    shutil.copytree(tiny_run / "run" / "finetune", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(evaluate_args(tiny_run, tmp_path / "ev", model)) == EXIT_FAILURES
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{weights} cannot be read" in err and "truncated or corrupt" in err
    assert main(["-q", "calibrate", str(model)]) == 0  # calibration reads predictions only


# -- unwritable outputs, found before the long work ----------------------------------------------
def test_unwritable_outputs_are_refused_before_work_starts(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = blocker / "out"  # nothing can be created under a file, not even by root
    import medtl.data.prepare

    def no_audit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the audit started before the output was checked")

    monkeypatch.setattr(medtl.data.prepare, "inspect_all", no_audit)
    argv = ["-q", "prepare", "folder", str(tiny_run / "data"), "-o", str(bad / "m.csv")]
    assert main(argv) == EXIT_USER_ERROR
    assert f"output folder {bad} is not writable" in one_error_line(capsys)
    monkeypatch.undo()
    for argv in (
        run_args(tiny_run, out=str(bad)),
        evaluate_args(tiny_run, bad, tiny_run / "run" / "finetune"),
        ["report", str(tiny_run / "run" / "evaluate"), "--out", str(bad)],
    ):
        assert main(argv) == EXIT_USER_ERROR, argv
        assert f"{bad} is not writable" in one_error_line(capsys)


def test_a_read_only_model_folder_is_refused_at_calibrate(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    model = tmp_path / "ro"
    shutil.copytree(tiny_run / "run" / "finetune", model)
    import medtl.io

    def read_only(*args: object, dir: Path, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(medtl.io.tempfile, "mkstemp", read_only)
    assert main(["-q", "calibrate", str(model)]) == EXIT_USER_ERROR
    assert f"output folder {model} is not writable (Permission denied)" in one_error_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["report", str(tmp_path), "--out", str(folder)]) == EXIT_USER_ERROR
        assert "is not writable (Permission denied)" in one_error_line(capsys)
    finally:
        folder.chmod(0o755)


# -- every file a recipe names is checked first ----------------------------------------------------
def test_bad_weights_fail_check_and_run_before_any_training(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    pickled = tmp_path / "whole_model.pt"  # a whole module pickled, as torch.save(model) does
    torch.save(torch.nn.Linear(2, 2), pickled)
    recipe = tmp_path / "r.yaml"
    for weights, needle in (
        (tmp_path / "missing.safetensors", "missing.safetensors does not exist"),
        (pickled, "whole_model.pt is a pickle of Python objects"),
    ):
        recipe.write_text(
            RECIPE.replace("  strategy: full", f"  strategy: full\n  weights: {weights}")
            + "pretrain: {backbone: medtl_tiny_convnext, epochs: 1, batch_size: 16}\n"
        )
        capsys.readouterr()
        check = ["check", str(recipe), "--data-root", str(tiny_run / "data")]
        assert main(check) == EXIT_USER_ERROR
        err = one_error_line(capsys)
        assert needle in err and any(
            fix in err for fix in ("torch.save(model.state_dict()", "give the path", "give a local")
        )
        out = tmp_path / "run"
        argv = ["-q", "run", str(recipe), "--data-root", str(tiny_run / "data"), "--out", str(out)]
        assert main(argv) == EXIT_USER_ERROR
        assert needle in one_error_line(capsys)
        assert not (out / "pretrain").exists()


def test_weights_for_another_backbone_fail_check(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "r.yaml"
    weights = tiny_run / "run" / "finetune" / "model.safetensors"  # medtl_tiny_convnext
    recipe.write_text(
        RECIPE.replace("medtl_tiny_convnext", "convnext_atto").replace(
            "  strategy: full", f"  strategy: full\n  weights: {weights}"
        )
    )
    assert main(["check", str(recipe), "--data-root", str(tiny_run / "data")]) == EXIT_USER_ERROR
    assert f"weights file {weights}" in one_error_line(capsys)
    recipe.write_text(RECIPE.replace("  strategy: full", f"  strategy: full\n  weights: {weights}"))
    assert main(["check", str(recipe), "--data-root", str(tiny_run / "data")]) == 0
    assert "loads into medtl_tiny_convnext" in capsys.readouterr().out


# -- changed data is never used nor skipped over ------------------------------------------------
def test_a_changed_image_stops_check_load_evaluate_and_a_rerun(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    other = tmp_path / "other"  # another copy of the data, one image replaced
    shutil.copytree(tiny_run / "data", other)
    manifest = tiny_run / "run" / "data" / "manifest.csv"
    victim = "benign/phantom_0002.png"
    assert victim in manifest.read_text()
    Image.open(other / victim).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other / victim)
    done = {p: p.read_text() for p in (tiny_run / "run").glob("*/DONE")}
    changed = f"{other / victim} changed since the manifest was made"

    argv = ["-q", *run_args(tiny_run)]
    argv[argv.index("--data-root") + 1] = str(other)
    assert main(argv) == EXIT_USER_ERROR
    assert changed in one_error_line(capsys)
    assert {p: p.read_text() for p in (tiny_run / "run").glob("*/DONE")} == done

    for split in ("train", "val", "test"):
        if main(["-q", "load", str(manifest), "--data-root", str(other), "--split", split]) != 0:
            assert changed in one_error_line(capsys)
            break
    else:
        raise AssertionError("no split read the changed image")
    data = f"{manifest}:{other}@phantom"
    model = str(tiny_run / "run" / "finetune")
    split = next(line.split(",")[4] for line in manifest.read_text().splitlines() if victim in line)
    argv = ["-q", "evaluate", "--model", model, "--data", data, "--split", split]
    assert main([*argv, "--out", str(tmp_path / "ev"), "--n-boot", "100"]) == EXIT_FAILURES
    assert changed in capsys.readouterr().err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data: {{adapter: folder, manifest: {manifest}}}\n")
    assert main(["-q", "check", str(recipe), "--data-root", str(other)]) == EXIT_USER_ERROR
    assert changed in one_error_line(capsys)
    assert main(["check", str(recipe), "--data-root", str(tiny_run / "data")]) == 0
    assert "all files present and unchanged" in capsys.readouterr().out


def test_unchanged_files_are_not_hashed_again(tiny_run: Path) -> None:
    from medtl.data.manifest import Manifest
    from medtl.data.verify import verify_data

    manifest = Manifest.load(tiny_run / "run" / "data" / "manifest.csv")
    data = tiny_run / "data"
    verify_data(manifest, data)
    assert verify_data(manifest, data) == 0  # size and time as recorded: nothing hashed
    touched = data / manifest.rows[0].path
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    assert verify_data(manifest, data) == 1  # same content, new time: hashed and accepted
    assert verify_data(manifest, data) == 0


def test_a_changed_external_test_set_is_not_skipped_over(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    external = tmp_path / "hospital-b"
    shutil.copytree(tiny_run / "data", external)
    manifest = tiny_run / "run" / "data" / "manifest.csv"
    recipe = tmp_path / "ext.yaml"
    recipe.write_text(
        RECIPE.replace("  n_boot: 100", f"  n_boot: 100\n  external: ['{manifest}:{external}@b']")
    )
    argv = ["-q", "run", str(recipe), "--data-root", str(tiny_run / "data")]
    argv += ["--out", str(tmp_path / "run"), "--device", "cpu"]
    assert main(argv) == 0
    rows = [line.split(",") for line in manifest.read_text().splitlines()[1:]]
    victim = external / next(r[1] for r in rows if r[4] == "test")  # evaluate reads test only
    Image.open(victim).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(victim)
    capsys.readouterr()
    assert main(argv) == EXIT_USER_ERROR
    assert f"{victim} changed since the manifest was made" in one_error_line(capsys)


def test_a_corrupt_prediction_sidecar_is_one_line_at_calibrate(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_run / "run" / "finetune", model)
    side = model / "predictions_val.json"
    side.write_text(side.read_text()[:20])
    assert main(["-q", "calibrate", str(model)]) == EXIT_USER_ERROR
    assert f"prediction sidecar {side} is not valid JSON" in one_error_line(capsys)


def test_run_manifest_is_the_prepared_one_else_the_recipes(tmp_path: Path) -> None:
    from medtl.runs import run_manifest

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("data:\n  manifest: data_manifests/busi.csv\n")
    assert run_manifest(run) == Path("data_manifests/busi.csv")
    assert run_manifest(run, tmp_path) == tmp_path / "data_manifests" / "busi.csv"
    (run / "data").mkdir()
    (run / "data" / "manifest.csv").write_text("")
    assert run_manifest(run, tmp_path) == run / "data" / "manifest.csv"
