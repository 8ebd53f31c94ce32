"""The ``medtl`` command: parses arguments, calls the stage functions, prints results.

A user error (:class:`~medtl.errors.MedtlError`, or a file that cannot be written) is printed
as one line on stderr with exit code 2; a batch (``evaluate``, ``calibrate``, ``run``) that
completes with failed items lists them and exits 3; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import yaml

from medtl import __version__
from medtl.errors import (
    EXIT_FAILURES,
    EXIT_USER_ERROR,
    ConfigError,
    DataError,
    MedtlError,
    one_line,
)

if TYPE_CHECKING:
    from medtl.artifacts import EvaluationEntry

log = logging.getLogger("medtl")
T = TypeVar("T")
_Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


# -- small parsing helpers ------------------------------------------------------------------
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


# -- commands -------------------------------------------------------------------------------
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


def _recipe(args: argparse.Namespace) -> Any:
    from medtl.recipe import load_recipe

    return load_recipe(args.recipe, args.set)


def _run_context(args: argparse.Namespace) -> Any:
    from medtl.pipeline import open_run

    return open_run(
        _recipe(args),
        Path(args.out) if args.out else None,
        args.data_root,
        args.device,
        progress=show_progress(args),
        lock=not getattr(args, "worker", False),  # a search worker joins a locked run
    )


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe; check that its data root exists and its manifest matches it."""
    from medtl.data.manifest import Manifest, resolve
    from medtl.data.verify import verify_data
    from medtl.runs import check_manifest_path, check_named_files, data_root

    recipe = _recipe(args)
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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from medtl.pipeline import PretrainStage

    with _run_context(args) as ctx:
        encoder = PretrainStage(resume=not args.no_resume).run(ctx).path
    print(f"encoder: {encoder}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from medtl.pipeline import FinetuneStage

    with _run_context(args) as ctx:
        folder = FinetuneStage(resume=not args.no_resume).run(ctx).path
    print(f"fine-tuned model: {folder}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from medtl.pipeline import run_all

    with _run_context(args) as ctx:
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
        return _batch_exit("evaluation", len(results.entries), results.failures())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """The BioTune search alone (``--worker``: join a running search as one more process)."""
    from medtl.finetune.methods import SEARCHES
    from medtl.pipeline import FinetuneStage, search_job

    if args.storage:  # the same as --set search.storage=URL
        args.set = [*(args.set or []), f"search.storage={args.storage}"]
    with _run_context(args) as ctx:
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from medtl.conformal import ConformalConfig
    from medtl.evaluate import CalibrateConfig
    from medtl.pipeline import CalibrateStage

    try:
        conformal = ConformalConfig(
            coverage=args.coverage, score=args.conformal_score, mondrian=args.mondrian
        )
    except ValidationError as exc:
        error = exc.errors()[0]
        option = {"score": "--conformal-score"}.get(str(error["loc"][0]), "--coverage")
        raise ConfigError(f"{option}: {error['msg'].removeprefix('Value error, ')}") from None
    cfg = CalibrateConfig(
        method=args.method,
        conformal=conformal,
        **({"compare": args.compare} if args.compare else {}),
    )
    failures, stage = [], CalibrateStage(cfg)
    for folder in args.model:
        try:
            record = stage.calibrate(Path(folder))
        except MedtlError as exc:
            if len(args.model) == 1:
                raise
            failures.append(f"{folder}: {one_line(exc)}")
            continue
        params = record.chosen.params.to_dict()
        print(
            f"{folder}: {cfg.method} fitted on validation: {params}; written to meta.json and calibration.json"
        )
    return _batch_exit("calibration", len(args.model), failures)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from medtl.evaluate import DataSpec, EvaluateConfig, ModelSpec
    from medtl.pipeline import EvaluateStage, pick_device

    cfg = EvaluateConfig(
        splits=args.split or ["test"],
        positive=args.positive,
        n_boot=args.n_boot,
        ensemble=args.ensemble,
        site_split=args.site_split,
    )
    out = Path(args.out)
    results = EvaluateStage(cfg).evaluate(
        [ModelSpec.parse(m) for m in args.model],
        [replace(DataSpec.parse(d), leaks=args.leaks) for d in args.data],
        out,
        seed=args.seed,
        device=pick_device(args.device),
        progress=show_progress(args),
    )
    for e in results.entries:
        print_entry(e)
    print(f"evaluation written to {out / 'evaluation.json'}")
    return _batch_exit("evaluation", len(results.entries), results.failures())


def print_entry(e: EvaluationEntry) -> None:
    """One :class:`~medtl.artifacts.EvaluationEntry` as a line (two with conformal sets)."""
    from medtl.report.tables import fmt_entry

    where = f"{e.model} on {e.dataset}/{e.split}"
    if e.status != "ok":
        print(f"{where}: FAILED: {e.error}")
        return
    m = (e.metrics or {}).get("overall", {})
    auc, bacc = m.get("macro_auroc", {}), m.get("balanced_accuracy", {})
    print(f"{where}: macro AUROC {fmt_entry(auc)}, balanced accuracy {fmt_entry(bacc)}")
    if e.conformal is not None:
        c = e.conformal
        print(
            f"  conformal sets ({100 * c['target']:.0f}% target): coverage "
            f"{fmt_entry(c['coverage'])}, mean set size {c['mean_set_size']:.2f}"
        )


def _batch_exit(what: str, total: int, failures: list[str]) -> int:
    """0, or ``EXIT_FAILURES`` with each failure listed on stderr: a batch that completed with
    failures must not look like a success to a script."""
    if not failures:
        return 0
    print(f"medtl: {len(failures)} of {total} {what}(s) failed:", file=sys.stderr)
    for failure in failures:
        print(f"  {failure}", file=sys.stderr)
    return EXIT_FAILURES


def cmd_predict(args: argparse.Namespace) -> int:
    from medtl.pipeline import pick_device
    from medtl.predict import PredictOptions, predict_images

    opts = PredictOptions(
        batch_size=args.batch_size,
        device=pick_device(args.device),
        positive=args.positive,
        operating_point=args.operating_point,
        uncalibrated=args.uncalibrated,
        split=args.split,
        progress=show_progress(args),
        explain=tuple(m.strip() for m in (args.explain or "").split(",") if m.strip()),
    )
    root = Path(args.data_root) if args.data_root else None
    result = predict_images(Path(args.model), Path(args.input), Path(args.out), opts, root)
    resumed = f" ({result.resumed} done before a resume)" if result.resumed else ""
    print(
        f"{result.predicted} image(s) predicted{resumed}, {result.skipped} skipped "
        f"(listed in {result.files['skipped.csv']}); predictions in {result.files['predictions.csv']}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medtl.evaluate import ReportConfig
    from medtl.pipeline import ReportStage

    roots = dict(parse_options(args.data_root)) if args.data_root else None
    result = ReportStage(ReportConfig(rank_by=args.rank_by)).report(
        Path(args.evaluation),
        Path(args.out),
        {k: Path(str(v)) for k, v in roots.items()} if roots else None,
        explain=args.explain,
    )
    print(f"report: {result.html}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from medtl.export import export_model

    result = export_model(
        Path(args.model),
        Path(args.out),
        Path(args.evaluation) if args.evaluation else None,
        [f.strip() for f in args.formats.split(",") if f.strip()],
        args.intended_use,
    )
    if result.onnx_max_abs_diff is not None:
        print(f"ONNX parity with PyTorch: max |difference| {result.onnx_max_abs_diff:.1e}")
    print(f"exported {len(result.files)} file(s) to {result.out}")
    return 0


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


# -- parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtl", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--version", action="version", version=f"medtl {__version__}")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars; warnings and errors only"
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per log line on stderr, for batch jobs (a run folder always "
        "gets log.jsonl)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def _prepare_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("prepare", help="build a manifest (and its audit) for a dataset folder")
    p.add_argument("dataset", help="adapter name (see 'medtl list adapters')")
    p.add_argument("root", help="data root: the dataset folder (never written into the manifest)")
    p.add_argument(
        "-o", "--output", required=True, help="manifest CSV path, e.g. data_manifests/busi.csv"
    )
    p.add_argument(
        "-O",
        "--option",
        action="append",
        default=[],
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


def _audit_parser(sub: _Subparsers) -> None:
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


def _load_parser(sub: _Subparsers) -> None:
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


def _check_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("check", help="validate a recipe, its data root and its manifest")
    _recipe_args(p, run=False)
    p.set_defaults(func=cmd_check)


def _pretrain_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "pretrain", help="masked-autoencoder pretraining from a recipe's pretrain section"
    )
    _recipe_args(p)
    p.set_defaults(func=cmd_pretrain)


def _finetune_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("finetune", help="fine-tune a classifier from a recipe's finetune section")
    _recipe_args(p)
    p.set_defaults(func=cmd_finetune)


def _run_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("run", help="every stage of a recipe into one run folder (resumable)")
    _recipe_args(p)
    p.add_argument(
        "--force",
        default=None,
        metavar="STAGE",
        help="rerun from this stage on: pretrain, finetune, calibrate, evaluate, report",
    )
    p.set_defaults(func=cmd_run)


def _search_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("search", help="the BioTune search of a recipe (finetune.strategy: biotune)")
    _recipe_args(p)
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
    p.set_defaults(func=cmd_search)


def _calibrate_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "calibrate", help="fit a calibrator on a model's validation predictions and store it"
    )
    p.add_argument("model", nargs="+", help="fine-tuned model folder(s) (runs/NAME/finetune)")
    p.add_argument(
        "--method", default="temperature", help="temperature (default), vector, platt or none"
    )
    p.add_argument(
        "--compare", nargs="*", default=None, help="calibrators to compare on test (default: all)"
    )
    p.add_argument(
        "--coverage", type=float, default=0.9, help="conformal sets' target coverage (default 0.9)"
    )
    p.add_argument("--conformal-score", default="lac", help="conformal score: lac (default) or aps")
    p.add_argument(
        "--mondrian",
        action="store_true",
        help="class-conditional conformal sets (per-class coverage)",
    )
    p.set_defaults(func=cmd_calibrate)


def _evaluate_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "evaluate", help="many models x many datasets: predictions and metrics with CIs"
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="DIR[@NAME]",
        help="fine-tuned model folder (repeatable)",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="MANIFEST:ROOT[@NAME]",
        help="manifest and its data root (repeatable)",
    )
    p.add_argument("--out", required=True, help="evaluation folder")
    p.add_argument(
        "--split", action="append", default=None, help="split(s) to evaluate (default test)"
    )
    p.add_argument(
        "--positive", default=None, help="positive class for operating points, e.g. malignant"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument(
        "--ensemble", action="store_true", help="also evaluate the models' averaged probabilities"
    )
    p.add_argument(
        "--leaks",
        choices=["keep", "drop"],
        default="keep",
        help="official test images sharing a duplicate or group with train / val: keep (official "
        "and clean figures side by side, default) or drop (clean subset only)",
    )
    p.add_argument(
        "--site-split",
        default=None,
        metavar="SPLIT",
        help="a labelled split of each dataset (a new site's calibration part, e.g. val) on which "
        "the operating thresholds are chosen again and shown beside the model's own",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)


def _predict_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "predict",
        help="apply a calibrated model to new images: probabilities, called class, conformal sets",
    )
    p.add_argument("model", help="fine-tuned, calibrated model folder (runs/NAME/finetune)")
    p.add_argument("input", help="folder of images / DICOM / NIfTI, or a manifest (.csv)")
    p.add_argument(
        "--out", required=True, help="output folder (resumed when it holds a partial run)"
    )
    p.add_argument("--data-root", default=None, help="data root of a manifest input")
    p.add_argument("--split", default=None, help="only this split of a manifest input")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ..."
    )
    p.add_argument(
        "--positive",
        default=None,
        help="class of the operating point (default: the recipe's evaluate.positive, or class 1 "
        "of a binary model; a multi-class model without one calls the argmax)",
    )
    p.add_argument(
        "--operating-point",
        default="youden",
        help="threshold chosen on validation: youden (default), argmax, target_sensitivity_0.90, "
        "target_sensitivity_0.95",
    )
    p.add_argument(
        "--uncalibrated",
        action="store_true",
        help="allow a model that was never calibrated: raw probabilities, argmax, no conformal sets",
    )
    p.add_argument(
        "--explain",
        nargs="?",
        const="gradcam,occlusion",
        metavar="METHODS",
        help="also write OUT/explanations/<id>.png per image: the maps of METHODS (comma-separated; "
        "gradcam, gradcampp, occlusion; default gradcam,occlusion) for the class called most likely",
    )
    p.set_defaults(func=cmd_predict)


def _report_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML report (+ JSON, CSV) from an evaluation"
    )
    p.add_argument("evaluation", help="evaluation folder (from medtl evaluate)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--data-root",
        action="append",
        default=[],
        metavar="DATASET=ROOT",
        help="data root per dataset name, for the thumbnails of confident errors",
    )
    p.add_argument(
        "--rank-by",
        choices=["clean", "official"],
        default="clean",
        help="where an official test split leaks, rank the leaderboard on the clean subset "
        "(default) or on the official split",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="Grad-CAM and occlusion maps of a seeded sample and the most confident errors "
        "(loads each model; needs --data-root)",
    )
    p.set_defaults(func=cmd_report)


def _export_parser(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "export", help="model card (Markdown, HTML), ONNX file and MONAI bundle of a model"
    )
    p.add_argument("model", help="fine-tuned model folder (runs/NAME/finetune)")
    p.add_argument("--out", required=True, help="export folder (must not exist)")
    p.add_argument(
        "--evaluation",
        default=None,
        help="evaluation folder of this model (from medtl evaluate): metrics with CIs in the card",
    )
    p.add_argument(
        "--formats", default="card,onnx,bundle", help="comma-separated: card, onnx, bundle (all)"
    )
    p.add_argument(
        "--intended-use", default=None, help="the card's intended-use statement (default: research)"
    )
    p.set_defaults(func=cmd_export)


def _list_parser(sub: _Subparsers) -> None:
    p = sub.add_parser("list", help="list registered components")
    p.add_argument(
        "kind", nargs="?", choices=["adapters", "masking", "searches", "sources", "strategies"]
    )
    p.set_defaults(func=cmd_list)


def _demo_parser(sub: _Subparsers) -> None:
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
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of the demo recipe, e.g. --set pretrain.epochs=2",
    )
    p.set_defaults(func=cmd_demo)


