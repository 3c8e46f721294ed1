# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""``scripts/gpu_report.sh --dry-run``: every part of the GPU report runs its commands on the CPU with tiny sizes."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import unittest
from pathlib import Path

from berdiff.apps.benchmark import benchmark
from berdiff.apps.gpu_report import DRY_PLAN, PARTS, REAL_PLAN, _printed_rows, pick_budget, pick_epochs
from berdiff.apps.train_speed import train_speed
from berdiff.data.brats import prepare_brats
from tests.utils import ROOT


def _flag_names(args) -> list[str]:
    return [a[2:].split("=")[0] for a in args if a.startswith("--")]


class TestGpuReportPlans(unittest.TestCase):
    def test_flags_exist(self):
        """Every flag of both plans is a parameter of the command it is given to (a typo fails here, not on a GPU)."""
        for plan in (REAL_PLAN, DRY_PLAN):
            self.assertEqual(set(plan.part_s), set(PARTS))
            self.assertLessEqual(sum(plan.part_s.values()), plan.total_s)
            for flags, func in ((plan.bench_args, benchmark), (plan.prepare_args, prepare_brats)):
                params = inspect.signature(func).parameters
                for name in _flag_names(flags):
                    self.assertIn(name, params, f"{func.__name__} has no flag --{name}")
            params = inspect.signature(train_speed).parameters
            for run in plan.speed_runs:
                self.assertTrue({"small", "reference"} >= set(run["role"].split(",")))
                for name in set(run) - {"role"}:
                    self.assertIn(name, params)
        roles = {r for run in REAL_PLAN.speed_runs for r in run["role"].split(",")}
        self.assertEqual(roles, {"small", "reference"})
        small = next(r for r in REAL_PLAN.speed_runs if "small" in r["role"])
        self.assertEqual(small["size"], REAL_PLAN.bench_size)  # the rates that size the benchmark's budget

    def test_sizing(self):
        rates, flops = {"autoencoder": 100.0, "diffusion": 400.0}, {"autoencoder": 5e9, "diffusion": 1.5e9}
        budget, seconds = pick_budget(rates, flops, (1.0, 2.0, 4.0, 8.0), train_s=30.0, efficiency=1.0)
        # 1 TFLOP: 0.5e12 / 5e11 + 0.5e12 / 6e11 + 1e12 / 6e11 = 3.5 s; 8 TFLOP: 28 s
        self.assertEqual(budget, 8.0)
        self.assertAlmostEqual(seconds, 28.0)
        self.assertEqual(pick_budget(rates, flops, (16.0,), 30.0, 1.0), (None, None))
        self.assertEqual(pick_budget({}, flops, (1.0,), 30.0, 1.0), (None, None))
        self.assertEqual(pick_epochs(100.0, 50, 10.0, 0.5, 400, 3), 10)
        self.assertEqual(pick_epochs(100.0, 5000, 10.0, 0.5, 400, 3), 1)
        self.assertEqual(pick_epochs(None, 50, 10.0, 0.5, 400, 3), 3)
        self.assertEqual(pick_epochs(1e6, 50, 10.0, 0.5, 400, 3), 400)
        self.assertEqual(pick_epochs(1e6, 50, 10.0, 0.5, 400, 3, epoch_overhead_s=0.5), 19)

    def test_printed_rows(self):
        """A train_speed run stopped at its limit keeps the rows it printed."""
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "x.log"
            log.write_text('$ cmd\n{"stage": "autoencoder", "preset": "small", "legacy": 1.0, "fast": 2.0}\nnoise\n'
                           '{"stage": "diffusion", "preset": "small", "legacy": 3.0, "fast": 4\n')
            expected = [{"stage": "autoencoder", "preset": "small", "legacy": 1.0, "fast": 2.0}]
            self.assertEqual(_printed_rows(log), expected)
            self.assertEqual(_printed_rows(Path(tmp) / "missing.log"), [])


class TestGpuReportDryRun(unittest.TestCase):
    def test_dry_run(self):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out")
            env = {**os.environ, "OUT": out, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
                   "BERDIFF_WHEELS": os.path.join(tmp, "no_wheels"), "PYTHONWARNINGS": "ignore",
                   "BERDIFF_GPU_REPORT_ARGS": f"--work {os.path.join(tmp, 'work')}"}
            proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_report.sh"), "--dry-run"], env=env,
                                  capture_output=True, text=True, timeout=900)
            self.assertEqual(proc.returncode, 0, proc.stdout[-3000:] + proc.stderr[-3000:])
            with open(os.path.join(out, "gpu_report.json")) as f:
                report = json.load(f)
            with open(os.path.join(out, "gpu_report.md")) as f:
                md = f.read()
            for name in PARTS:
                part = report["parts"][name]
                self.assertEqual(part["status"], "ok", json.dumps(part, indent=1)[-3000:])
                self.assertIn(f"| {name} | ok |", md)
                for step in part["steps"]:
                    self.assertTrue(os.path.isfile(os.path.join(out, step["log"])))
            speed = report["parts"]["train_speed"]["results"]["runs"][0]["rows"]
            self.assertEqual({r["stage"] for r in speed}, {"autoencoder", "diffusion"})
            self.assertTrue(all(r["fast"] > 0 and r["legacy"] > 0 for r in speed))
            inference = report["parts"]["inference"]["results"]
            self.assertEqual(inference["num_cases"], DRY_PLAN.volumes)
            self.assertGreater(inference["cases_per_s"], 0)
            bench = report["parts"]["benchmark"]["results"]
            self.assertIn(bench["budget_tflop"], DRY_PLAN.bench_ladder)
            self.assertEqual(set(bench["methods"]), {"ae", "unmasked", "masked", "ddpm"})
            brats = report["parts"]["brats"]["results"]
            self.assertEqual(brats["counts"]["validation"]["subjects"], 4)
            self.assertEqual(set(brats["train_seconds"]), {"autoencoder", "diffusion"})
            self.assertIn("anomaly", brats["maps"])
            for name in ("train_speed", "Bundle inference", "Equal compute", "BraTS sample"):
                self.assertIn(name, md)


if __name__ == "__main__":
    unittest.main()
