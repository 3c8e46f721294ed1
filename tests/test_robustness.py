# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
The robustness matrix: bad knobs, configs loaded without data, hostile or odd input files, broken checkpoints, failing
writes and visible progress. Each bad case must give one clear error naming the problem and leave no output behind.
Tiny presets and volumes; a subprocess only where the one-line command-line behaviour itself is tested.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path
from unittest import mock

import nibabel as nib
import numpy as np
import torch
from parameterized import parameterized

from berdiff.handlers import TrainingProgress, format_duration, preflight, training_preflight
from berdiff.io import (
    AtomicNibabelWriter,
    MissingData,
    check_checkpoint,
    check_unique_outputs,
    inference_datalist,
    load_state_dict,
)
from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.training import load_weights, training_datalist
from berdiff.transforms import check_image_header, volume_preprocessing
from berdiff.utils import atomic_save_torch as save_state_dict
from berdiff.utils import atomic_write_json
from berdiff.validation import KnobError, check_settings, error_line, exit_on_error, spatial_multiple
from tests.utils import BUNDLE_CONFIGS, MODALITIES, TempDirMixin, check_config_without_data, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
BRATS = ROOT / "bundles" / "brats_mri_bernoulli_anomaly" / "configs"
SHAPE = (12, 12, 4)


def _env() -> dict[str, str]:
    env = subprocess_env(PYTHONWARNINGS="ignore")
    env.pop("BERDIFF_DEBUG", None)
    return env


def _case(folder: str, case: str = "c", data: np.ndarray | None = None, affine=np.eye(4)) -> list[str]:
    """A BraTS-layout case of 4 small modality files (random head, zero background unless ``data`` is given)."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, case), exist_ok=True)
    files = []
    for m in MODALITIES:
        if data is None:
            vol = np.zeros(SHAPE, np.float32)
            vol[2:10, 2:10] = rng.random((8, 8, SHAPE[2])) + 1
        else:
            vol = data
        files.append(os.path.join(folder, case, f"{case}_{m}.nii.gz"))
        nib.save(nib.Nifti1Image(vol, affine), files[-1])
    return files


def _one_line_exit(test: unittest.TestCase, func, *args, **kwargs) -> str:
    """``func`` exits with status 1 and prints exactly one ``error:`` line (and no traceback); returns the line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), test.assertRaises(SystemExit) as ctx:
        func(*args, **kwargs)
    test.assertEqual(ctx.exception.code, 1)
    lines = err.getvalue().splitlines()
    test.assertEqual(len(lines), 1, err.getvalue())
    test.assertTrue(lines[0].startswith("error: "), lines[0])
    return lines[0]


