# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
"""Command line: ``python -m berdiff <command> [--flag value ...]`` (a ``fire`` CLI; ``--help`` on any command)."""

from berdiff.apps.cli import main

if __name__ == "__main__":
    main()
