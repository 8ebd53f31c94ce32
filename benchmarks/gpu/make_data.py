"""The benchmark data at 128 px for a GPU machine that receives at most 64 MiB: ``.gpu/data``.

- BUSI: every manifest image through medtl's own deterministic transform (read, 3 channels,
  area resize to 128 x 128), rounded to 8 bits (largest difference 0.002 of the range) and saved
  as PNG under the same relative path; the manifest is copied with each row's new sha256 and
  size (same ids, groups and splits) to ``busi128.csv``, with the audit beside it.
- The other sample folders of ``../shared/data`` (for the mixed pretraining corpus), longest side
  128 px, same layout and names, masks left out; BreastMNIST and PneumoniaMNIST ``.npz`` as they
  are (28 px).

    python benchmarks/gpu/make_data.py ../shared/data .gpu/data
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
from monai.transforms import Compose
from PIL import Image, ImageOps

from medtl.data.dataset import LoaderConfig, deterministic_transforms
from medtl.data.manifest import Manifest

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = (
    "brain_tumor_mri_sample", "covid19_radiography_sample", "isic2018_sample",
    "busi_original_subset",
)  # fmt: skip


def busi(src: Path, dst: Path) -> float:
    """BUSI at 128 px and its manifest; the largest rounding difference."""
    manifest = Manifest.load(ROOT / "data_manifests/busi.csv")
    chain = Compose(
        deterministic_transforms(LoaderConfig(image_size=128).data_config(), src / "busi")
    )
    rows, worst = [], 0.0
    for row in manifest.rows:
        x = chain({"image": row.path, "locator": row.locator})["image"].numpy()
        u8 = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
        worst = max(worst, float(np.abs(u8 / 255.0 - x).max()))
        out = dst / "busi" / row.path
        out.parent.mkdir(parents=True, exist_ok=True)
        grey = bool((u8[0] == u8[1]).all() and (u8[0] == u8[2]).all())
        image = Image.fromarray(u8[0], "L") if grey else Image.fromarray(u8.transpose(1, 2, 0))
        image.save(out, optimize=True)
        sha = hashlib.sha256(out.read_bytes()).hexdigest()
        rows.append(dataclasses.replace(row, sha256=sha, width=128, height=128))
    manifest.rows = rows
    manifest.save(dst / "busi128.csv")
    shutil.copy(ROOT / "data_manifests/busi.audit.json", dst / "busi128.audit.json")
    return worst


def samples(src: Path, dst: Path) -> int:
    n = 0
    for name in SAMPLES:
        for f in sorted((src / name).rglob("*")):
            if f.is_dir() or "_mask" in f.name:
                continue
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                shutil.copy(f, out)
                continue
            image = ImageOps.exif_transpose(Image.open(f))
            image = image if image.mode in ("L", "RGB") else image.convert("RGB")
            image.thumbnail((128, 128), Image.Resampling.BOX)
            image.save(
                out, **({"optimize": True} if f.suffix.lower() == ".png" else {"quality": 95})
            )
            n += 1
    (dst / "medmnist").mkdir(parents=True, exist_ok=True)
    for npz in ("breastmnist.npz", "pneumoniamnist_reduced_train.npz"):
        shutil.copy(src / "medmnist" / npz, dst / "medmnist" / npz)
    return n


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    print(f"BUSI: largest rounding difference {busi(source, target):.4f}")
    print(f"samples: {samples(source, target)} images")
