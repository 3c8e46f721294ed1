# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""``python -m berdiff`` commands. A command's module is imported only when that command runs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from berdiff.validation import USER_ERRORS, exit_on_error

__all__ = ["COMMANDS", "USER_ERRORS", "main"]

#: command name -> "module:function"
COMMANDS: dict[str, str] = {
    "prepare_brats": "berdiff.data.brats:prepare_brats",
    "calibrate": "berdiff.apps.calibration:calibrate",
    "evaluate": "berdiff.evaluation:evaluate",
    "autoencoder_check": "berdiff.evaluation.autoencoder_check:autoencoder_check",
    "make_demo_data": "berdiff.data.synthetic:make_demo_data",
    "demo": "berdiff.apps.demo:demo",
    "brats_study": "berdiff.apps.brats_study:brats_study",
    "make_lesions": "berdiff.data.lesions:make_lesions",
    "benchmark": "berdiff.apps.benchmark:benchmark",
    "train_speed": "berdiff.apps.train_speed:train_speed",
    "speed": "berdiff.apps.speed:speed",
    "oct_validation": "berdiff.apps.oct_validation:oct_validation",
    "oct_sweep": "berdiff.apps.oct_sweep:oct_sweep",
    "oct_folds": "berdiff.apps.oct_folds:oct_folds",
    "demo_oct": "berdiff.apps.demo_oct:demo_oct",
    "build_bundle": "berdiff.apps.release:build_bundle",
    "build_bundles": "berdiff.apps.release:build_bundles",
    "gpu_report": "berdiff.apps.gpu_report:gpu_report",
}


def _usage() -> str:
    """The usage text: the commands and how to see a command's flags."""
    lines = ["usage: python -m berdiff <command> [--flag value ...]", "", "commands:"]
    lines += [f"  {name}" for name in COMMANDS]
    lines += ["", "python -m berdiff <command> --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """
    Dispatch ``argv`` to the named command through ``fire``; bad input exits with one ``error:`` line.

    Args:
        argv: the command and its flags (default ``sys.argv[1:]``).
    """
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return
    if argv[0] not in COMMANDS:
        print(f"unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func_name = COMMANDS[argv[0]].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        fire.Fire({argv[0]: func}, command=argv, name="python -m berdiff")
    except USER_ERRORS as e:  # bad input: one clear line, no stack trace (BERDIFF_DEBUG=1 shows it)
        exit_on_error(e)
