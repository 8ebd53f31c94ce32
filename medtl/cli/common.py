"""What the ``medtl`` commands share: option parsing, progress bars, the recipe arguments, the run
context and the exit code of a batch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import yaml

from medtl.errors import EXIT_FAILURES, ConfigError

if TYPE_CHECKING:
    from medtl.pipeline import RunContext
    from medtl.recipe import Recipe

T = TypeVar("T")
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["axis=0", "labels=l.csv"]`` -> ``{"axis": 0, "labels": "l.csv"}`` (YAML scalars)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option {pair!r} must look like key=value")
        if key.strip() in out:
            raise ConfigError(f"option {key.strip()!r} is given twice (-O {pair}); give it once")
        out[key.strip()] = yaml.safe_load(value) if value else ""
    return out


def parse_ratios(text: str) -> dict[str, float]:
    """``"0.7,0.15,0.15"`` -> train/val/test ratios."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--split-ratios {text!r} must be three numbers, e.g. 0.7,0.15,0.15"
        ) from None
    if len(values) != 3:
        raise ConfigError(f"--split-ratios {text!r} must give train,val,test, e.g. 0.7,0.15,0.15")
    return dict(zip(("train", "val", "test"), values, strict=True))


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only for a person: not with ``--quiet`` nor between JSON log lines."""
    return not args.quiet and args.log_format == "text"


def progress_bar(desc: str, quiet: bool) -> Any:
    """A ``(iterable, total) -> iterable`` wrapper showing a tqdm bar on an interactive stderr."""
    from tqdm import tqdm

    def wrap(items: Iterable[T], total: int) -> Iterable[T]:
        return tqdm(
            items, total=total, desc=desc, unit="img", disable=quiet or not sys.stderr.isatty()
        )

    return wrap


def pairs_arg(p: argparse.ArgumentParser, *flags: str, metavar: str, help: str) -> None:
    """A repeatable option collecting ``metavar``-shaped strings (``--set KEY=VALUE``) in a
    list, empty when not given."""
    p.add_argument(*flags, action="append", default=[], metavar=metavar, help=help)


def recipe_command(
    sub: Subparsers, name: str, help: str, func: Any, run: bool = True
) -> argparse.ArgumentParser:
    """The subcommand ``name`` taking a recipe (:func:`recipe_args`), calling ``func``; its
    parser, for the command's own arguments."""
    p = sub.add_parser(name, help=help)
    recipe_args(p, run)
    p.set_defaults(func=func)
    return p


def recipe_args(p: argparse.ArgumentParser, run: bool = True) -> None:
    """The arguments of a command that takes a recipe; ``run``: also the run folder's."""
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--data-root", default=None, help="data root (overrides data.root)")
    pairs_arg(
        p,
        "--set",
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set pretrain.epochs=5 (repeatable)",
    )
    if run:
        p.add_argument("--out", default=None, help="run folder (default runs/<recipe name>)")
        p.add_argument(
            "--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ..."
        )
        p.add_argument(
            "--no-resume", action="store_true", help="start the stage over instead of resuming"
        )


def recipe_of(args: argparse.Namespace) -> Recipe:
    """The recipe named on the command line, with its ``--set`` overrides."""
    from medtl.recipe import load_recipe

    return load_recipe(args.recipe, args.set)


def run_context(args: argparse.Namespace) -> RunContext:
    """The run folder of a recipe command, opened (and locked, unless a search worker)."""
    from medtl.pipeline import open_run

    return open_run(
        recipe_of(args),
        Path(args.out) if args.out else None,
        args.data_root,
        args.device,
        progress=show_progress(args),
        lock=not getattr(args, "worker", False),  # a search worker joins a locked run
    )


def batch_exit(what: str, total: int, failures: list[str]) -> int:
    """0, or ``EXIT_FAILURES`` with each failure listed on stderr: a batch that completed with
    failures must not look like a success to a script."""
    if not failures:
        return 0
    print(f"medtl: {len(failures)} of {total} {what}(s) failed:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_FAILURES