class TestKnobs(unittest.TestCase):
    @parameterized.expand(
        [
            ({"noise_level": 5000}, r"^noise_level = 5000: an integer in \[1, 1000\]"),
            ({"noise_level": 0}, r"^noise_level = 0: "),
            ({"noise_level": 2.5}, r"^noise_level = 2.5: "),
            ({"num_train_timesteps": 50, "noise_level": 51}, r"^noise_level = 51: an integer in \[1, 50\]"),
            ({"prob_threshold": 1.7}, r"^prob_threshold = 1.7: a number in \(0, 1\)"),
            ({"prob_threshold": 0.0}, r"^prob_threshold = 0.0: a number in \(0, 1\)"),
            ({"noise_level": 10, "num_inference_steps": 0}, r"^num_inference_steps = 0: null or an integer >= 1"),
            ({"preset": "huge"}, r"^preset = 'huge': one of reference, small, tiny"),
            ({"preset": "smal"}, r"did you mean 'small'"),
            ({"preset": "small", "spatial_size": [40, 40]}, r"^spatial_size = \[40, 40\]: .*multiple of 16"),
            ({"spatial_size": [32, 32, 32]}, r"^spatial_size = "),
            ({"spatial_size": -8}, r"^spatial_size = -8: "),
            ({"device": "gpu7"}, r"^device = 'gpu7': a torch device"),
            ({"device": "cuda:99"}, r"^device = 'cuda:99': "),
            ({"batch_size": 0}, r"^batch_size = 0: an integer in \[1, inf\)"),
            ({"learning_rate": float("nan")}, r"^learning_rate = nan: "),
            ({"cache_rate": 1.5}, r"^cache_rate = 1.5: a number in \[0, 1\]"),
            ({"ema_momentum": 0}, r"^ema_momentum = 0: a number in \(0, 1\]"),
            ({"train_max_timestep": 1001}, r"^train_max_timestep = 1001: an integer in \[1, 1000\] or null"),
            ({"anomaly_reference": "output"}, r"^anomaly_reference = 'output': one of input, autoencoder"),
            ({"amp": "yes"}, r"^amp = 'yes': True or False"),
        ]
    )
    def test_bad_value_names_knob_value_and_range(self, settings, pattern):
        with self.assertRaises(KnobError) as ctx:
            check_settings(settings)
        self.assertRegex(str(ctx.exception), pattern)
        self.assertIsInstance(ctx.exception, ValueError)  # a user error on every command line

    def test_good_values_pass_and_are_normalised(self):
        out = check_settings(
            {"preset": "tiny", "spatial_size": 32, "noise_level": 4, "num_inference_steps": None, "device": "cpu",
             "prob_threshold": 0.5, "train_max_timestep": None, "seed": None}
        )
        self.assertEqual(out["spatial_size"], [32, 32])
        self.assertEqual(out["preset"], "tiny")
        self.assertEqual([spatial_multiple(p) for p in ("tiny", "small", "reference")], [4, 16, 64])
        with self.assertRaisesRegex(ValueError, "unknown settings"):
            check_settings({"noise_levle": 3})

    def test_spatial_multiple_matches_the_networks(self):
        """The size rule is the networks' own: a multiple runs, the size in between fails."""
        ae = autoencoder_from_preset("tiny", in_channels=1)
        pipe = AnomalyPipeline(ae, denoiser_from_preset("tiny", latent_channels=ae.latent_channels), noise_level=2)
        m = spatial_multiple("tiny")
        with torch.no_grad():
            self.assertEqual(pipe(torch.rand(1, 1, 8 * m, 8 * m)).shape[-1], 8 * m)
            with self.assertRaises(RuntimeError):
                pipe(torch.rand(1, 1, 8 * m + 2, 8 * m + 2))

    def test_exit_on_error_is_one_line_and_debug_keeps_the_exception(self):
        error = RuntimeError("Failed to evaluate ConfigExpression")
        error.__cause__ = KnobError("noise_level", 5000, "an integer in [1, 1000]")
        self.assertEqual(error_line(error), "error: noise_level = 5000: an integer in [1, 1000]")
        line = _one_line_exit(self, exit_on_error, error)
        self.assertEqual(line, "error: noise_level = 5000: an integer in [1, 1000]")
        with mock.patch.dict(os.environ, {"BERDIFF_DEBUG": "1"}), self.assertRaises(KnobError):
            exit_on_error(error)


