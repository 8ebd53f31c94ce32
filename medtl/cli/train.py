"""``medtl pretrain``, ``finetune``, ``run``, ``search`` and ``demo``: the stages that train, from a
recipe into a run folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medtl.cli.common import (
    Subparsers,
    batch_exit,
    pairs_arg,
    recipe_command,
    run_context,
    show_progress,
)
from medtl.errors import ConfigError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medtl.pipeline import PretrainStage

    with run_context(args) as ctx:
        encoder = PretrainStage(resume=not args.no_resume).run(ctx).path
    print(f"encoder: {encoder}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from medtl.pipeline import FinetuneStage

    with run_context(args) as ctx:
        folder = FinetuneStage(resume=not args.no_resume).run(ctx).path
    print(f"fine-tuned model: {folder}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from medtl.pipeline import run_all

    with run_context(args) as ctx:
        done = run_all(ctx, resume=not args.no_resume, force=args.force)
    if args.log_format == "json":
        print(json.dumps({"run": str(ctx.out), "stages": {k: str(v) for k, v in done.items()}}))
    else:
        for stage, path in done.items():
            print(f"{stage}: {path}")
    evaluation = ctx.out / "evaluate" / "evaluation.json"
    if "evaluate" in done and evaluation.is_file():
        from medtl.results import EvaluationResults

        results = EvaluationResults.load(evaluation)
        return batch_exit("evaluation", len(results.entries), results.failures())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """The BioTune search alone (``--worker``: join a running search as one more process)."""
    from medtl.finetune.methods import SEARCHES
    from medtl.pipeline import FinetuneStage, search_job

    if args.storage:  # the same as --set search.storage=URL
        args.set = [*(args.set or []), f"search.storage={args.storage}"]
    with run_context(args) as ctx:
        cfg = ctx.recipe.section("finetune")
        if cfg.strategy not in SEARCHES:
            raise ConfigError(
                f"{args.recipe}: finetune.strategy is {cfg.strategy!r}; set it to a search "
                f"({', '.join(SEARCHES.names())}) to search"
            )
        if args.worker:
            weights = (
                str(ctx.out / "pretrain" / "encoder.safetensors")
                if cfg.weights == "pretrain"
                else cfg.weights
            )
            job = search_job(ctx, ctx.out / "finetune", weights)
            n = SEARCHES.get(cfg.strategy).work(job)
            print(f"worker ran {n} candidate(s)")
            return 0
        folder = FinetuneStage(resume=not args.no_resume).run(ctx).path
        print(f"fine-tuned model: {folder}")
        return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from medtl.demo import run_demo

    report = run_demo(
        Path(args.out),
        n=args.n,
        size=args.size,
        seed=args.seed,
        quiet=not show_progress(args),
        overrides=args.set,
    )
    print(f"demo finished; report: {report}")
    return 0


def pretrain_parser(sub: Subparsers) -> None:
    what = "masked-autoencoder pretraining from a recipe's pretrain section"
    recipe_command(sub, "pretrain", what, cmd_pretrain)


def finetune_parser(sub: Subparsers) -> None:
    what = "fine-tune a classifier from a recipe's finetune section"
    recipe_command(sub, "finetune", what, cmd_finetune)


def run_parser(sub: Subparsers) -> None:
    what = "every stage of a recipe into one run folder (resumable)"
    p = recipe_command(sub, "run", what, cmd_run)
    p.add_argument(
        "--force",
        default=None,
        metavar="STAGE",
        help="rerun from this stage on: pretrain, finetune, calibrate, evaluate, report",
    )


def search_parser(sub: Subparsers) -> None:
    what = "the BioTune search of a recipe (finetune.strategy: biotune)"
    p = recipe_command(sub, "search", what, cmd_search)
    p.add_argument(
        "--worker",
        action="store_true",
        help="join the search in the run folder as one more worker process",
    )
    p.add_argument(
        "--storage",
        help="the search's Optuna storage URL (search.storage), e.g. "
        "postgresql://user:password@host/db to share it with workers on other machines",
    )


def demo_parser(sub: Subparsers) -> None:
    p = sub.add_parser("demo", help="run the pipeline on a built-in synthetic phantom dataset")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--n", type=int, default=240, help="phantom images (default 240)")
    p.add_argument(
        "--size",
        type=int,
        default=64,
        help="phantom image size in pixels, a multiple of 32 (default 64)",
    )
    p.add_argument("--seed", type=int, default=0)
    pairs_arg(
        p,
        "--set",
        metavar="KEY=VALUE",
        help="override a key of the demo recipe, e.g. --set pretrain.epochs=2",
    )
    p.set_defaults(func=cmd_demo)
