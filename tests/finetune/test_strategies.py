"""Fine-tuning strategies: what trains, at which rate, and what stays exactly as loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from medtl.errors import ConfigError
from medtl.finetune import STRATEGIES, LoRA, Plan, blocks_of, merge_lora, plan
from medtl.models import Classifier, build_classifier
from medtl.train import CHECKPOINT, Schedule, fit, supervised_step

BASE_LR = 1e-3


class Blobs(Dataset):
    """Three classes of 32x32 one-channel images: noise plus a class-dependent square."""

    def __init__(self, n: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.rand(n, 1, 32, 32, generator=g) * 0.3
        for k in range(3):
            self.images[self.labels == k, :, 4 + 8 * k : 12 + 8 * k, 8:24] += 0.6

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _model(backbone: str = "test_resnet", seed: int = 0) -> Classifier:
    """A tiny classifier for 32x32 one-channel images."""
    torch.manual_seed(seed)
    extra = {"img_size": 32} if backbone == "medtl_tiny_vit" else {}
    return build_classifier(backbone, num_classes=3, in_chans=1, **extra)


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    data = Blobs(n)
    return {"image": data.images, "label": data.labels}


def _optimizer(p: Plan) -> torch.optim.AdamW:
    """AdamW over the plan's groups with each group's lr set as ``fit`` sets it."""
    opt = torch.optim.AdamW(p.param_groups, lr=BASE_LR)
    for g in opt.param_groups:
        g["lr"] = BASE_LR * g["lr_scale"]
    return opt


def _train_steps(model: nn.Module, p: Plan, steps: int = 2) -> torch.optim.AdamW:
    opt = _optimizer(p)
    model.train()
    p.train_mode(model)
    batch = _batch()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch["image"]), batch["label"]).backward()
        opt.step()
    return opt


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _block(name: str) -> str:
    return name.removesuffix(".no_decay")


# -- freezing -------------------------------------------------------------------------------------
def test_frozen_blocks_keep_weights_and_batchnorm_statistics_under_fit() -> None:
    model = _model()
    blocks = blocks_of(model)
    p = plan("surgical", model, blocks, last=1)
    assert p.trainable_blocks == ["stage4", "head"]
    before = _snapshot(model)
    fit(
        model,
        supervised_step,
        p.param_groups,
        Blobs(),
        Schedule(epochs=1, lr=1e-2, batch_size=8),
        train_mode=p.train_mode,
        progress=False,
    )
    after = model.state_dict()
    for b in blocks:
        names = b.param_names + b.buffer_names
        changed = [n for n in names if not torch.equal(before[n], after[n])]
        if b.name in p.trainable_blocks:
            assert changed, f"trainable block {b.name} did not change"
        else:
            assert changed == [], f"frozen block {b.name} changed: {changed[:3]}"
    moved = [n for n in blocks[-2].buffer_names if "running_mean" in n]
    assert moved and all(not torch.equal(before[n], after[n]) for n in moved)


def test_train_mode_puts_only_frozen_batchnorm_in_eval() -> None:
    model = _model()
    p = plan("surgical", model, blocks=["stage2"])
    model.train()
    p.train_mode(model)
    modes = {n: m.training for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert {n for n, training in modes.items() if training} == {
        n for n in modes if n.startswith("backbone.layer2.")
    }


def test_frozen_parameters_have_no_gradient_and_no_optimizer_state() -> None:
    model = _model()
    p = plan("surgical", model, first=2)
    assert p.trainable_blocks == ["stem", "stage1", "head"]
    grouped = {id(q) for g in p.param_groups for q in g["params"]}
    for block in blocks_of(model):
        trains = block.name in p.trainable_blocks
        for name, q in model.named_parameters():
            if name in block.param_names:
                assert q.requires_grad is trains and (id(q) in grouped) is trains
    opt = _train_steps(model, p, steps=1)
    with_state = {id(q) for q in opt.state}
    assert with_state == grouped
    assert all(q.grad is None for q in model.parameters() if not q.requires_grad)


def test_weight_decay_spares_biases_norms_and_tokens() -> None:
    model = _model("medtl_tiny_vit")
    p = plan("full", model, weight_decay=0.1)
    names = {id(q): n for n, q in model.named_parameters()}
    for g in p.param_groups:
        for q in g["params"]:
            spared = q.ndim <= 1 or names[id(q)] in {"backbone.pos_embed", "backbone.cls_token"}
            assert g["weight_decay"] == (0.0 if spared else 0.1), names[id(q)]
    assert {g["name"] for g in p.param_groups} >= {"stem", "stem.no_decay", "head"}


def test_without_weight_decay_the_optimizer_default_applies() -> None:
    model = _model()
    p = plan("surgical", model, last=1)
    assert [g["weight_decay"] for g in p.describe()["groups"]] == [None, 0.0, None, 0.0]
    opt = torch.optim.AdamW(p.param_groups, weight_decay=0.3)  # as fit passes schedule's
    decays = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decays == {"stage4": 0.3, "stage4.no_decay": 0.0, "head": 0.3, "head.no_decay": 0.0}


def test_full_and_linear() -> None:
    model = _model("medtl_tiny_convnext")
    full = plan("full", model)
    assert full.trainable_fraction == 1.0 and {g["lr_scale"] for g in full.param_groups} == {1.0}
    linear = plan("linear", model)
    assert linear.trainable_blocks == ["head"]
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trainable == {"backbone.head.fc.weight", "backbone.head.fc.bias"}
    assert linear.trainable_fraction == pytest.approx(linear.trainable_params / full.total_params)


def test_full_backbone_lr_scale_lowers_every_block_but_the_head() -> None:
    model = _model("medtl_tiny_convnext")
    p = plan("full", model, backbone_lr_scale=0.1)
    scales = {g["name"].removesuffix(".no_decay"): g["lr_scale"] for g in p.param_groups}
    assert scales == {
        "stem": 0.1,
        "stage1": 0.1,
        "stage2": 0.1,
        "stage3": 0.1,
        "stage4": 0.1,
        "head": 1.0,
    }
    assert p.trainable_fraction == 1.0
    with pytest.raises(ConfigError, match="backbone_lr_scale"):
        plan("full", model, backbone_lr_scale=2.0)


# -- genome -------------------------------------------------------------------------------------------
def test_genome_learning_rates_follow_the_genes() -> None:
    model = _model("medtl_tiny_convnext")  # stem, stage1..4, head
    genes = [0.2, 0.75, 0.5, 1.0, 0.0, 0.9]
    p = plan("genome", model, genes=genes, threshold=0.5)
    assert p.trainable_blocks == ["stage1", "stage3", "head"]  # 0.5 does not exceed 0.5
    expected = {"stage1": 10**0.5, "stage3": 10.0, "head": 10**0.8}  # 10 ** (2 * (g - 0.5))
    opt = _optimizer(p)
    assert {_block(g["name"]) for g in opt.param_groups} == set(expected)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(BASE_LR * expected[_block(g["name"])], rel=1e-12)
    frozen = [n for n, q in model.named_parameters() if not q.requires_grad]
    assert any(n.startswith("backbone.stages.1.") for n in frozen)
    assert not any(n.startswith("backbone.stages.0.") for n in frozen)


def test_genome_below_threshold_trains_only_the_head_at_base_rate() -> None:
    model = _model()
    p = plan("genome", model, genes=[0.1] * len(blocks_of(model)), threshold=0.6)
    assert p.trainable_blocks == ["head"]
    assert {g["lr_scale"] for g in p.param_groups} == {1.0}
    assert p.describe()["head_only_guard"] is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"genes": [0.5] * 3, "threshold": 0.5}, "one value per block, 6"),
        ({"genes": [0.5, 1.5, 0.5, 0.5, 0.5, 0.5], "threshold": 0.5}, r"genes\[1\]=1.5"),
        ({"genes": [0.5] * 6, "threshold": -0.1}, "threshold=-0.1"),
        ({"genes": [0.5] * 6, "threshold": True}, "threshold=True"),
        ({"genes": [0.5] * 6}, "needs option.*threshold"),
    ],
)
def test_genome_validation(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan("genome", _model(), **options)


# -- surgical ---------------------------------------------------------------------------------------
def test_surgical_unknown_block_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown block 'stage9'.*stem, stage1, .*head"):
        plan("surgical", _model(), blocks=["stage9"])
    with pytest.raises(ConfigError, match="did you mean 'stage2'"):
        plan("surgical", _model(), blocks=["stag2"])


@pytest.mark.parametrize(
    "options", [{}, {"first": 1, "last": 1}, {"last": 9}, {"first": 1.5}, {"blocks": "stage1"}]
)
def test_surgical_option_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="surgical"):
        plan("surgical", _model(), **options)


# -- registry and options -----------------------------------------------------------------------------
def test_unknown_strategy_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'surgical'"):
        plan("surgicl", _model())
    assert STRATEGIES.names() == ["autorgn", "full", "genome", "linear", "lora", "lpft", "surgical"]


def test_unknown_option_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="no option 'lst'; did you mean 'last'"):
        plan("surgical", _model(), lst=1)


def test_describe_is_json() -> None:
    model = _model()
    p = plan("genome", model, genes=[0.9, 0.1, 0.1, 0.1, 0.7, 0.6], threshold=0.5)
    d = json.loads(json.dumps(p.describe()))
    assert d["strategy"] == "genome" and d["options"]["threshold"] == 0.5
    assert d["trainable_blocks"] == ["stem", "stage4", "head"]
    assert d["frozen_norm_layers"] > 0
    assert sum(g["params"] for g in d["groups"]) == d["trainable_params"]


# -- Auto-RGN -------------------------------------------------------------------------------------------
def _loader() -> DataLoader:
    return DataLoader(Blobs(24), batch_size=8, shuffle=True)


def _scales(p: Plan) -> dict[str, float]:
    return {g["name"]: g["lr_scale"] for g in p.param_groups}


def test_autorgn_weights_lie_in_0_1_with_max_1_and_follow_the_weights() -> None:
    model = _model("medtl_tiny_vit")
    p = plan("autorgn", model, data=_loader(), n_batches=2)
    assert len(p.param_groups) == len(list(model.parameters())) and p.trainable_fraction == 1.0
    assert p.on_epoch_start is not None
    p.on_epoch_start(model, 0)
    first = _scales(p)
    assert all(0.0 < s <= 1.0 for s in first.values()) and max(first.values()) == 1.0
    p.on_epoch_start(model, 0)
    assert _scales(p) == first  # same weights, same (seeded) batches: same answer
    _train_steps(model, plan("full", model), steps=3)
    p.on_epoch_start(model, 1)
    second = _scales(p)
    assert second != first and max(second.values()) == 1.0


def test_autorgn_ranks_the_body_apart_from_a_new_head() -> None:
    model = _model()
    head = set(blocks_of(model)[-1].param_names)
    with torch.no_grad():  # a new head starts small (medtl.models.init_head): huge ||g|| / ||w||
        for n, q in model.named_parameters():
            if n in head:
                q.mul_(1e-3)
    scales: dict[bool, dict[str, float]] = {}
    for rank_head in (False, True):
        p = plan("autorgn", model, data=_loader(), rank_head=rank_head)
        assert p.on_epoch_start is not None
        p.on_epoch_start(model, 0)
        scales[rank_head] = _scales(p)
        assert head and max(scales[rank_head][n] for n in head) == 1.0
        assert all(0.0 <= s <= 1.0 for s in scales[rank_head].values())
    # by default the head trains at 1x outside the ranking, and so does the body's fastest tensor
    assert all(scales[False][n] == 1.0 for n in head)
    body = {k: sorted(s for n, s in v.items() if n not in head) for k, v in scales.items()}
    assert max(body[False]) == 1.0
    median = {k: v[len(v) // 2] for k, v in body.items()}
    assert median[False] > 100 * median[True]  # ranked with the head, the body barely moves


def test_autorgn_rank_head_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="rank_head='yes'"):
        plan("autorgn", _model(), data=_loader(), rank_head="yes")


def test_autorgn_calibration_leaves_optimizer_grads_and_batchnorm_alone() -> None:
    model = _model()  # BatchNorm
    p = plan("autorgn", model, data=_loader())
    opt = _train_steps(model, p, steps=1)
    state = {id(q): {k: v.clone() for k, v in s.items()} for q, s in opt.state.items()}
    grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.eval()
    model.backbone.layer1.train()
    assert p.on_epoch_start is not None
    p.on_epoch_start(model, 1)
    assert max(_scales(p).values()) == 1.0
    assert all(torch.equal(v, opt.state[q][k]) for q in opt.state for k, v in state[id(q)].items())
    assert all(torch.equal(q.grad, grads[n]) for n, q in model.named_parameters() if n in grads)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    training = {n for n, m in model.named_modules() if m.training}
    assert training == {n for n, _ in model.named_modules() if n.startswith("backbone.layer1")}


def test_autorgn_needs_calibration_data() -> None:
    with pytest.raises(ValueError, match="calibration"):
        plan("autorgn", _model())


def test_autorgn_weights_reach_the_optimizer_of_fit(tmp_path: Path) -> None:
    model = _model("medtl_tiny_vit")
    p = plan("autorgn", model, data=_loader())
    sched = Schedule(epochs=1, lr=1e-3, batch_size=8)
    fit(model, supervised_step, p.param_groups, Blobs(), sched, tmp_path, **_hooks(p))
    saved = torch.load(tmp_path / CHECKPOINT, weights_only=True)["optimizer"]["param_groups"]
    assert [g["lr_scale"] for g in saved] == [g["lr_scale"] for g in p.param_groups]


def _hooks(p: Plan) -> dict[str, Any]:
    return {"train_mode": p.train_mode, "on_epoch_start": p.on_epoch_start, "progress": False}


# -- LoRA -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["medtl_tiny_vit", "medtl_tiny_convnext"])
def test_lora_starts_as_the_base_model_and_trains_adapters_and_head(backbone: str) -> None:
    model = _model(backbone).eval()
    x = _batch()["image"]
    reference = model(x)
    p = plan("lora", model, rank=2)
    assert p.notes["adapted_modules"] > 0
    assert torch.equal(model.eval()(x), reference)
    trainable = [n for n, q in model.named_parameters() if q.requires_grad]
    assert trainable and all(
        ".lora_a." in n or ".lora_b." in n or n.startswith("backbone.head") for n in trainable
    )
    assert not any(n.startswith("backbone.head.norm") for n in trainable)
    assert p.trainable_fraction < 0.15
    opt = torch.optim.AdamW(p.param_groups, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    adapted = model.eval()(x)
    assert not torch.allclose(adapted, reference)
    assert any(q.abs().sum() > 0 for n, q in model.named_parameters() if ".lora_b." in n)


def test_lora_skips_depthwise_convs_and_the_head_and_merges_back() -> None:
    model = _model("medtl_tiny_convnext").eval()
    names = [n for n, _ in model.named_parameters()]
    plan("lora", model, rank=2, targets="all")
    modules = dict(model.named_modules())
    assert type(modules["backbone.stages.0.blocks.0.conv_dw"]) is nn.Conv2d
    assert isinstance(modules["backbone.stages.0.blocks.0.mlp.fc1"], LoRA)
    assert isinstance(modules["backbone.stem.0"], LoRA)
    assert type(modules["backbone.head.fc"]) is nn.Linear
    with torch.no_grad():
        for n, q in model.named_parameters():
            if ".lora_b." in n:
                q.normal_(std=0.1)
    x = _batch(4)["image"]
    adapted = model(x)
    assert merge_lora(model) > 0
    assert [n for n, _ in model.named_parameters()] == names
    torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-5)


def test_lora_targets_linear_only_leaves_convs() -> None:
    model = _model("test_resnet")
    p = plan("lora", model, targets="linear")
    assert p.notes["adapted_modules"] == 0  # the head is the only Linear, and it trains fully
    with pytest.raises(ConfigError, match="targets='attn'"):
        plan("lora", _model(), targets="attn")


# -- LP-FT ------------------------------------------------------------------------------------------------
def _lpft_fit(model: nn.Module, p: Plan, out: Path | None, **kw: Any) -> Any:
    sched = Schedule(epochs=2, lr=1e-2, batch_size=8)  # 3 steps an epoch
    return fit(model, supervised_step, p.param_groups, Blobs(), sched, out, **_hooks(p), **kw)


def test_lpft_moves_only_the_head_while_probing_then_every_block() -> None:
    model = _model()
    blocks = blocks_of(model)
    p = plan("lpft", model, blocks, probe_epochs=1)
    assert p.trainable_fraction == 1.0 and p.describe()["probe_epochs"] == 1
    assert {_block(g["name"]): g["lr_scale"] for g in p.param_groups}["stage1"] == 0.0
    before = _snapshot(model)
    after_probe: dict[str, torch.Tensor] = {}

    def keep(m: nn.Module, epoch: int, _: dict[str, float]) -> None:
        if epoch == 0:
            after_probe.update(_snapshot(m))

    _lpft_fit(model, p, None, on_epoch_end=keep)
    after = model.state_dict()
    for b in blocks:
        names = b.param_names + b.buffer_names
        probed = [n for n in names if not torch.equal(before[n], after_probe[n])]
        tuned = [n for n in b.param_names if not torch.equal(after_probe[n], after[n])]
        assert (probed != []) is (b.name == "head"), f"{b.name} while probing: {probed[:3]}"
        assert tuned, f"block {b.name} did not train after the probe"
    assert {g["lr_scale"] for g in p.param_groups} == {1.0}


def test_lpft_backbone_lr_scale_applies_after_the_probe() -> None:
    model = _model()
    p = plan("lpft", model, probe_epochs=2, backbone_lr_scale=0.1)
    for epoch, want in ((0, 0.0), (1, 0.0), (2, 0.1), (0, 0.0)):
        assert p.on_epoch_start is not None
        p.on_epoch_start(model, epoch)
        scales = {_block(g["name"]): g["lr_scale"] for g in p.param_groups}
        assert scales.pop("head") == 1.0 and set(scales.values()) == {want}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "needs option\\(s\\) probe_epochs"),
        ({"probe_epochs": 0}, "probe_epochs=0; expected an integer >= 1"),
        ({"probe_epochs": 1.5}, "probe_epochs=1.5"),
        ({"probe_epochs": True}, "probe_epochs=True"),
        ({"probe_epochs": 1, "backbone_lr_scale": 2}, "backbone_lr_scale=2"),
    ],
)
def test_lpft_option_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan("lpft", _model(), **options)


@pytest.mark.parametrize("stop_after", [2, 4])  # killed while probing / after the probe
def test_lpft_resumes_bit_equal_after_a_kill(tmp_path: Path, stop_after: int) -> None:
    whole = _model()
    _lpft_fit(whole, plan("lpft", whole, probe_epochs=1), tmp_path / "whole")
    first = _model()
    out = tmp_path / "killed"
    stopped = _lpft_fit(
        first, plan("lpft", first, probe_epochs=1), out, stop_after_steps=stop_after
    )
    assert stopped.steps == stop_after
    again = _model()
    _lpft_fit(again, plan("lpft", again, probe_epochs=1), out)
    expected, got = whole.state_dict(), again.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