class TestCommandLine(TempDirMixin, unittest.TestCase):
    """The one-line behaviour of the real commands (subprocesses)."""

    def _bundle(self, *args: str, env=None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "inference", "--config_file", str(BRATS / "inference.yaml"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=300)

    def test_bad_knobs_on_monai_bundle_run(self):
        tmp = self.tmp
        out = os.path.join(tmp, "out")
        proc = self._bundle("--noise_level", "5000", "--output_dir", out, "--dataset_dir", tmp)
        self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        self.assertEqual(errors, ["error: noise_level = 5000: an integer in [1, 1000] (T = num_train_timesteps)"])
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        self.assertFalse(os.path.exists(out))
        # BERDIFF_DEBUG=1 keeps the traceback for developers
        proc = self._bundle("--prob_threshold", "1.7", "--output_dir", out, env={**_env(), "BERDIFF_DEBUG": "1"})
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("Traceback", proc.stderr)
        self.assertIn("prob_threshold = 1.7: a number in (0, 1)", proc.stderr)

    def test_bundle_preflight_bad_knobs(self):
        """The same check in process (the bundle's first run step), for the other knobs of the report."""
        for settings, expected in (
            ({"preset": "huge"}, "error: preset = 'huge': one of reference, small, tiny"),
            ({"prob_threshold": 1.7}, "error: prob_threshold = 1.7: a number in (0, 1)"),
            ({"noise_level": 5000}, "error: noise_level = 5000: an integer in [1, 1000] (T = num_train_timesteps)"),
        ):
            tmp = self.tmp
            self.assertEqual(_one_line_exit(self, preflight, image=_case(tmp), settings=settings), expected)

    def test_calibrate_bad_knob(self):
        from berdiff.apps.cli import main

        tmp = self.tmp
        datalist = os.path.join(tmp, "healthy.json")
        with open(datalist, "w") as f:
            json.dump({"validation": [{"image": _case(tmp)}]}, f)
        out = os.path.join(tmp, "calibration.json")
        bundle = str(BRATS.parent)
        line = _one_line_exit(
            self, main, ["calibrate", "--bundle_root", bundle, "--datalist", datalist, "--out", out, "--noise_level", "5000"]
        )
        self.assertEqual(line, "error: noise_level = 5000: an integer in [1, 1000] (T = num_train_timesteps)")
        self.assertFalse(os.path.exists(out))

    def test_berdiff_cli_bad_knob(self):
        from berdiff.apps.cli import main

        tmp = self.tmp
        out = os.path.join(tmp, "demo")
        line = _one_line_exit(self, main, ["demo", "--noise_level", "5000", "--out", out])
        self.assertEqual(line, "error: noise_level = 5000: an integer in [1, 1000] (T = num_train_timesteps)")
        line = _one_line_exit(self, main, ["demo", "--preset", "huge", "--out", out])
        self.assertEqual(line, "error: preset = 'huge': one of reference, small, tiny")
        self.assertFalse(os.path.exists(out))


class TestConfigsParseWithoutData(TempDirMixin, unittest.TestCase):
    """Every config initialises and passes check_properties with its defaults, with no data and no weights; the
    missing data are reported when the run starts, and nothing is written then."""

    def test_single_process_configs(self):
        for name in BUNDLE_CONFIGS:
            if not name.startswith("multi_gpu"):
                with self.subTest(name):
                    check_config_without_data(name)

    def test_multi_gpu_configs(self):
        """In a subprocess: they initialise a (one-process) process group, which must not leak into other tests."""
        names = [n for n in BUNDLE_CONFIGS if n.startswith("multi_gpu")]
        code = "import sys; from tests.utils import check_config_without_data as c; [c(n) for n in sys.argv[1:]]"
        env = _env()
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env["PYTHONPATH"]])
        proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])

    def test_deferred_datalists(self):
        tmp = self.tmp
        missing = inference_datalist(dataset_dir=os.path.join(tmp, "nowhere"), defer_errors=True)
        self.assertIsInstance(missing, MissingData)
        self.assertEqual(len(missing), 0)
        self.assertIn("source not found", str(missing.error))
        train = training_datalist(os.path.join(tmp, "prepared", "datalist.json"))
        self.assertIsInstance(train, MissingData)
        with self.assertRaisesRegex(FileNotFoundError, "training data not found"):
            training_datalist(os.path.join(tmp, "prepared", "datalist.json"), defer_missing=False)
        line = _one_line_exit(self, training_preflight, {"batch_size": 2}, train)
        self.assertIn("training data not found", line)
        line = _one_line_exit(self, training_preflight, {"batch_size": 0}, [{"image": "x"}])
        self.assertEqual(line, "error: batch_size = 0: an integer in [1, inf)")
        line = _one_line_exit(self, training_preflight, {}, [{"image": "x"}], [os.path.join(tmp, "ae.pt")])
        self.assertIn("checkpoint not found", line)
        self.assertEqual(training_preflight({}, [{"image": "x"}], on_error="raise"), 1)


