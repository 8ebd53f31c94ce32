"""The exported network: the classifier with its calibrator baked in, and its ONNX file.

Every medtl calibrator (temperature, vector, Platt, none) is an affine map of the logits, so
the exported network is ``softmax(classifier(x) @ W + b)``: whoever runs the ONNX file or the
MONAI bundle gets the calibrated probabilities that the evaluation measured, not raw logits
that are easy to use uncalibrated.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtl.calibrate import Calibrator
from medtl.errors import MedtlError

OPSET = 17
PARITY_TOL = 1e-4


class ExportError(MedtlError):
    """The model cannot be written in the asked format."""


def calibrator_affine(calibrator: Calibrator, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(W [K, K], b [K])`` with ``calibrator.apply(z) == z @ W + b`` for logits ``z: [N, K]``;
    a ValueError if the calibrator is not affine (checked on random logits)."""
    bias = calibrator.apply(np.zeros((1, k)))[0]
    weight = calibrator.apply(np.eye(k)) - bias
    probe = np.random.default_rng(0).normal(size=(8, k)) * 4
    if not np.allclose(calibrator.apply(probe), probe @ weight + bias, atol=1e-8):
        raise ValueError(f"calibrator {calibrator.to_dict()} is not an affine map of the logits")
    return weight, bias


class CalibratedClassifier(nn.Module):
    """``[B, C, H, W]`` raw images in [0, 1] -> calibrated probabilities ``[B, K]``."""

    weight: torch.Tensor
    bias: torch.Tensor

    def __init__(self, model: nn.Module, calibrator: Calibrator, k: int) -> None:
        super().__init__()
        self.model = model
        weight, bias = calibrator_affine(calibrator, k)
        self.register_buffer("weight", torch.as_tensor(weight, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor(bias, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(x) @ self.weight + self.bias, dim=1)


def example_batch(in_chans: int, size: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    """A seeded batch of raw images ``[batch, in_chans, size, size]`` in [0, 1]."""
    return torch.rand(batch, in_chans, size, size, generator=torch.Generator().manual_seed(seed))


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``net`` as ONNX with a dynamic batch axis (input ``image``, output ``probabilities``).

    The TorchScript-based exporter is used (``dynamo=False``): the dynamo one needs onnxscript.
    An operator ONNX cannot express is an :class:`ExportError` naming it, in one line.
    """
    try:
        torch.onnx.export(
            net.eval(),
            (example,),
            str(path),
            dynamo=False,
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET,
        )
    except Exception as exc:  # the exporter raises several types, all meaning "cannot export"
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(
            f"the model does not export to ONNX (opset {OPSET}): {reason}; export without "
            "ONNX (--formats card,bundle) or replace the operator"
        ) from None


def onnx_parity(net: nn.Module, path: Path, batches: tuple[torch.Tensor, ...]) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs on ``batches``
    (of different sizes, so the dynamic batch axis is exercised); ExportError above 1e-4."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in batches:
            expected = net(x).numpy()
            (got,) = session.run(["probabilities"], {"image": x.numpy()})
            worst = max(worst, float(np.abs(got - expected).max()))
    if not worst <= PARITY_TOL:
        raise ExportError(
            f"{path}: onnxruntime and PyTorch differ by {worst:.2e} (> {PARITY_TOL}); the ONNX "
            "file was not kept"
        )
    return worst