_SUBCOMMANDS: tuple[Callable[[_Subparsers], None], ...] = (
    _prepare_parser,
    _audit_parser,
    _load_parser,
    _check_parser,
    _pretrain_parser,
    _finetune_parser,
    _run_parser,
    _search_parser,
    _calibrate_parser,
    _evaluate_parser,
    _predict_parser,
    _report_parser,
    _export_parser,
    _list_parser,
    _demo_parser,
)


def _recipe_args(p: argparse.ArgumentParser, run: bool = True) -> None:
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("--data-root", default=None, help="data root (overrides data.root)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
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


_terminal: logging.Handler | None = None


def setup_logging(quiet: bool, fmt: str) -> None:
    """Terminal logging on stderr: text or JSON lines; ``quiet`` shows warnings and errors
    only (a run folder's ``log.jsonl`` still records everything from info up). Calling it
    again (``main`` twice in one process) replaces the handler."""
    global _terminal
    from medtl.tracking import JsonFormatter

    root = logging.getLogger()
    if _terminal is not None:
        root.removeHandler(_terminal)
    _terminal = logging.StreamHandler(sys.stderr)
    _terminal.setLevel(logging.WARNING if quiet else logging.INFO)
    text = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    _terminal.setFormatter(JsonFormatter() if fmt == "json" else text)
    root.addHandler(_terminal)
    root.setLevel(logging.INFO)


# A full disk, a read-only folder or file system: the user's to fix, named in one line.
_WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet, args.log_format)
    try:
        return int(args.func(args))
    except MedtlError as exc:
        print(f"medtl: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("medtl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS or exc.filename is None:
            raise
        print(
            f"medtl: error: {exc.filename}: {exc.strerror}; check its permissions and the free "
            "space, or choose another output folder",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
