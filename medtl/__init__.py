"""medtl: medical-imaging transfer learning on MONAI, timm and PyTorch."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
