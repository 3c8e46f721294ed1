# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import os
import unittest

import nibabel as nib
import numpy as np
from PIL import Image

from berdiff.data.images2d import (
    brain_mask,
    list_images,
    load_folder,
    read_image,
    resize_image,
    resize_label,
    scale_intensity,
    stem,
)
from tests.utils import TempDirMixin, synthetic_head


class TestReadAndScale(TempDirMixin, unittest.TestCase):
    def test_png_and_nifti_hw1(self):
        img = (synthetic_head() * 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(self.tmp, "a.png"))
        nib.save(nib.Nifti1Image(img.astype(np.float32)[..., None] / 255.0, np.eye(4)), os.path.join(self.tmp, "b.nii.gz"))
        self.assertEqual([p.name for p in list_images(self.tmp)], ["a.png", "b.nii.gz"])
        self.assertEqual(stem("x/b.nii.gz"), "b")
        png = read_image(os.path.join(self.tmp, "a.png"))
        self.assertEqual(png.dtype, np.uint8)
        np.testing.assert_array_equal(png, img)
        nii = read_image(os.path.join(self.tmp, "b.nii.gz"))
        self.assertEqual(nii.shape, img.shape)  # H x W x 1 squeezed
        np.testing.assert_allclose(scale_intensity(png), img / 255.0, atol=1e-6)
        np.testing.assert_allclose(scale_intensity(nii), img / 255.0, atol=1e-6)  # already in [0, 1]: kept
        wide = scale_intensity(np.array([[10.0, 20.0], [30.0, 50.0]]))
        self.assertEqual((wide.min(), wide.max()), (0.0, 1.0))
        for size in (128, 256):
            arr, names = load_folder(self.tmp, size)
            self.assertEqual(arr.shape, (2, size, size))
            self.assertEqual(names, ["a", "b"])
            self.assertGreaterEqual(arr.min(), 0.0)
            self.assertLessEqual(arr.max(), 1.0)
            np.testing.assert_allclose(arr[0], arr[1], atol=1e-5)

    def test_pad_keeps_aspect_and_label_nearest(self):
        img = np.zeros((20, 40), np.float32)
        img[:, 18:22] = 1.0  # a vertical bar in the middle
        out = resize_image(img, 40)
        self.assertEqual(out.shape, (40, 40))
        self.assertTrue(np.all(out[:8] < 1e-6) and np.all(out[-8:] < 1e-6), "padding must be above and below")
        self.assertGreater(out[20, 20], 0.5)
        lab = resize_label(img > 0, 80)
        self.assertEqual(lab.dtype, bool)
        self.assertEqual(int(lab.sum()), 4 * 20 * 4)  # nearest-neighbour scaling by 2 in both axes

    def test_errors(self):
        with self.assertRaisesRegex(FileNotFoundError, "does not exist"):
            list_images(os.path.join(self.tmp, "nope"))
        with self.assertRaisesRegex(FileNotFoundError, "no image files"):
            list_images(self.tmp)
        bad = os.path.join(self.tmp, "corrupt.png")
        with open(bad, "wb") as f:
            f.write(b"not a png at all")
        with self.assertRaisesRegex(ValueError, "corrupt.png"):
            read_image(bad)
        with self.assertRaisesRegex(ValueError, "corrupt.png"):
            load_folder(self.tmp)
        vol = os.path.join(self.tmp, "vol.nii.gz")
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.float32), np.eye(4)), vol)
        with self.assertRaisesRegex(ValueError, "2D"):
            read_image(vol)
        nan = os.path.join(self.tmp, "nan.nii.gz")
        arr = np.ones((8, 8), np.float32)
        arr[2, 2] = np.nan
        nib.save(nib.Nifti1Image(arr, np.eye(4)), nan)
        with self.assertRaisesRegex(ValueError, "NaN"):
            read_image(nan)
        with self.assertRaisesRegex(ValueError, "intensity"):
            scale_intensity(np.zeros((4, 4)), "bogus")


class TestBrainMask(unittest.TestCase):
    def test_brain_not_scalp_and_holes_filled(self):
        img = synthetic_head(80, 70)
        mask = brain_mask(img)
        h, w = img.shape
        yy, xx = np.mgrid[:h, :w]
        r = np.sqrt(((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2)
        self.assertTrue(mask[r < 0.7].all(), "brain interior, ventricle included, must be inside the mask")
        self.assertFalse(mask[r > 0.85].any(), "skull and scalp must be outside the mask")
        self.assertFalse(brain_mask(np.full((10, 10), 0.3)).any())
        with self.assertRaises(ValueError):
            brain_mask(np.zeros((2, 3, 4)))


if __name__ == "__main__":
    unittest.main()
