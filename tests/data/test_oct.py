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
    BandAlignment,
    ScanGeometry,
    class_items,
    list_scans,
    load_scan,
    prepare_scan,
    read_scan,
    restore_to_input,
    retina_band,
    rpe_columns,
    rpe_curve,
    rpe_estimate,
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
        grid, geo = prepare_scan(scan, (16, 32), 0.35, alignment="centre")
        self.assertEqual(grid.shape, (16, 32))
        self.assertLess(geo.top, 0)
        back = restore_to_input(np.ones((16, 32)), geo)
        self.assertEqual(back.shape, (20, 100))
        np.testing.assert_allclose(back, 1.0, atol=1e-5)

    def test_round_trip_returns_to_the_input_grid(self):
        scan = synthetic_bscan(48, 80, bump=True).astype(np.float32)
        grid, geo = prepare_scan(scan, (16, 32), 0.35, alignment="centre")
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


def curved_bscan(height: int = 60, width: int = 120, bump: bool = False, seed: int = 0):
    """A B-scan whose RPE (the deepest bright line) follows a known parabola; ``bump`` lifts it in the middle."""
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, width)
    base = 0.55 * height + 0.12 * height * x**2 + 0.04 * height * x  # tilted and curved, as eyes are
    rpe = base - (0.1 * height * np.exp(-((x / 0.08) ** 2)) if bump else 0.0)
    rows = np.arange(height)[:, None]
    img = np.full((height, width), 15.0)
    img[(rows > rpe - 0.3 * height) & (rows < rpe)] = 90.0
    img[np.abs(rows - rpe) < 1.5] = 240.0
    img[rows > rpe + 1.5] = 50.0
    img += rng.normal(0, 10, img.shape)
    return np.clip(img, 0, 255).astype(np.float32), base, rpe


class TestRPEAlignment(unittest.TestCase):
    def test_rpe_curve_follows_the_rpe_not_the_drusen(self):
        scan, base, _ = curved_bscan()
        fit = np.polyval(rpe_curve(scan), np.linspace(-1, 1, scan.shape[1]))
        self.assertLess(float(np.abs(fit - base).max()), 1.5)
        bumped, base, rpe = curved_bscan(bump=True)
        fit = np.polyval(rpe_curve(bumped), np.linspace(-1, 1, bumped.shape[1]))
        mid = bumped.shape[1] // 2
        self.assertLess(abs(fit[mid] - base[mid]), 0.5 * abs(rpe[mid] - base[mid]))  # the smooth fit ignores the dome
        with self.assertRaisesRegex(ValueError, "bright_fraction"):
            rpe_curve(scan, bright_fraction=1.0)
        with self.assertRaisesRegex(ValueError, "2D"):
            rpe_curve(scan[None])

    def test_the_band_is_flattened_along_the_rpe(self):
        scan, _, _ = curved_bscan()
        grid, geo = prepare_scan(scan, (32, 64), 0.3, alignment="rpe", rpe_position=0.75)
        self.assertEqual(grid.shape, (32, 64))
        self.assertEqual(len(geo.curve), 4)  # a cubic
        rpe_rows = np.argmax(grid[:, 4:-4], axis=0)  # the RPE of every column ...
        self.assertLessEqual(int(rpe_rows.max() - rpe_rows.min()), 2)  # ... is one straight row of the grid ...
        self.assertLess(abs(float(np.median(rpe_rows)) - 0.75 * 31), 2.0)  # ... at rpe_position
        straight, _ = prepare_scan(scan, (32, 64), 0.3, alignment="centre")
        self.assertGreater(int(np.ptp(np.argmax(straight[:, 4:-4], axis=0))), 4)  # without flattening it is curved

    def test_round_trip_places_every_column_back(self):
        scan, _, _ = curved_bscan(50, 90, bump=True)
        _, geo = prepare_scan(scan, (16, 32), 0.3)
        tops = geo.column_tops()
        self.assertEqual(tops.shape, (90,))
        self.assertEqual(geo.top, int(round(tops.mean())))
        back = restore_to_input(np.ones((16, 32)), geo.as_dict())
        self.assertEqual(back.shape, (50, 90))
        for c in (0, 45, 89):
            lo, hi = max(0, tops[c]), min(50, tops[c] + geo.band)
            np.testing.assert_allclose(back[lo:hi, c], 1.0, atol=1e-5)
            self.assertEqual(float(back[:lo, c].sum() + back[hi:, c].sum()), 0.0)
        # a map that varies only across the band's rows comes back as the same rows, shifted per column
        ramp = np.repeat(np.linspace(0, 1, 16, dtype=np.float32)[:, None], 32, axis=1)
        back = restore_to_input(ramp, geo)
        col = 45
        band = back[tops[col] : tops[col] + geo.band, col]
        self.assertTrue(np.all(np.diff(band) >= -1e-6))
        self.assertLess(float(band[0]), 0.05)

    def test_geometry_survives_json_and_collation(self):
        from torch.utils.data import default_collate

        scan, _, _ = curved_bscan()
        _, g1 = prepare_scan(scan, (16, 32), 0.3)
        _, g2 = prepare_scan(scan[::-1].copy(), (16, 32), 0.3)
        self.assertEqual(ScanGeometry.from_dict(g1.as_dict()), g1)
        batch = default_collate([g1.as_dict(), g2.as_dict()])
        for i, g in enumerate((g1, g2)):
            again = ScanGeometry.from_batch(batch, i)
            np.testing.assert_allclose(again.curve, g.curve, rtol=1e-6)  # collated as float32
            np.testing.assert_array_equal(again.column_tops(), g.column_tops())
        straight = ScanGeometry(10, 20, 3, 5)
        self.assertEqual(ScanGeometry.from_batch(default_collate([straight.as_dict()]), 0), straight)

    def test_bad_alignment_options(self):
        scan, _, _ = curved_bscan()
        self.assertEqual(set(BandAlignment), {"rpe", "centre"})
        with self.assertRaisesRegex(ValueError, "middle"):
            prepare_scan(scan, (16, 32), alignment="middle")
        with self.assertRaisesRegex(ValueError, "rpe_position"):
            prepare_scan(scan, (16, 32), rpe_position=1.0)


