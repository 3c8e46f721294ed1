# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.bundle_helpers: the named functions the bundle configs call instead of long ``$`` expressions."""

from __future__ import annotations

import logging
import os
import unittest
from unittest import mock

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from PIL import Image

from berdiff.bundle_helpers import (
    distributed,
    every_n_iterations,
    frozen,
    load_image_2d,
    log_on_main_process_only,
    scale_intensity_2d,
    spatial_size_2d,
    training_state,
)
from berdiff.data.images2d import read_image, resize_image, scale_intensity
from tests.utils import TempDirMixin, synthetic_head


class TestSizesAndIntervals(unittest.TestCase):
    def test_spatial_size_2d(self):
        self.assertEqual(spatial_size_2d(32), [32, 32])
        self.assertEqual(spatial_size_2d(np.int64(16)), [16, 16])
        self.assertEqual(spatial_size_2d([32, 48]), [32, 48])
        self.assertEqual(spatial_size_2d((8, 4)), [8, 4])
        for bad in (True, [32], [32, 32, 32], [32.0, 32], "32", None):
            with self.assertRaisesRegex(ValueError, "spatial_size = .*an integer or a pair of integers"):
                spatial_size_2d(bad)

    def test_every_n_iterations(self):
        log_now = every_n_iterations(3)
        self.assertEqual([i for i in range(1, 10) if log_now(None, i)], [3, 6, 9])
        self.assertTrue(all(every_n_iterations(1)(None, i) for i in range(1, 5)))
        with self.assertRaisesRegex(ValueError, "log_interval = 0"):
            every_n_iterations(0)


class TestTrainingState(unittest.TestCase):
    def test_keys_with_and_without_discriminator(self):
        net, ema, disc = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
        opt, d_opt = torch.optim.SGD(net.parameters(), 0.1), torch.optim.SGD(disc.parameters(), 0.1)
        state = training_state(net, opt, ema, "trainer")
        self.assertEqual(list(state), ["model", "optimizer", "ema", "trainer"])
        self.assertIs(state["model"], net)
        state = training_state(net, opt, ema, "trainer", disc, d_opt)
        self.assertEqual(list(state), ["model", "optimizer", "ema", "trainer", "discriminator", "d_optimizer"])
        self.assertIs(state["d_optimizer"], d_opt)
        with self.assertRaisesRegex(ValueError, "give both or neither"):
            training_state(net, opt, ema, "trainer", discriminator=disc)


class TestFrozen(TempDirMixin, unittest.TestCase):
    def test_loads_first_existing_file_and_freezes(self):
        torch.manual_seed(0)
        trained = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
        path = os.path.join(self.tmp, "final.pt")
        torch.save(trained.state_dict(), path)
        module = frozen(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5)),
                        [os.path.join(self.tmp, "best.pt"), path], "cpu")
        self.assertFalse(module.training)
        self.assertFalse(any(p.requires_grad for p in module.parameters()))
        for a, b in zip(module.state_dict().values(), trained.state_dict().values()):
            torch.testing.assert_close(a, b)

    def test_missing_file_keeps_the_weights(self):
        module = torch.nn.Linear(2, 2)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        out = frozen(module, os.path.join(self.tmp, "missing.pt"), "cpu")
        self.assertIs(out, module)
        self.assertFalse(out.weight.requires_grad)
        torch.testing.assert_close(out.state_dict()["weight"], before["weight"])


class TestDistributed(unittest.TestCase):
    def test_none_stays_none(self):
        self.assertIsNone(distributed(None, "cpu"))

    def test_ddp_on_cpu_without_device_ids(self):
        module = torch.nn.Linear(2, 2)
        with mock.patch("torch.nn.parallel.DistributedDataParallel") as ddp:
            distributed(module, "cpu")
        ddp.assert_called_once_with(module, device_ids=None)

    def test_rank_zero_logs(self):
        try:
            with mock.patch("torch.distributed.is_initialized", return_value=False):
                self.assertTrue(log_on_main_process_only())
            self.assertEqual(logging.root.manager.disable, logging.NOTSET)
            with mock.patch("torch.distributed.is_initialized", return_value=True), mock.patch(
                "torch.distributed.get_rank", return_value=1
            ):
                self.assertFalse(log_on_main_process_only())
            self.assertEqual(logging.root.manager.disable, logging.INFO)
        finally:
            logging.disable(logging.NOTSET)


class TestImages2d(TempDirMixin, unittest.TestCase):
    def test_load_image_2d_is_the_benchmark_rule(self):
        img = (synthetic_head(40, 30) * 200).astype(np.uint8)
        path = os.path.join(self.tmp, "head.png")
        Image.fromarray(img).save(path)
        out = load_image_2d(path, 32)
        self.assertEqual((tuple(out.shape), out.dtype), ((1, 32, 32), torch.float32))
        expected = resize_image(scale_intensity(read_image(path)), 32)
        np.testing.assert_allclose(out[0].numpy(), expected, atol=1e-6)
        self.assertTrue(0.0 <= float(out.min()) and float(out.max()) <= 1.0)

    def test_scale_intensity_2d_keeps_metadata(self):
        arr = (synthetic_head(20, 16)[None] * 300.0).astype(np.float32)
        path = os.path.join(self.tmp, "head.nii.gz")
        nib.save(nib.Nifti1Image(arr[0], np.diag([0.5, 2.0, 1.0, 1.0])), path)
        image = MetaTensor(torch.as_tensor(arr), meta={"filename_or_obj": path, "affine": torch.eye(4) * 2})
        out = scale_intensity_2d(image)
        self.assertIsInstance(out, MetaTensor)
        self.assertEqual(out.meta["filename_or_obj"], path)
        torch.testing.assert_close(out.affine, image.affine)
        np.testing.assert_allclose(out.numpy(), scale_intensity(arr), atol=1e-6)
        plain = scale_intensity_2d(torch.as_tensor(arr))
        self.assertNotIsInstance(plain, MetaTensor)
        np.testing.assert_allclose(plain.numpy(), scale_intensity(arr), atol=1e-6)


if __name__ == "__main__":
    unittest.main()
