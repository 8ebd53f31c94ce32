"""``medtl prepare``, ``audit``, ``load`` and ``check``: manifests, audits and recipes' data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from medtl.cli.common import (
    Subparsers,
    pairs_arg,
    parse_options,
    parse_ratios,
    progress_bar,
    recipe_command,
    recipe_of,
    show_progress,
)
from medtl.errors import DataError


def cmd_prepare(args: argparse.Namespace) -> int:
    from medtl.pipeline import PrepareStage

    stage = PrepareStage(args.workers, progress_bar("reading", not show_progress(args)))
    result = stage.prepare(
        args.dataset,
        Path(args.root),
        Path(args.output),
        options=parse_options(args.option),
        ratios=parse_ratios(args.split_ratios),
        seed=args.seed,
        near_bits=args.near_dup_bits,
        phash_bits=args.near_dup_phash_bits,
    )
    m = result.manifest
    counts = ", ".join(f"{split} {sum(c.values())}" for split, c in m.counts().items())
    print(
        f"manifest {result.manifest_path}: {len(m.rows)} images, {len(m.classes)} classes "
        f"({', '.join(m.classes) or 'unlabelled'}); split ({m.meta.split_source}): {counts}"
    )
    print(result.audit.summary())
    print(f"audit written to {result.audit_path}")
    return _strict_exit(args.strict, result.audit)


def cmd_audit(args: argparse.Namespace) -> int:
    from medtl.data.prepare import audit_manifest, audit_path_for
    from medtl.io import check_writable

    check_writable(Path(args.output or audit_path_for(args.manifest)).parent)
    report = audit_manifest(
        args.manifest,
        Path(args.data_root),
        args.near_dup_bits,
        args.workers,
        progress_bar("auditing", not show_progress(args)),
        args.near_dup_phash_bits,
    )
    out = Path(args.output) if args.output else audit_path_for(args.manifest)
    report.save(out)
    print(report.summary())
    print(f"audit written to {out}")
    return _strict_exit(args.strict, report)


def _strict_exit(strict: bool, report: Any) -> int:
    if strict and report.problems:
        print(
            f"medtl: error: --strict: the audit found {len(report.problems)} problem(s); "
            "fix them or run without --strict",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    """Read every image of one split through the training pipeline (a dry run of the data)."""
    from medtl.data.dataset import DataConfig, build_dataset, build_loader
    from medtl.data.manifest import Manifest, check_root
    from medtl.data.verify import verify_data

    manifest = Manifest.load(args.manifest)
    cfg = DataConfig(
        image_size=args.image_size,
        channels=args.channels,
        cache=args.cache,
        cache_dir=args.cache_dir,
        batch_size=args.batch_size,
    )
    verify_data(manifest, check_root(args.data_root), [args.split])
    dataset = build_dataset(manifest, args.split, Path(args.data_root), cfg)
    loader = build_loader(dataset, cfg)
    start, n, shape = time.perf_counter(), 0, None
    for batch in progress_bar(f"loading {args.split}", not show_progress(args))(
        loader, len(loader)
    ):
        n += len(batch["label"])
        shape = tuple(batch["image"].shape[1:])
    seconds = time.perf_counter() - start
    print(
        f"loaded {n} images of split {args.split!r} as {shape} tensors in {seconds:.1f}s "
        f"({n / max(seconds, 1e-9):.0f} images/s)"
    )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe; check that its data root exists and its manifest matches it."""
    from medtl.data.manifest import Manifest, resolve
    from medtl.data.verify import verify_data
    from medtl.runs import check_manifest_path, check_named_files, data_root

    recipe = recipe_of(args)
    lines = [f"recipe {args.recipe}: valid (sections: {', '.join(recipe.sections)})"]
    root = None
    if recipe.has("data"):
        section = recipe.section("data")
        check_manifest_path(section)
        if args.data_root or section.root:
            root = data_root(section, args.data_root)
            lines.append(f"data root {root}: exists")
            if section.manifest:
                manifest = Manifest.load(section.manifest)
                missing = [r.path for r in manifest.rows if not resolve(root, r.path).is_file()]
                if missing:
                    raise DataError(
                        f"manifest {section.manifest} does not match {root}: {len(missing)} file(s) "
                        f"missing, e.g. {missing[0]}; check --data-root or prepare the manifest again"
                    )
                hashed = verify_data(manifest, root)
                lines.append(
                    f"manifest {section.manifest}: {len(manifest.rows)} rows, all files present "
                    f"and unchanged ({hashed} hashed, the others' size and time as last verified)"
                )
    lines += check_named_files(recipe, root)
    print("\n".join(lines))
    return 0


def prepare_parser(sub: Subparsers) -> None:
    p = sub.add_parser("prepare", help="build a manifest (and its audit) for a dataset folder")
    p.add_argument("dataset", help="adapter name (see 'medtl list adapters')")
    p.add_argument("root", help="data root: the dataset folder (never written into the manifest)")
    p.add_argument(
        "-o", "--output", required=True, help="manifest CSV path, e.g. data_manifests/busi.csv"
    )
    pairs_arg(
        p,
        "-O",
        "--option",
        metavar="KEY=VALUE",
        help="adapter option, e.g. -O axis=0 for nifti (repeatable)",
    )
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument(
        "--split-ratios", default="0.7,0.15,0.15", help="train,val,test (default 0.7,0.15,0.15)"
    )
    p.add_argument(
        "--near-dup-bits",
        type=int,
        default=10,
        help="near-duplicate threshold in bits of a 256-bit difference hash (default 10)",
    )
    p.add_argument(
        "--near-dup-phash-bits",
        type=int,
        default=40,
        help="near-duplicate threshold in bits of a 256-bit DCT hash (default 40); a pair close "
        "on either hash is one cluster",
    )
    p.add_argument("--workers", type=int, default=4, help="reader threads (default 4)")
    p.add_argument("--strict", action="store_true", help="exit 1 if the audit finds any problem")
    p.set_defaults(func=cmd_prepare)


def audit_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "audit", help="audit a manifest against its data: broken files, duplicates, conflicts"
    )
    p.add_argument("manifest", help="manifest CSV")
    p.add_argument("--data-root", required=True, help="folder the manifest's paths are relative to")
    p.add_argument("-o", "--output", help="audit JSON (default: <manifest>.audit.json)")
    p.add_argument(
        "--near-dup-bits", type=int, default=None, help="default: the manifest's setting"
    )
    p.add_argument(
        "--near-dup-phash-bits", type=int, default=None, help="default: the manifest's setting"
    )
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--strict", action="store_true", help="exit 1 if the audit finds any problem")
    p.set_defaults(func=cmd_audit)


def load_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "load", help="read a split through the loading pipeline and report throughput"
    )
    p.add_argument("manifest")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--channels", type=int, default=3, choices=[1, 3])
    p.add_argument("--cache", default="none", choices=["none", "memory", "disk"])
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_load)


def check_parser(sub: Subparsers) -> None:
    recipe_command(
        sub, "check", "validate a recipe, its data root and its manifest", cmd_check, run=False
    )
