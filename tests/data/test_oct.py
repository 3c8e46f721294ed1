# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.data.oct: reading every format, the retina band, the grid round trip, class folders, bad scans."""

from __future__ import annotations

import os
import unittest

import numpy as np
import torch
from monai.transforms import Resize
from PIL import Image

from berdiff.data.oct import (
    ScanGeometry,
    class_items,
    list_scans,
    load_scan,
    prepare_scan,
    read_scan,
    restore_to_input,
    retina_band,
    scale_scan,
)
from tests.oct_fixtures import synthetic_bscan, write_bscan
from tests.utils import TempDirMixin


class TestReadScan(TempDirMixin, unittest.TestCase):
    def test_every_format_reads_the_same_pixels(self):
        scan = synthetic_bscan(40, 64, bump=True)
        for name in ("a.png", "a.tif", "a.tiff", "a.nii", "a.nii.gz"):
            with self.subTest(name):
                arr = read_scan(write_bscan(os.path.join(self.tmp, name), scan))
                self.assertEqual(arr.shape, (40, 64))
                self.assertEqual(arr.dtype, np.float32)
                np.testing.assert_array_equal(arr, scan.astype(np.float32))
        jpeg = read_scan(write_bscan(os.path.join(self.tmp, "a.jpeg"), scan))  # lossy: close, not equal
        self.assertEqual(jpeg.shape, (40, 64))
        self.assertLess(float(np.abs(jpeg - scan).mean()), 8.0)

    def test_rgb_is_converted_to_grey(self):
        scan = synthetic_bscan(40, 64)
        path = os.path.join(self.tmp, "rgb.png")
        Image.fromarray(np.stack([scan] * 3, axis=-1)).save(path)
        np.testing.assert_array_equal(read_scan(path), scan.astype(np.float32))
        grid = load_scan(path, (16, 32))
        self.assertEqual(tuple(grid.shape), (1, 16, 32))

    def test_empty_scan_is_refused(self):
        path = write_bscan(os.path.join(self.tmp, "blank.png"), np.zeros((40, 64), np.uint8))
        with self.assertRaisesRegex(ValueError, "blank.png.*empty"):
            read_scan(path)
        open(os.path.join(self.tmp, "zero.png"), "wb").close()
        with self.assertRaisesRegex(ValueError, "zero.png"):
            read_scan(os.path.join(self.tmp, "zero.png"))

    def test_truncated_file_is_refused_with_its_name(self):
        path = write_bscan(os.path.join(self.tmp, "full.png"), synthetic_bscan(40, 64))
        data = open(path, "rb").read()
        cut = os.path.join(self.tmp, "cut.png")
        with open(cut, "wb") as f:
            f.write(data[: len(data) // 2])
        with self.assertRaisesRegex(ValueError, "cut.png"):
            read_scan(cut)

    def test_3d_image_is_refused(self):
        import nibabel as nib

        path = os.path.join(self.tmp, "vol.nii.gz")
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 3).astype(np.float32), np.eye(4)), path)
        with self.assertRaisesRegex(ValueError, "vol.nii.gz.*2D"):
            read_scan(path)


