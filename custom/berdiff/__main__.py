# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Command line: ``python -m berdiff <command> [--flag value ...]`` (a ``fire`` CLI; ``--help`` on any command)."""

from berdiff.apps.cli import main

if __name__ == "__main__":
    main()