class TestHostileInputs(TempDirMixin, unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.pre = volume_preprocessing("image", num_channels=4, spatial_size=(16, 16))

    def _fails(self, files, pattern: str) -> None:
        from berdiff.validation import root_cause

        with self.assertRaises(Exception) as ctx:
            self.pre({"image": files})
        cause = root_cause(ctx.exception)
        self.assertIsInstance(cause, ValueError, repr(cause))
        self.assertRegex(str(cause), pattern)

    def test_huge_header_is_refused_before_reading(self):
        header = nib.Nifti1Header()
        header.set_data_shape((30000, 30000, 30000))
        header.set_data_dtype(np.float32)
        path = os.path.join(self.tmp, "huge.nii")
        with open(path, "wb") as f:  # a header and 4 bytes of data: the claim alone must be refused
            f.write(header.binaryblock + b"\0" * (int(header["vox_offset"]) - header.sizeof_hdr) + b"\0" * 4)
        with self.assertRaisesRegex(ValueError, r"claims .* voxels, more than"):
            check_image_header(path, nib.load(path).shape, np.eye(4), (1, 1, 1))
        self._fails([path] * 4, r"huge.nii: the header claims \(30000, 30000, 30000\)")

    @parameterized.expand(
        [
            ("nan_affine", np.diag([np.nan, 1, 1, 1]), "affine is not a finite"),
            ("singular_affine", np.diag([1.0, 0.0, 1, 1]), "affine is singular"),
            ("absurd_pixdim", np.diag([1e6, 1, 1, 1]), "implausible voxel size"),
        ]
    )
    def test_bad_geometry(self, _, affine, pattern):
        files = _case(self.tmp, affine=np.eye(4))
        img = nib.load(files[0])
        header = img.header.copy()  # written as raw header fields: nibabel refuses to build such an image itself
        header["qform_code"], header["sform_code"] = 0, 1
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
        header["pixdim"][1:4] = np.abs(np.diag(affine)[:3])
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, header=header), files[0])
        self._fails(files, pattern)

    def test_four_d_file_with_wrong_channel_count(self):
        path = os.path.join(self.tmp, "three.nii.gz")
        nib.save(nib.Nifti1Image(np.ones((*SHAPE, 3), np.float32), np.eye(4)), path)
        self._fails(path, r"expected 4 channels under 'image', got 3")

    @parameterized.expand([("int16", np.int16), ("uint8", np.uint8), ("float64", np.float64)])
    def test_integer_and_float64_data_work(self, _, dtype):
        rng = np.random.default_rng(1)
        data = np.zeros(SHAPE, dtype)
        data[2:10, 2:10] = rng.integers(1, 100, (8, 8, SHAPE[2])).astype(dtype)
        out = self.pre({"image": _case(self.tmp, data=data)})["image"]
        self.assertEqual(out.dtype, torch.float32)
        self.assertEqual(tuple(out.shape), (4, 16, 16, SHAPE[2]))
        self.assertAlmostEqual(float(out.max()), 1.0, places=5)
        self.assertGreaterEqual(float(out.min()), 0.0)

    def test_blank_modality_is_refused_and_blank_volume_allowed(self):
        files = _case(self.tmp)
        nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), files[1])  # t1ce all zero
        self._fails(files, r"channel\(s\) \[1\] .* are constant .* blank modality")
        blank = _case(self.tmp, "blank", data=np.zeros(SHAPE, np.float32))
        self.assertEqual(float(self.pre({"image": blank})["image"].abs().max()), 0.0)

    def test_duplicate_output_names(self):
        a = _case(os.path.join(self.tmp, "site_a"), "case1")
        b = _case(os.path.join(self.tmp, "site_b"), "case1")
        datalist = os.path.join(self.tmp, "datalist.json")
        with open(datalist, "w") as f:
            json.dump({"testing": [{"image": a}, {"image": b}]}, f)
        with self.assertRaisesRegex(ValueError, r"two inputs map to the same output case1_anomaly.nii.gz"):
            check_unique_outputs(inference_datalist(datalist=datalist))
        out = os.path.join(self.tmp, "out")
        line = _one_line_exit(self, preflight, datalist=datalist, allow_random_weights=True, ckpt_path=os.path.join(self.tmp, "m.pt"))
        self.assertIn("site_a", line)
        self.assertIn("site_b", line)
        self.assertFalse(os.path.exists(out))

    def test_evaluate_refuses_unexpected_label_values(self):
        from berdiff.apps.cli import main

        pred, labels, out = (os.path.join(self.tmp, d) for d in ("pred", "labels", "eval"))
        os.makedirs(pred)
        os.makedirs(labels)
        rng = np.random.default_rng(2)
        for name, label in (("a", np.zeros(SHAPE, np.float32)), ("b", rng.random(SHAPE).astype(np.float32))):
            label[4:6, 4:6, 1:3] = 1.0
            nib.save(nib.Nifti1Image(rng.random(SHAPE).astype(np.float32), np.eye(4)), os.path.join(pred, f"{name}_anomaly.nii.gz"))
            nib.save(nib.Nifti1Image(label, np.eye(4)), os.path.join(labels, f"{name}_seg.nii.gz"))
        line = _one_line_exit(self, main, ["evaluate", "--pred", pred, "--label", labels, "--out", out, "--quiet", "True"])
        self.assertRegex(line, r"b_seg.nii.gz holds values that are not segmentation labels")
        self.assertFalse(os.path.exists(out))
        nib.save(nib.Nifti1Image(np.full(SHAPE, -1, np.int16), np.eye(4)), os.path.join(labels, "b_seg.nii.gz"))
        line = _one_line_exit(self, main, ["evaluate", "--pred", pred, "--label", labels, "--out", out, "--quiet", "True"])
        self.assertIn("-1", line)
        self.assertFalse(os.path.exists(out))