class TestGrid(unittest.TestCase):
    def test_band_holds_the_retina(self):
        scan = synthetic_bscan(60, 100).astype(np.float32)
        top, band = retina_band(scan, 0.35)
        self.assertEqual(band, 35)
        bright = np.argmax(scan.mean(axis=1))  # the RPE row
        self.assertTrue(top <= bright < top + band)
        with self.assertRaisesRegex(ValueError, "band_ratio"):
            retina_band(scan, 0.0)

    def test_band_taller_than_the_scan_is_padded(self):
        scan = synthetic_bscan(20, 100).astype(np.float32)
        grid, geo = prepare_scan(scan, (16, 32), 0.35)
        self.assertEqual(grid.shape, (16, 32))
        self.assertLess(geo.top, 0)
        back = restore_to_input(np.ones((16, 32)), geo)
        self.assertEqual(back.shape, (20, 100))
        np.testing.assert_allclose(back, 1.0, atol=1e-5)

    def test_round_trip_returns_to_the_input_grid(self):
        scan = synthetic_bscan(48, 80, bump=True).astype(np.float32)
        grid, geo = prepare_scan(scan, (16, 32), 0.35)
        self.assertEqual(grid.dtype, np.float32)
        self.assertTrue(0.0 <= grid.min() and grid.max() <= 1.0)
        self.assertEqual(geo, ScanGeometry(height=48, width=80, top=geo.top, band=28))
        # a map that is 1 on the grid is 1 on the band and 0 outside it
        back = restore_to_input(np.ones((1, 16, 32)), geo.as_dict())
        self.assertEqual(back.shape, (48, 80))
        np.testing.assert_allclose(back[geo.top : geo.top + geo.band], 1.0, atol=1e-5)
        self.assertEqual(float(back[: geo.top].sum() + back[geo.top + geo.band :].sum()), 0.0)
        # a smooth map survives the round trip: grid -> input -> grid
        yy, xx = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 32), indexing="ij")
        smooth = (yy + xx).astype(np.float32)
        band = restore_to_input(smooth, geo)[geo.top : geo.top + geo.band]
        self.assertEqual(band.shape, (28, 80))
        again = Resize((16, 32), mode="bilinear", anti_aliasing=True)(torch.as_tensor(band)[None])[0].numpy()
        np.testing.assert_allclose(again[2:-2, 2:-2], smooth[2:-2, 2:-2], atol=0.02)  # edges: clamped borders

    def test_smoothing_knob(self):
        scan = synthetic_bscan(48, 80).astype(np.float32)
        sharp, geo = prepare_scan(scan, (16, 32), 0.35)
        smooth, geo_smooth = prepare_scan(scan, (16, 32), 0.35, smooth_sigma=1.0)
        self.assertEqual(geo, geo_smooth)
        self.assertLess(float(np.abs(np.diff(smooth, axis=1)).mean()), float(np.abs(np.diff(sharp, axis=1)).mean()))
        with self.assertRaisesRegex(ValueError, "smooth_sigma"):
            prepare_scan(scan, (16, 32), 0.35, smooth_sigma=-1.0)

    def test_scaling(self):
        out = scale_scan(np.arange(1000, dtype=np.float32).reshape(10, 100))
        self.assertAlmostEqual(float(out.min()), 0.0)
        self.assertAlmostEqual(float(out.max()), 1.0)
        np.testing.assert_array_equal(scale_scan(np.ones((4, 4))), np.zeros((4, 4)))
        with self.assertRaisesRegex(ValueError, "percentiles"):
            scale_scan(np.ones((4, 4)), 50, 10)
        with self.assertRaisesRegex(ValueError, "spatial_size"):
            prepare_scan(np.ones((8, 8)), (16,))


class TestFolders(TempDirMixin, unittest.TestCase):
    def test_recursive_listing_and_classes(self):
        write_bscan(os.path.join(self.tmp, "NORMAL", "b.png"), synthetic_bscan(20, 30))
        write_bscan(os.path.join(self.tmp, "NORMAL", "a.tif"), synthetic_bscan(20, 30))
        write_bscan(os.path.join(self.tmp, "AMD", "deep", "c.nii.gz"), synthetic_bscan(20, 30, bump=True))
        write_bscan(os.path.join(self.tmp, ".hidden", "d.png"), synthetic_bscan(20, 30))
        open(os.path.join(self.tmp, "notes.txt"), "w").close()
        names = [p.relative_to(self.tmp).as_posix() for p in list_scans(self.tmp)]
        self.assertEqual(names, ["AMD/deep/c.nii.gz", "NORMAL/a.tif", "NORMAL/b.png"])
        items = class_items(self.tmp)
        self.assertEqual([(i["class"], i["label"]) for i in items], [("AMD", 1), ("NORMAL", 0), ("NORMAL", 0)])
        self.assertEqual(class_items(os.path.join(self.tmp, "missing")), [])
        with self.assertRaisesRegex(FileNotFoundError, "no image files"):
            list_scans(os.path.join(self.tmp, ".hidden", ".."), recursive=False)


if __name__ == "__main__":
    unittest.main()
