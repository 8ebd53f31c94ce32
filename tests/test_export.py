"""``medtl export``: model card, ONNX file (parity with PyTorch) and a MONAI bundle that MONAI's
own tools load and run; a model that does not export leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medtl.calibrate import PlattScaling, TemperatureScaling, VectorScaling
from medtl.cli import main
from medtl.data.dataset import DataConfig, deterministic_transforms
from medtl.demo import make_phantom
from medtl.evaluate import CalibrateConfig, DataSpec, EvaluateConfig, ModelSpec, calibrate_model
from medtl.evaluate import evaluate as run_evaluate
from medtl.export import ExportError, export_model
from medtl.export.network import CalibratedClassifier, export_onnx
from medtl.finetune.loop import load_classifier
from tests.conftest import train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@torch.library.custom_op("medtl_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    """An operator ONNX knows nothing of."""
    return x.clone()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataSpec]:
    """A tiny classifier fine-tuned on a phantom, with a temperature fitted on validation."""
    base = tmp_path_factory.mktemp("export")
    root = train_tiny(base, base / "model")
    calibrate_model(base / "model", CalibrateConfig(method="temperature", compare=[]))
    return base / "model", DataSpec(base / "m.csv", root, "phantom")


@pytest.fixture(scope="module")
def exported(trained: tuple[Path, DataSpec], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "out"
    export_model(trained[0], out)
    return out


def test_export_writes_card_onnx_and_bundle(exported: Path, trained: tuple[Path, DataSpec]) -> None:
    record = json.loads((exported / "export.json").read_text())
    for name in ("model_card.md", "model_card.html", "model_card.json", "model.onnx"):
        assert name in record["files"], name
    assert "bundle/configs/inference.json" in record["files"]
    assert "bundle/models/model.ts" in record["files"]
    assert record["onnx"]["max_abs_diff"] <= 1e-4
    _, card = load_classifier(trained[0])
    md = (exported / "model_card.md").read_text()
    assert card.manifest_sha256 in md
    assert card.calibrator.label() in md
    assert "## Intended use" in md and "## Limitations" in md
    assert "<h2>Licence of the pretrained source</h2>" in (exported / "model_card.html").read_text()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".out.")]
    umask = os.umask(0)
    os.umask(umask)
    assert exported.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's private 0700


@pytest.mark.parametrize("batch", [1, 7])
def test_onnx_agrees_with_pytorch_for_any_batch_size(
    exported: Path, trained: tuple[Path, DataSpec], batch: int
) -> None:
    import onnxruntime as ort

    model, card = load_classifier(trained[0])
    net = CalibratedClassifier(model, card.calibrator, len(card.classes)).eval()
    x = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(batch))
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["probabilities"], {"image": x.numpy()})
    with torch.no_grad():
        logits = model(x).numpy()
    assert got.shape == (batch, 2)
    np.testing.assert_allclose(got, card.calibrator.probs(logits), atol=1e-4)
    np.testing.assert_allclose(got, net(x).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "calibrator",
    [
        TemperatureScaling(temperature=1.7),
        VectorScaling(scale=[0.5, 2.0], bias=[0.3, -0.1]),
        PlattScaling(a=1.3, b=-0.4),
    ],
)
def test_calibrated_network_applies_the_calibrator(calibrator: object) -> None:
    from medtl.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("medtl_tiny_convnext", 2, 1).eval()
    net = CalibratedClassifier(model, calibrator, 2)  # type: ignore[arg-type]
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = calibrator.probs(model(x).double().numpy())  # type: ignore[attr-defined]
        np.testing.assert_allclose(net(x).numpy(), expected, atol=1e-5)


def _medtl_probs(trained: tuple[Path, DataSpec], root: Path, rel: str) -> np.ndarray:
    """Calibrated probabilities of one image read the way medtl's evaluation reads it."""
    model, card = load_classifier(trained[0])
    cfg = DataConfig(image_size=card.image_size, channels=card.in_chans)
    sample: dict = {"image": rel}
    for t in deterministic_transforms(cfg, root):
        sample = t(sample)
    with torch.no_grad():
        logits = model(sample["image"][None]).double().numpy()
    return card.calibrator.probs(logits)[0]


def _images(tmp_path: Path) -> list[Path]:
    """A grey image larger than the model's input (shrunk) and an RGB one (to luminance)."""
    rng = np.random.default_rng(0)
    grey = tmp_path / "grey.png"
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(grey)
    rgb = tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(rgb)
    return [grey, rgb]


