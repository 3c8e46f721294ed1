# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Atomic file writing: every file berdiff writes goes first to a hidden temporary file in its destination folder and
is moved onto its final name with ``os.replace``, so a crash, a full disk or bad input never leaves a partial file
under the final name, and the temporary file is removed on error.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

from berdiff.utils.json_safe import to_json_safe
from berdiff.utils.names import NIFTI_SUFFIXES

__all__ = [
    "temp_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_json",
    "atomic_save_torch",
]


def _suffix(base: str) -> str:
    lower = base.lower()
    for ext in NIFTI_SUFFIXES:
        if lower.endswith(ext):
            return base[-len(ext):]
    return os.path.splitext(base)[1]


def temp_path(path: os.PathLike | str) -> str:
    """
    Creates a hidden, uniquely named empty file next to ``path`` that keeps its extension (writers such as nibabel
    choose compression from it) and has the usual permissions (``mkstemp`` would leave 0600), and returns its name.

    Args:
        path: the final file name.
    """
    folder, base = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".tmp{_suffix(base)}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


def atomic_write(path: os.PathLike | str, write: Callable[[str], Any]) -> str:
    """
    Calls ``write(temporary_name)`` and moves the result onto ``path``; on any error the temporary file is removed
    and ``path`` is left as it was.

    Args:
        path: the final file name (its folder is created).
        write: writes the whole file to the name it is given.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: os.PathLike | str, data: bytes) -> str:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_json(obj: Any, path: os.PathLike | str, indent: int | None = 2) -> str:
    """
    Writes ``obj`` as strict JSON (through :func:`berdiff.utils.to_json_safe`: NaN and inf become ``null``, numpy
    and torch values become Python numbers) with a final newline, atomically.

    Args:
        obj: the value to write.
        path: destination file.
        indent: JSON indentation (``None``: one line).
    """
    text = json.dumps(to_json_safe(obj), indent=indent, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_files(files: Mapping[os.PathLike | str, bytes]) -> list[str]:
    """
    Writes several files as one step: all are written to temporary files first and moved into place only when every
    one of them was written, so an error leaves none of them changed.

    Args:
        files: final file name -> content.

    Returns:
        the names written.
    """
    temps: list[tuple[str, str]] = []
    try:
        for path, data in files.items():
            tmp = temp_path(path)
            temps.append((tmp, os.fspath(path)))
            with open(tmp, "wb") as f:
                f.write(data)
        for tmp, path in temps:
            os.replace(tmp, path)
        temps = []
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.remove(tmp)
    return [os.fspath(p) for p in files]


def atomic_save_torch(obj: Any, path: os.PathLike | str) -> str:
    """``torch.save(obj, path)`` atomically: an interrupted save never leaves a truncated checkpoint."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
