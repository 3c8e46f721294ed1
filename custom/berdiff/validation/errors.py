# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The one way bad input is reported: :class:`KnobError` (``<knob> = <value>: <allowed range>``), :func:`root_cause`
(the original exception behind MONAI's wrappers), :func:`error_line` and :func:`exit_on_error` (``error: <message>``
and exit status 1 on the command line, unless ``BERDIFF_DEBUG=1`` keeps the traceback).
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

__all__ = ["DEBUG_ENV", "USER_ERRORS", "KnobError", "debug_enabled", "root_cause", "error_line", "exit_on_error"]

#: set this environment variable (to anything but "" or "0") to keep the traceback of command-line errors
DEBUG_ENV = "BERDIFF_DEBUG"
#: exceptions that mean "bad input or settings": one line on the command line instead of a stack trace
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    OSError,  # e.g. no space left on the device
)


class KnobError(ValueError):
    """
    A setting outside its allowed values; the message is ``<knob> = <value>: <allowed>``.

    Args:
        knob: the setting's name (as on the command line).
        value: the value given.
        allowed: the allowed values, in words (``an integer in [1, 1000]``).
    """

    def __init__(self, knob: str, value: Any, allowed: str) -> None:
        self.knob, self.value, self.allowed = knob, value, allowed
        super().__init__(f"{knob} = {value!r}: {allowed}")


def debug_enabled() -> bool:
    """Whether ``BERDIFF_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def root_cause(error: BaseException) -> BaseException:
    """
    The original exception behind MONAI's ``RuntimeError("applying transform ...")`` wrappers (``Compose`` wraps
    every error raised inside a transform), so that a clear message such as "image file not found: ..." can be shown.

    Args:
        error: the exception caught.
    """
    while isinstance(error, RuntimeError) and error.__cause__ is not None and "applying transform" in str(error):
        error = error.__cause__
    return error


def _unwrap(error: BaseException) -> BaseException:
    """The original exception behind MONAI's wrappers (transforms, config expressions and instantiation)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        error = root_cause(error)
        text = str(error)
        wrapped = isinstance(error, RuntimeError) and (
            "Failed to evaluate" in text or "Failed to instantiate" in text or "applying transform" in text
        )
        if not (wrapped and error.__cause__ is not None):
            break
        error = error.__cause__
    return error


def _writer_failure(message: str) -> str | None:
    """
    MONAI's ``SaveImage`` replaces a writer's error (e.g. a full disk) by ``RuntimeError("... cannot find a suitable
    writer for <file> ...")`` holding the original traceback as text: the file and the original error's last line.
    """
    head = message.split("\n", 1)[0]
    if "cannot find a suitable writer for" not in head:
        return None
    filename = head.split("cannot find a suitable writer for", 1)[1].strip().rstrip(".")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return f"cannot write {filename}: {last}" if last and last != head.strip() else None


def error_line(error: BaseException) -> str:
    """``error: <message of the root cause>``: the line printed for ``error`` on the command line."""
    cause = _unwrap(error)
    message = _writer_failure(str(cause)) if isinstance(cause, RuntimeError) else None
    message = message or str(cause)
    if isinstance(cause, (KeyError,)) and message.startswith(("'", '"')):
        message = message[1:-1]
    if not message:
        message = type(cause).__name__
    return f"error: {message}"


def exit_on_error(error: BaseException) -> NoReturn:
    """
    Reports ``error`` on the command line: prints :func:`error_line` to stderr and exits with status 1 without a
    stack trace. With ``BERDIFF_DEBUG=1`` the (root cause) exception is raised instead.

    Args:
        error: the exception caught.
    """
    if debug_enabled():
        cause = _unwrap(error)
        if cause is error:
            raise error
        raise cause from error
    sys.stdout.flush()
    print(error_line(error), file=sys.stderr, flush=True)
    raise SystemExit(1) from None
