"""``medtl list``: the registered components, by kind."""

from __future__ import annotations

import argparse
from typing import Any

from medtl.cli.common import Subparsers


def cmd_list(args: argparse.Namespace) -> int:
    from medtl.data.adapters import ADAPTERS
    from medtl.finetune.methods import SEARCHES
    from medtl.finetune.strategies import STRATEGIES
    from medtl.pretrain.masking import MASKING
    from medtl.sources import SOURCES

    registries: dict[str, Any] = {
        "adapters": ADAPTERS,
        "masking": MASKING,
        "searches": SEARCHES,
        "sources": SOURCES,
        "strategies": STRATEGIES,
    }
    for kind in [args.kind] if args.kind else sorted(registries):
        print(f"{kind}:")
        for name in registries[kind].names():
            doc = (registries[kind].get(name).__doc__ or "").strip().splitlines()[0]
            print(f"  {name:22s} {doc}")
    return 0


def list_parser(sub: Subparsers) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument(
        "kind", nargs="?", choices=["adapters", "masking", "searches", "sources", "strategies"]
    )
    p.set_defaults(func=cmd_list)
