"""Contact sheets of near-duplicate pairs, to judge the audit's thresholds by looking.

Reads a dataset through its adapter and the audit's own hashes (``medtl.data.audit``), then
draws every pair whose DCT-hash distance lies in ``--bits LO:HI`` (both images side by side,
sorted by that distance, with both distances under them) into PNG sheets of 30 pairs. With
``--new-only`` only the pairs the difference hash alone would not link are drawn: the pairs
that the DCT hash adds. docs/data.md says what viewing these sheets found on BUSI and where
different images come closest on the other development datasets.

    python benchmarks/duplicate_pairs.py busi ../shared/data/busi --bits 0:40 --new-only --out runs/dup
    python benchmarks/duplicate_pairs.py medmnist ../shared/data/medmnist -O file=pneumoniamnist_reduced_train.npz --bits 40:56 --out runs/dup-pneu
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medtl.data.audit import DEFAULT_NEAR_BITS, Item, duplicate_clusters, inspect_all
from medtl.data.manifest import resolve
from medtl.data.prepare import run_adapter
from medtl.data.readers import read_array

THUMB, PER_ROW, ROWS = 128, 5, 6


def pairs_in_band(
    adapter: str, root: Path, options: dict[str, str], lo: int, hi: int, new_only: bool
) -> tuple[list[Item], list[tuple[int, int, int, int]]]:
    """Items and ``(dct bits, difference bits, a, b)`` for the pairs with ``lo <= dct <= hi``."""
    samples = run_adapter(adapter, root, options).samples
    items = [Item(s.key, s.path, s.locator, s.label or "") for s in samples]
    near_bits = DEFAULT_NEAR_BITS if new_only else -1
    _, _, pairs = duplicate_clusters(inspect_all(root, items), near_bits, phash_bits=hi)
    found = [
        (p.phash, p.dhash, a, b)
        for (a, b), p in pairs.items()
        if lo <= p.phash <= hi and not (new_only and p.dhash <= DEFAULT_NEAR_BITS)
    ]
    return items, sorted(found)


def thumbnail(root: Path, item: Item) -> Image.Image:
    """The image as the audit sees it (grey, through medtl's reader), THUMB pixels square."""
    gray = read_array(resolve(root, item.path), item.locator)[:3].mean(axis=0)
    return Image.fromarray((gray * 255).astype(np.uint8)).resize((THUMB, THUMB))


def draw_sheets(
    root: Path, items: list[Item], pairs: list[tuple[int, int, int, int]], out: Path
) -> list[Path]:
    """PNG sheets of ``PER_ROW x ROWS`` pairs each; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    sheets, per_sheet = [], PER_ROW * ROWS
    for start in range(0, len(pairs), per_sheet):
        sheet = Image.new("RGB", (PER_ROW * (2 * THUMB + 16), ROWS * (THUMB + 30)), "white")
        draw = ImageDraw.Draw(sheet)
        for k, (dct, diff, a, b) in enumerate(pairs[start : start + per_sheet]):
            x, y = (k % PER_ROW) * (2 * THUMB + 16), (k // PER_ROW) * (THUMB + 30)
            sheet.paste(thumbnail(root, items[a]), (x, y))
            sheet.paste(thumbnail(root, items[b]), (x + THUMB + 2, y))
            names = f"#{start + k} {Path(items[a].key).name} | {Path(items[b].key).name}"
            draw.text((x, y + THUMB + 2), names, fill="black")
            draw.text((x, y + THUMB + 14), f"dct {dct} bits, difference {diff}", fill="red")
        path = out / f"pairs_{start // per_sheet:02d}.png"
        sheet.save(path)
        sheets.append(path)
    return sheets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter")
    parser.add_argument("root", type=Path)
    parser.add_argument("-O", "--option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--bits", default="0:40", help="DCT-hash distance band LO:HI (bits)")
    parser.add_argument("--new-only", action="store_true", help="skip pairs the dhash links")
    parser.add_argument("--out", type=Path, default=Path("runs/duplicate_pairs"))
    args = parser.parse_args(argv)
    lo, hi = (int(v) for v in args.bits.split(":"))
    options = dict(o.split("=", 1) for o in args.option)
    items, pairs = pairs_in_band(args.adapter, args.root, options, lo, hi, args.new_only)
    sheets = draw_sheets(args.root, items, pairs, args.out)
    print(
        f"{len(pairs)} pair(s) with a DCT-hash distance in [{lo}, {hi}] in {len(sheets)} sheet(s)"
    )
    for path in sheets:
        print(f"  {path}")


if __name__ == "__main__":
    main()
