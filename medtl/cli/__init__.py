"""The ``medtl`` command: parses arguments, calls the stage functions, prints results.

A user error (:class:`~medtl.errors.MedtlError`, or a file that cannot be written) is printed
as one line on stderr with exit code 2; a batch (``evaluate``, ``calibrate``, ``run``) that
completes with failed items lists them and exits 3; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence

from medtl import __version__
from medtl.cli import data, evaluate, listing, train
from medtl.cli.common import Subparsers
from medtl.errors import EXIT_USER_ERROR, MedtlError, one_line

__all__ = ["build_parser", "main", "one_line", "setup_logging"]

log = logging.getLogger("medtl")


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


_SUBCOMMANDS: tuple[Callable[[Subparsers], None], ...] = (
    data.prepare_parser,
    data.audit_parser,
    data.load_parser,
    data.check_parser,
    train.pretrain_parser,
    train.finetune_parser,
    train.run_parser,
    train.search_parser,
    evaluate.calibrate_parser,
    evaluate.evaluate_parser,
    evaluate.predict_parser,
    evaluate.report_parser,
    evaluate.export_parser,
    listing.list_parser,
    train.demo_parser,
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
