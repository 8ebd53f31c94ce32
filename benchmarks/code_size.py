"""The longest functions and modules of a package: where to look first for code to split.

A function's length is its lines from ``def`` (decorators included) to its last line, nested
functions counted in their parent as well as on their own; a module's, its lines. Prints two
Markdown tables; ``--json`` writes the same figures for comparing two checkouts.

    python benchmarks/code_size.py [medtl] [--functions 15] [--modules 10] [--json sizes.json]
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path


def functions(root: Path) -> list[tuple[int, str]]:
    """``(lines, "path:line name")`` of every function and method under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([d.lineno for d in node.decorator_list] + [node.lineno])
                end = node.end_lineno or node.lineno
                out.append((end - start + 1, f"{path}:{node.lineno} {node.name}"))
    return sorted(out, key=lambda item: (-item[0], item[1]))


def modules(root: Path) -> list[tuple[int, str]]:
    """``(lines, path)`` of every module under ``root``."""
    out = [(len(p.read_text(encoding="utf-8").splitlines()), str(p)) for p in root.rglob("*.py")]
    return sorted(out, key=lambda item: (-item[0], item[1]))


def table(title: str, rows: list[tuple[int, str]]) -> str:
    lines = [f"| {title} | lines |", "|---|---:|"]
    return "\n".join(lines + [f"| `{name}` | {n} |" for n, name in rows])


def main(argv: list[str] | None = None) -> dict[str, list[tuple[int, str]]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path("medtl"))
    parser.add_argument("--functions", type=int, default=15, help="how many functions (15)")
    parser.add_argument("--modules", type=int, default=10, help="how many modules (10)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    sizes = {"functions": functions(args.root), "modules": modules(args.root)}
    print(table("function", sizes["functions"][: args.functions]))
    print()
    print(table("module", sizes["modules"][: args.modules]))
    if args.json is not None:
        args.json.write_text(json.dumps(sizes, indent=1) + "\n", encoding="utf-8")
    return sizes


if __name__ == "__main__":
    main()
