# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The method layer (schedulers, residual, sampling, networks, losses, engines) imports nothing from the layers above it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import unittest
from pathlib import Path

import berdiff

PACKAGE = Path(berdiff.__file__).resolve().parent
#: module -> berdiff modules it may import
ALLOWED = {
    "schedulers": {"berdiff.utils"},
    "residual": {"berdiff.utils"},
    "sampling": {"berdiff.residual", "berdiff.schedulers", "berdiff.utils"},
    "losses": {"berdiff.schedulers", "berdiff.utils"},
    "engines": {"berdiff.schedulers", "berdiff.utils"},
    "networks": {"berdiff.networks", "berdiff.residual", "berdiff.sampling", "berdiff.schedulers", "berdiff.utils"},
}


def _berdiff_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("berdiff"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("berdiff"))
    return names


def _allowed(name: str, allowed: set[str]) -> bool:
    return any(name == a or name.startswith(a + ".") for a in allowed)


class TestLayering(unittest.TestCase):
    def test_method_layer_imports(self):
        for module, allowed in ALLOWED.items():
            folder = PACKAGE / module
            files = sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / f"{module}.py"]
            self.assertTrue(files, module)
            for path in files:
                bad = sorted(n for n in _berdiff_imports(path) if not _allowed(n, allowed))
                self.assertEqual(bad, [], f"{path.name} imports from a higher layer")

    def test_networks_do_not_load_the_inferers(self):
        code = "import sys, berdiff.networks; print('berdiff.inferers' in sys.modules)"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        self.assertEqual(out.stdout.strip(), "False")


if __name__ == "__main__":
    unittest.main()
