"""User-facing errors.

A :class:`MedtlError` is a mistake the user can fix (a missing file, a bad label, an
unreadable image). The CLI prints its message as one line and exits non-zero, without a
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

EXIT_USER_ERROR = 2  # a MedtlError: nothing (more) was done
EXIT_FAILURES = 3  # a batch completed, but some of its items failed (listed on stderr)


class MedtlError(Exception):
    """An error caused by user input; its message names the file or key and the fix."""


class DataError(MedtlError):
    """A dataset folder, manifest or image that cannot be used as it is."""


class ConfigError(MedtlError):
    """A recipe or option with a bad key, type or value."""


def reason(exc: BaseException) -> str:
    """The first line of an exception's message: a library's may run to many lines, and a
    message built from it must stay one line that names the file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """The user's message as one line. A DataLoader worker re-raises with its traceback
    prepended: the message is what follows the last ``medtl.errors.<Error>: ``. Any other
    message of several lines is joined, so that neither the file it names (often on the first
    line) nor the fix (often on the last) is lost."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if starts:
        lines = lines[starts[-1] :]
        lines[0] = _ERROR_LINE.sub("", lines[0])
    return " ".join(lines)


_ERROR_LINE = re.compile(r"^medtl\.errors\.\w+: ")
