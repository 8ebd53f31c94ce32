"""Weight decay: tokens, position embeddings, norms and biases are never decayed, in
pretraining (the MAE's AdamW groups) and in fine-tuning (every strategy's groups)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medtl.finetune.strategies import plan
from medtl.models import build_classifier
from medtl.pretrain.loop import param_groups
from medtl.pretrain.mae import build_mae

TOKENS = ("cls_token", "pos_embed", "mask_token")


def _decay_by_name(model: nn.Module, groups: list[dict]) -> dict[str, float]:
    """``{parameter name: its group's weight decay}`` for every tensor in ``groups``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, float] = {}
    for g in groups:
        for p in g["params"]:
            out[names[id(p)]] = g.get("weight_decay", -1.0)
    return out


def _norm_and_bias_names(model: nn.Module) -> set[str]:
    out = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    for prefix, module in model.named_modules():
        if (
            isinstance(module, nn.LayerNorm | nn.GroupNorm | nn.BatchNorm2d)
            or "norm" in type(module).__name__.lower()
        ):
            out |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
    return out


@pytest.mark.parametrize("backbone", ["medtl_tiny_vit", "medtl_tiny_convnext"])
def test_pretraining_decays_no_token_norm_or_bias(backbone: str) -> None:
    mae = build_mae(backbone, in_chans=1, img_size=64)
    decay = _decay_by_name(mae, param_groups(mae, 0.05))
    assert set(decay) == {n for n, p in mae.named_parameters() if p.requires_grad}
    tokens = [n for n in decay if n.endswith(TOKENS)]
    assert "decoder.mask_token" in tokens
    if backbone == "medtl_tiny_vit":
        assert {"encoder.cls_token", "encoder.pos_embed"} <= set(tokens)
    for name in [*tokens, *_norm_and_bias_names(mae)]:
        assert decay[name] == 0.0, name
    decayed = [n for n, wd in decay.items() if wd == 0.05]
    assert decayed and all(mae.get_parameter(n).ndim > 1 for n in decayed)


@pytest.mark.parametrize("strategy", ["full", "lora"])
def test_finetuning_decays_no_token_norm_or_bias(strategy: str) -> None:
    torch.manual_seed(0)
    model = build_classifier("medtl_tiny_vit", 2, 1)
    the_plan = plan(strategy, model, weight_decay=0.05)
    decay = _decay_by_name(model, the_plan.param_groups)
    exempt = {n for n in decay if n.endswith(TOKENS)} | (_norm_and_bias_names(model) & set(decay))
    if strategy == "full":
        assert {"backbone.cls_token", "backbone.pos_embed"} <= exempt
    assert all(decay[n] == 0.0 for n in exempt)
    assert all(model.get_parameter(n).ndim > 1 for n, wd in decay.items() if wd == 0.05)
