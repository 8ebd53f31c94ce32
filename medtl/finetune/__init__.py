"""Selective fine-tuning: a backbone cut into blocks, and strategies that choose what trains."""

from __future__ import annotations

from medtl.finetune.blocks import Block, block_modules, block_parameters, blocks_of
from medtl.finetune.strategies import (
    LPFT,
    STRATEGIES,
    AutoRGN,
    LoRA,
    Plan,
    add_lora,
    merge_lora,
    plan,
)

__all__ = [
    "LPFT",
    "STRATEGIES",
    "AutoRGN",
    "Block",
    "LoRA",
    "Plan",
    "add_lora",
    "block_modules",
    "block_parameters",
    "blocks_of",
    "merge_lora",
    "plan",
]