class TestCheckpoints(TempDirMixin, unittest.TestCase):
    def _pipeline(self, preset: str, in_channels: int = 4) -> AnomalyPipeline:
        ae = autoencoder_from_preset(preset, in_channels=in_channels)
        return AnomalyPipeline(ae, denoiser_from_preset(preset, latent_channels=ae.latent_channels))

    def test_not_a_state_dict(self):
        for name, content in (("list.pt", [1, 2, 3]), ("nested.pt", {"model": {"a": 1}}), ("empty.pt", {})):
            path = os.path.join(self.tmp, name)
            torch.save(content, path)
            with self.assertRaisesRegex(ValueError, r"is not a state dict"):
                check_checkpoint(path, preset="tiny", in_channels=4)
        legacy = os.path.join(self.tmp, "legacy.pt")  # the pre-zip format cannot be memory-mapped: read normally
        torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
        torch.testing.assert_close(load_state_dict(legacy, mmap=True)["w"], torch.ones(2))
        text = os.path.join(self.tmp, "text.pt")
        Path(text).write_text("not weights")
        with self.assertRaisesRegex(ValueError, r"cannot read checkpoint .*text.pt as PyTorch weights"):
            load_state_dict(text)

    def test_pickled_objects_are_not_loaded(self):
        """weights_only=True: a checkpoint holding arbitrary Python objects is refused, not unpickled."""
        path = os.path.join(self.tmp, "object.pt")
        torch.save({"w": torch.zeros(1), "obj": _Marker()}, path)
        with self.assertRaisesRegex(ValueError, "cannot read checkpoint"):
            load_state_dict(path)

    def test_other_preset_names_both_sizes(self):
        path = os.path.join(self.tmp, "model.pt")
        torch.save(self._pipeline("tiny", in_channels=1).state_dict(), path)
        self.assertTrue(check_checkpoint(path, preset="tiny", in_channels=1))
        with self.assertRaisesRegex(ValueError, r"holds a 'tiny' network with 1 image channel\(s\), but the configuration builds a 'small' network with 4"):
            check_checkpoint(path, preset="small", in_channels=4)
        with self.assertRaisesRegex(ValueError, r"holds a 'tiny' network with 1 image channel\(s\), but the configuration builds a 'tiny' network with 4"):
            check_checkpoint(path, preset="tiny", in_channels=4)
        # through the bundle's preflight: one line
        case = _case(self.tmp)
        line = _one_line_exit(self, preflight, image=case, ckpt_path=path, settings={"preset": "small"})
        self.assertIn("'tiny' network", line)
        self.assertIn("'small' network", line)

    def test_stage_weights_of_another_preset(self):
        path = os.path.join(self.tmp, "autoencoder_best.pt")
        torch.save(autoencoder_from_preset("tiny", in_channels=4).state_dict(), path)
        with self.assertRaisesRegex(ValueError, r"does not fit the network: .* has shape \(\d+, 4, 3, 3\) in the checkpoint, \(\d+, 4, 3, 3\) in the network"):
            load_weights(autoencoder_from_preset("small", in_channels=4), path)

    def test_every_torch_load_uses_weights_only(self):
        calls = 0
        for path in sorted((ROOT / "custom").rglob("*.py")):
            for call in re.findall(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", path.read_text(encoding="utf-8")):
                self.assertIn("weights_only=True", call, f"{path}: torch.load({call})")
                calls += 1
        self.assertGreaterEqual(calls, 4)  # io, training (via io), calibration, benchmark

    def test_benchmark_cache_round_trip_with_weights_only(self):
        from berdiff.apps.benchmark.fit import cached as _cached

        net = torch.nn.Linear(2, 2)
        path = Path(self.tmp) / "cache.pt"
        info = _cached(path, net, lambda: {"iterations": 3, "final_loss": 0.5}, {"channels": (8, 16), "lr": 1e-3})
        self.assertFalse(info["cached"])
        other = torch.nn.Linear(2, 2)
        again = _cached(path, other, lambda: self.fail("retrained"), {})
        self.assertEqual(again, {"iterations": 3, "final_loss": 0.5, "cached": True})
        torch.testing.assert_close(other.weight, net.weight)
        self.assertIsInstance(torch.load(path, weights_only=True)["info"], str)


class _Marker:
    pass


class TestFailingWrites(TempDirMixin, unittest.TestCase):
    def test_disk_full_half_way_leaves_neither_file_nor_temp(self):
        """The writer fails after writing part of the data: no final file, no temporary file."""
        from monai.data import MetaTensor
        from monai.transforms import SaveImage

        def half_then_enospc(img, filename):
            with open(filename, "wb") as f:
                f.write(img.header.binaryblock[:200])
            raise OSError(errno.ENOSPC, "No space left on device", filename)

        saver = SaveImage(output_dir=self.tmp, output_postfix="anomaly", separate_folder=False, resample=False,
                          print_log=False, writer=AtomicNibabelWriter)
        image = MetaTensor(torch.rand(1, 6, 6, 3), affine=torch.eye(4), meta={"filename_or_obj": "case1.nii.gz"})
        with mock.patch("nibabel.save", side_effect=half_then_enospc), self.assertRaises(RuntimeError) as ctx:
            saver(image)  # MONAI's SaveImage turns the writer's OSError into a RuntimeError (text only)
        self.assertEqual(os.listdir(self.tmp), [])
        line = error_line(ctx.exception)
        self.assertRegex(line, r"^error: cannot write .*case1_anomaly.nii.gz: OSError: \[Errno 28\] No space left on device")
        self.assertNotIn("\n", line)

    def test_json_and_checkpoint_writers(self):
        target = os.path.join(self.tmp, "summary.json")

        def full_disk(src, dst):
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch("os.replace", side_effect=full_disk), self.assertRaises(OSError):
            atomic_write_json({"a": 1}, target)
        self.assertEqual(os.listdir(self.tmp), [])

        def half_save(obj, f, *args, **kwargs):
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        with mock.patch("torch.save", side_effect=half_save), self.assertRaises(OSError):
            save_state_dict({"w": torch.zeros(2)}, os.path.join(self.tmp, "model.pt"))
        self.assertEqual(os.listdir(self.tmp), [])

    def test_output_folder_that_cannot_be_created(self):
        blocker = os.path.join(self.tmp, "file")
        Path(blocker).write_text("x")
        with self.assertRaises(OSError) as ctx:
            atomic_write_json({}, os.path.join(blocker, "out", "run_summary.json"))
        self.assertTrue(error_line(ctx.exception).startswith("error: "))
        self.assertEqual(os.listdir(self.tmp), ["file"])


class TestProgress(TempDirMixin, unittest.TestCase):
    def _trainer(self, epochs: int, iterations: int):
        from monai.engines import SupervisedTrainer

        net = torch.nn.Conv2d(1, 1, 1)
        data = [{"image": torch.rand(1, 4, 4), "label": torch.rand(1, 4, 4)} for _ in range(iterations)]
        return SupervisedTrainer(
            device="cpu", max_epochs=epochs, train_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
            network=net, optimizer=torch.optim.SGD(net.parameters(), 0.01), loss_function=torch.nn.L1Loss(),
            decollate=False,
        )

    def test_one_line_per_epoch_with_loss_elapsed_and_eta(self):
        trainer = self._trainer(epochs=3, iterations=2)
        out = io.StringIO()
        TrainingProgress("train_autoencoder", stream=out).attach(trainer)
        trainer.run()
        lines = out.getvalue().splitlines()
        epochs = [line for line in lines if re.match(r"train_autoencoder: epoch \d/3, loss [\d.]+, elapsed \d+:\d\d, eta \d+:\d\d$", line)]
        self.assertEqual(len(epochs), 3, lines)
        self.assertTrue(epochs[-1].endswith("eta 0:00"))
        self.assertTrue(lines[0].startswith("train_autoencoder: starting at epoch 1/3 (2 iterations per epoch)"))
        self.assertTrue(lines[-1].startswith("train_autoencoder: done in"))

    def test_long_epochs_print_within_the_epoch(self):
        trainer = self._trainer(epochs=1, iterations=4)
        out = io.StringIO()
        progress = TrainingProgress("train_diffusion", interval_s=1e-9, stream=out)
        progress.attach(trainer)
        trainer.run()
        within = [line for line in out.getvalue().splitlines() if ", iteration " in line]
        self.assertEqual([re.search(r"iteration (\d)/4", line).group(1) for line in within], ["1", "2", "3", "4"])
        with self.assertRaises(ValueError):
            TrainingProgress(interval_s=0)
        self.assertEqual([format_duration(s) for s in (5, 65, 3725, None)], ["0:05", "1:05", "1:02:05", "?"])

    def test_configs_attach_it(self):
        from monai.bundle import ConfigParser

        for name, (files, kind) in BUNDLE_CONFIGS.items():
            if kind == "train":
                with self.subTest(name):
                    handlers = ConfigParser.load_config_files([str(f) for f in files])["train"]["handlers"]
                    progress = [h for h in handlers if h["_target_"] == "berdiff.handlers.TrainingProgress"]
                    self.assertEqual(len(progress), 1)
                    self.assertEqual(progress[0]["name"], "train_diffusion" if "diffusion" in name else "train_autoencoder")

    def test_demo_echoes_progress_lines_and_logs_everything(self):
        from berdiff.apps.demo import _run

        tmp = self.tmp
        log = Path(tmp) / "step.log"
        script = "print('noise'); print('train_autoencoder: epoch 1/2, loss 0.1'); print('more noise')"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            _run([sys.executable, "-c", script], log, _env(), echo=("train_autoencoder:",))
        printed = out.getvalue().splitlines()
        self.assertEqual(printed[1:], ["    train_autoencoder: epoch 1/2, loss 0.1"])
        self.assertEqual(log.read_text().splitlines(), ["noise", "train_autoencoder: epoch 1/2, loss 0.1", "more noise"])


if __name__ == "__main__":
    unittest.main()
