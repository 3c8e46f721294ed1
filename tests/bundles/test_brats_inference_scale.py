# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""configs/inference.yaml at scale: torchrun (2 gloo processes) equals one process, killed runs resume, bad cases."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import unittest

import nibabel as nib
import numpy as np

from tests.utils import (
    BUNDLE,
    INFERENCE_CONFIG,
    NON_RAS_AFFINE,
    TempDirMixin,
    assert_raises_cause,
    make_case,
    nifti_outputs,
    run_workflow,
    subprocess_env,
)

CONFIG = INFERENCE_CONFIG
MULTI_GPU_CONFIG = os.path.join(BUNDLE, "configs", "multi_gpu_inference.yaml")
POSTFIXES = ("anomaly", "anomaly_mask", "latent_confident_change")  # the default outputs, sorted
#: tiny preset, random (seeded) weights, CPU: the command-line form of tests.utils.overrides
CLI_ARGS = [
    "--preset", "tiny", "--spatial_size", "[32, 32]", "--noise_level", "4", "--num_inference_steps", "2",
    "--progress", "False", "--device", "cpu", "--allow_random_weights", "True",
]


def _env() -> dict:
    return subprocess_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _summary(folder: str) -> dict:
    with open(os.path.join(folder, "run_summary.json")) as f:
        return json.load(f)


def assert_same_outputs(test: unittest.TestCase, a: str, b: str) -> None:
    """The same NIfTI files in both folders, with equal voxel data, dtypes and headers."""
    names = nifti_outputs(a)
    test.assertEqual(names, nifti_outputs(b))
    test.assertTrue(names)
    for name in names:
        x, y = nib.load(os.path.join(a, name)), nib.load(os.path.join(b, name))
        test.assertEqual(x.get_data_dtype(), y.get_data_dtype(), name)
        np.testing.assert_array_equal(np.asarray(x.dataobj), np.asarray(y.dataobj), err_msg=name)
        test.assertEqual(x.header.binaryblock, y.header.binaryblock, name)


