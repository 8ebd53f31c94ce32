"""``medtl calibrate``, ``evaluate``, ``predict``, ``report`` and ``export``: what is done with a
fine-tuned model's folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from medtl.cli.common import Subparsers, batch_exit, pairs_arg, parse_options, show_progress
from medtl.errors import ConfigError, MedtlError, one_line

if TYPE_CHECKING:
    from medtl.artifacts import EvaluationEntry


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
    return batch_exit("calibration", len(args.model), failures)


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
    return batch_exit("evaluation", len(results.entries), results.failures())


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


def calibrate_parser(sub: Subparsers) -> None:
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


def evaluate_parser(sub: Subparsers) -> None:
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


def predict_parser(sub: Subparsers) -> None:
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


def report_parser(sub: Subparsers) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML report (+ JSON, CSV) from an evaluation"
    )
    p.add_argument("evaluation", help="evaluation folder (from medtl evaluate)")
    p.add_argument("--out", required=True, help="report folder")
    pairs_arg(
        p,
        "--data-root",
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


def export_parser(sub: Subparsers) -> None:
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