def nerve_head_bscan(height: int = 80, width: int = 160, columns: tuple[int, int] = (100, 124)):
    """:func:`curved_bscan` with an optic-nerve-head-like gap: no retina and no RPE in ``columns``, bright deep tissue."""
    scan, base, _ = curved_bscan(height, width)
    lo, hi = columns
    scan[:, lo:hi] = np.clip(15 + np.random.default_rng(1).normal(0, 10, (height, hi - lo)), 0, 255)
    scan[height - 4 :, lo:hi] = 240.0
    return scan, base


class TestRPEColumns(unittest.TestCase):
    def test_estimate_follows_the_rpe_column_by_column(self):
        scan, base, _ = curved_bscan(80, 160)
        self.assertLess(float(np.abs(rpe_estimate(scan) - base).max()), 2.0)
        with self.assertRaisesRegex(ValueError, "bright_fraction"):
            rpe_estimate(scan, bright_fraction=0.0)

    def test_columns_without_the_rpe_are_left_out(self):
        scan, _ = nerve_head_bscan()
        _, geo = prepare_scan(scan, (16, 32), 0.3)
        keep = rpe_columns(scan, geo, 32)
        self.assertEqual((keep.shape, keep.dtype), ((32,), np.dtype(bool)))
        # input columns 100-123 have no RPE: grid columns 20-24 (5 input columns each) are left out, with a margin
        self.assertFalse(keep[20:25].any())
        self.assertTrue(keep[:14].all())
        narrow = rpe_columns(scan, geo, 32, margin=0)
        self.assertFalse(narrow[20:25].any())
        self.assertGreater(int(narrow.sum()), int(keep.sum()))  # the margin widens the gap
        self.assertTrue(rpe_columns(scan, geo.as_dict(), 64)[:28].all())  # any grid width; the geometry's dict

    def test_drusen_and_normal_scans_keep_every_column(self):
        for bump in (False, True):
            scan, _, _ = curved_bscan(80, 160, bump=bump)
            _, geo = prepare_scan(scan, (16, 32), 0.3)
            self.assertTrue(rpe_columns(scan, geo, 32).all())

    def test_bad_arguments(self):
        scan, _ = nerve_head_bscan()
        _, geo = prepare_scan(scan, (16, 32), 0.3)
        with self.assertRaisesRegex(ValueError, "shape"):
            rpe_columns(scan[:, :-1], geo, 32)
        with self.assertRaisesRegex(ValueError, "margin"):
            rpe_columns(scan, geo, 32, margin=-1)
        with self.assertRaisesRegex(ValueError, "grid_width"):
            rpe_columns(scan, geo, 0)


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