def test_monai_config_parser_runs_the_bundle_as_medtl_predicts(
    exported: Path, trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    from monai.bundle import ConfigParser

    files = _images(tmp_path)
    parser = ConfigParser()
    parser.read_config(str(exported / "bundle" / "configs" / "inference.json"))
    parser.read_meta(str(exported / "bundle" / "configs" / "metadata.json"))
    parser["bundle_root"] = str(exported / "bundle")
    parser["input_files"] = [str(f) for f in files]
    parser["output_file"] = str(tmp_path / "p.json")
    probs = parser.get_parsed_content("probabilities").numpy()
    for i, f in enumerate(files):
        np.testing.assert_allclose(probs[i], _medtl_probs(trained, tmp_path, f.name), atol=1e-4)


def test_monai_bundle_run_writes_predictions(exported: Path, tmp_path: Path) -> None:
    """``monai.bundle.run``, the function behind ``python -m monai.bundle run`` (whose command
    line also needs the ``fire`` package)."""
    from monai.bundle import run

    bundle = tmp_path / "bundle"
    shutil.copytree(exported / "bundle", bundle)
    files = [str(f) for f in _images(tmp_path)]
    configs = bundle / "configs"
    run(
        config_file=str(configs / "inference.json"),
        meta_file=str(configs / "metadata.json"),
        bundle_root=str(bundle),
        input_files=files,
    )
    rows = json.loads((bundle / "predictions.json").read_text())
    assert [r["file"] for r in rows] == files
    for r in rows:
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


class _Unexportable(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(wobble(x))


def test_unexportable_operator_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not export to ONNX") as info:
        export_onnx(_Unexportable(torch.nn.Identity()), torch.rand(2, 1, 8, 8), tmp_path / "m.onnx")
    assert "\n" not in str(info.value)


def test_failed_export_leaves_no_folder(
    trained: tuple[Path, DataSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import medtl.finetune.loop as loop

    real = loop.load_classifier

    def broken(folder: Path) -> tuple:
        model, card = real(folder)
        return _Unexportable(model), card

    monkeypatch.setattr(loop, "load_classifier", broken)
    out = tmp_path / "exports" / "m"
    assert main(["export", str(trained[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medtl: error: the model does not export to ONNX") and "\n" not in err
    assert list((tmp_path / "exports").iterdir()) == []  # neither OUT nor its temporary folder


def test_export_refuses_an_existing_folder(trained: tuple[Path, DataSpec], tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert main(["export", str(trained[0]), "--out", str(tmp_path / "out")]) == 2
    assert list((tmp_path / "out").iterdir()) == []


def test_card_carries_the_evaluations_metrics_with_cis(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    folder, data = trained
    run_evaluate(
        [ModelSpec(folder, "m")],
        [data],
        tmp_path / "eval",
        EvaluateConfig(n_boot=100),
        progress=False,
    )
    entry = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["entries"][0]
    auroc = entry["metrics"]["overall"]["macro_auroc"]
    out = tmp_path / "out"
    export_model(folder, out, tmp_path / "eval", formats=["card"], intended_use="Phantom tests.")
    md = (out / "model_card.md").read_text()
    assert f"{auroc['value']:.3f} [{auroc['ci_low']:.3f}, {auroc['ci_high']:.3f}]" in md
    assert "Phantom tests." in md
    assert not (out / "model.onnx").exists()


def test_clinic_outputs_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    from tests.test_benchmark_scripts import load_script

    script = load_script("clinic_outputs")
    root = make_phantom(tmp_path / "phantom", n=48, size=32, seed=0, duplicates=0)
    lines = script.run("folder", root, tmp_path / "out", "medtl_tiny_convnext", 1, 32)
    assert any(line.startswith("test macro_auroc: ") for line in lines)
    assert lines.count("Grad-CAM layer: backbone.stages.0") == 1
    assert (tmp_path / "out" / "export" / "model.onnx").is_file()
    assert "Explanations (test split)" in (tmp_path / "out" / "report" / "report.html").read_text()


def test_card_of_a_run_folder_is_named_for_the_run(
    trained: tuple[Path, DataSpec], tmp_path: Path
) -> None:
    folder = tmp_path / "runs" / "busi" / "finetune"
    shutil.copytree(trained[0], folder)
    export_model(folder, tmp_path / "card", formats=["card"])
    assert (tmp_path / "card" / "model_card.md").read_text().startswith("# Model card: busi\n")