class TestScaleInference(TempDirMixin, unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.data = os.path.join(self.tmp, "data")
        self.no_weights = os.path.join(self.tmp, "no_model.pt")

    def _cases(self, n: int) -> list[str]:
        names = [f"case{i}" for i in range(n)]
        for i, name in enumerate(names):
            make_case(self.data, name, NON_RAS_AFFINE if i % 2 else np.eye(4), seed=10 + i)
        return names

    def _run(self, out: str, **kwargs):
        return run_workflow(
            self.tmp, dataset_dir=self.data, output_dir=out, ckpt_path=self.no_weights, allow_random_weights=True,
            **kwargs,
        )

    def test_torchrun_two_gloo_processes_equal_one_process(self):
        self._cases(3)  # odd: the ranks get 2 and 1 cases, nothing padded or written twice
        single, multi = os.path.join(self.tmp, "single"), os.path.join(self.tmp, "multi")
        self._run(single)
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
            "-m", "monai.bundle", "run", "inference",
            "--config_file", repr([CONFIG, MULTI_GPU_CONFIG]), "--dataset_dir", self.data, "--output_dir", multi,
            "--ckpt_path", self.no_weights, *CLI_ARGS,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=BUNDLE, env=_env(), timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        assert_same_outputs(self, single, multi)
        self.assertEqual(sorted(os.listdir(multi)), sorted(nifti_outputs(multi) + ["run_summary.json"]))
        summary = _summary(multi)
        self.assertEqual(summary["status"], "completed")
        self.assertEqual(summary["num_processes"], 2)
        self.assertEqual(summary["settings"]["world_size"], 2)
        self.assertEqual(summary["done"], ["case0", "case1", "case2"])
        self.assertEqual([c["case"] for c in summary["cases"]], ["case0", "case1", "case2"])
        self.assertEqual(sorted(p["num_cases"] for p in summary["processes"]), [1, 2])

    def test_killed_run_resumes_with_the_same_outputs(self):
        names = self._cases(4)
        reference, out = os.path.join(self.tmp, "reference"), os.path.join(self.tmp, "out")
        self._run(reference)
        cmd = [
            sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", CONFIG,
            "--dataset_dir", self.data, "--output_dir", out, "--ckpt_path", self.no_weights, "--num_workers", "0",
            *CLI_ARGS,
        ]
        proc = subprocess.Popen(cmd, cwd=BUNDLE, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        first = [os.path.join(out, f"{names[0]}_{p}.nii.gz") for p in POSTFIXES]
        deadline = time.time() + 240
        while not all(os.path.exists(f) for f in first) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        self.assertTrue(all(os.path.exists(f) for f in first), "the first case was not written")
        # whatever the kill left, make case1 partial (one map and a stale temporary file, as a kill mid-case leaves)
        for p in POSTFIXES[1:]:
            if os.path.exists(os.path.join(out, f"{names[1]}_{p}.nii.gz")):
                os.remove(os.path.join(out, f"{names[1]}_{p}.nii.gz"))
        if not os.path.exists(os.path.join(out, f"{names[1]}_anomaly.nii.gz")):
            os.link(os.path.join(reference, f"{names[0]}_anomaly.nii.gz"), os.path.join(out, f"{names[1]}_anomaly.nii.gz"))
        open(os.path.join(out, f".{names[1]}_anomaly_mask.nii.gz.x1.tmp.nii.gz"), "w").close()
        mtime = os.stat(first[0]).st_mtime_ns
        self._run(out, skip_existing=True)
        assert_same_outputs(self, reference, out)
        self.assertEqual([f for f in os.listdir(out) if f.startswith(".")], [], "temporary files left")
        self.assertEqual(os.stat(first[0]).st_mtime_ns, mtime, "a complete case was recomputed")
        summary = _summary(out)
        self.assertEqual(summary["status"], "completed")
        self.assertIn(names[0], summary["skipped"])
        self.assertIn(names[1], summary["done"])
        self.assertEqual(sorted(summary["skipped"] + summary["done"]), names)
        self.assertEqual(summary["settings"]["skip_existing"], True)
        # everything complete: a third run skips all cases
        self._run(out, skip_existing=True)
        self.assertEqual((_summary(out)["skipped"], _summary(out)["done"]), (names, []))

    def _corrupt(self, name: str) -> None:
        with open(os.path.join(self.data, name, f"{name}_t1ce.nii.gz"), "wb") as f:
            f.write(b"not a nifti file")

    def test_corrupt_case_continue_reports_it_and_runs_the_others(self):
        names = self._cases(3)
        self._corrupt(names[1])
        out = os.path.join(self.tmp, "out")
        stderr = io.StringIO()
        with self.assertRaises(SystemExit) as ctx, contextlib.redirect_stderr(stderr):
            self._run(out, on_error="continue", num_workers=2)
        self.assertEqual(ctx.exception.code, 1)
        self.assertIn("error: 1 of 3 case(s) failed: case1", stderr.getvalue())
        self.assertEqual(nifti_outputs(out), sorted(f"{n}_{p}.nii.gz" for n in (names[0], names[2]) for p in POSTFIXES))
        summary = _summary(out)
        self.assertEqual(summary["status"], "completed_with_failures")
        self.assertEqual((summary["done"], summary["failed"]), ([names[0], names[2]], [names[1]]))
        failed = summary["cases"][1]
        self.assertEqual((failed["case"], failed["status"]), (names[1], "failed"))
        self.assertIn("case1_t1ce.nii.gz", failed["error"])
        for case in (summary["cases"][0], summary["cases"][2]):
            for key in ("load_time_s", "preprocess_time_s", "network_time_s", "postprocess_time_s", "write_time_s"):
                self.assertGreater(case[key], 0, key)

    def test_corrupt_case_stop(self):
        names = self._cases(3)
        self._corrupt(names[1])
        out = os.path.join(self.tmp, "out")
        assert_raises_cause(self, ValueError, "case1_t1ce.nii.gz", self._run, out, on_error="raise", num_workers=2)
        self.assertEqual(nifti_outputs(out), [f"{names[0]}_{p}.nii.gz" for p in POSTFIXES])
        summary = _summary(out)
        self.assertEqual((summary["status"], summary["done"]), ("failed", [names[0]]))


if __name__ == "__main__":
    unittest.main()
