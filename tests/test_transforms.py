# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import os
import unittest

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Invertd

from berdiff.transforms import HeadPercentileScaled, volume_preprocessing
from berdiff.utils import MODALITIES
from berdiff.validation import root_cause
from tests.utils import TempDirMixin

AFFINE = np.array([[-1.5, 0, 0, 10], [0, 0, 2.0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])  # non-RAS, anisotropic


def write_case(folder: str, shape=(20, 10, 12), affine=AFFINE, modalities=MODALITIES, seed=0):
    rng = np.random.default_rng(seed)
    head = np.zeros(shape, bool)
    head[3:-3, 2:-2, 2:-2] = True
    files = []
    for m in modalities:
        arr = np.where(head, rng.uniform(50, 500, shape), 0).astype(np.float32)
        path = os.path.join(folder, f"case_{m}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), path)
        files.append(path)
    seg = np.zeros(shape, np.uint8)
    seg[8:11, 4:6, 5:8] = 2
    seg_path = os.path.join(folder, "case_seg.nii.gz")
    nib.save(nib.Nifti1Image(seg, affine), seg_path)
    return files, seg_path


class TestVolumePreprocessing(TempDirMixin, unittest.TestCase):
    def assertRaisesCause(self, regex, func, *args):
        """the transform chain raises, and the root cause is a ValueError whose message matches ``regex``"""
        with self.assertRaises(Exception) as ctx:
            func(*args)
        cause = root_cause(ctx.exception)
        self.assertIsInstance(cause, ValueError)
        self.assertRegex(str(cause), regex)

    def test_loads_orients_scales_pads_and_inverts(self):
        files, seg = write_case(self.tmp)
        pre = volume_preprocessing("image", label_key="label", spatial_size=(32, 32))
        out = pre({"image": files, "label": seg})
        img = out["image"]
        self.assertEqual(tuple(img.shape[:3]), (4, 32, 32))
        self.assertEqual(img.dtype, torch.float32)
        self.assertGreaterEqual(img.min().item(), 0.0)
        self.assertLessEqual(img.max().item(), 1.0)
        self.assertAlmostEqual(img.max().item(), 1.0, places=5)
        self.assertEqual(out["label"].shape[1:], img.shape[1:])
        self.assertEqual(int(out["label"].sum().item()), 2 * 3 * 2 * 3)
        # a prediction on the preprocessed grid maps back onto the input grid exactly
        out["pred"] = img[:1].clone()
        inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True)(out)
        self.assertEqual(tuple(inv["pred"].shape[1:]), (20, 10, 12))
        self.assertTrue(np.allclose(inv["pred"].affine.numpy(), AFFINE))

    def test_in_plane_resampling_keeps_axial_spacing_and_inverts(self):
        files, seg = write_case(self.tmp)
        pre = volume_preprocessing("image", label_key="label", spatial_size=(16, 16), pixdim=3.0)
        out = pre({"image": files, "label": seg})
        img = out["image"]
        # RAS voxel sizes of the input: 1.5 x 2.0 (in-plane) x 1.0 (axial); in-plane resampled to 3 mm, axial kept
        spacing = np.sqrt((img.affine.numpy()[:3, :3] ** 2).sum(0))
        self.assertTrue(np.allclose(spacing, [3.0, 3.0, 1.0]), spacing)
        self.assertEqual(tuple(img.shape), (4, 16, 16, 10))
        # the head covers the same physical area: 14 x 8 voxels of 1.5 x 2 mm -> about 7 x 5.3 voxels of 3 mm
        head_area = (img[0].amax(-1) > 0).sum().item() * 9.0
        self.assertAlmostEqual(head_area / (14 * 1.5 * 8 * 2.0), 1.0, delta=0.35)
        self.assertEqual(set(torch.unique(out["label"]).tolist()) - {0.0, 2.0}, set())  # nearest neighbour labels
        out["pred"] = img[:1].clone()
        inv = Invertd("pred", transform=pre, orig_keys="image", nearest_interp=False)(out)
        self.assertEqual(tuple(inv["pred"].shape[1:]), (20, 10, 12))
        self.assertTrue(np.allclose(inv["pred"].affine.numpy(), AFFINE))

    def test_single_four_channel_file(self):
        arr = np.random.default_rng(0).uniform(1, 2, (8, 8, 4, 4)).astype(np.float32)
        path = os.path.join(self.tmp, "four.nii.gz")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
        out = volume_preprocessing(spatial_size=(16, 16))({"image": path})
        self.assertEqual(tuple(out["image"].shape), (4, 16, 16, 4))

    def test_clear_errors(self):
        files, seg = write_case(self.tmp)
        pre = volume_preprocessing(spatial_size=(32, 32))
        self.assertRaisesCause("expected 4 channels", pre, {"image": files[:3]})
        missing = os.path.join(self.tmp, "missing_flair.nii.gz")
        self.assertRaisesCause("not found.*missing", pre, {"image": files[:3] + [missing]})
        bad = os.path.join(self.tmp, "corrupt_flair.nii.gz")
        with open(bad, "wb") as f:
            f.write(b"not a nifti file")
        self.assertRaisesCause("cannot read.*corrupt_flair", pre, {"image": files[:3] + [bad]})
        other = os.path.join(self.tmp, "other")
        os.makedirs(other)
        odd, _ = write_case(other, shape=(20, 10, 13))
        self.assertRaisesCause("shape mismatch", pre, {"image": files[:3] + odd[3:]})
        nan_dir = os.path.join(self.tmp, "nan")
        os.makedirs(nan_dir)
        nan_files, _ = write_case(nan_dir, shape=(20, 10, 12))
        arr = nib.load(nan_files[0]).get_fdata().astype(np.float32)
        arr[5, 5, 5] = np.nan
        nib.save(nib.Nifti1Image(arr, AFFINE), nan_files[0])
        self.assertRaisesCause("NaN", pre, {"image": nan_files})
        with_label = volume_preprocessing(label_key="label")
        self.assertRaisesCause("shape mismatch", with_label, {"image": files, "label": odd[0]})

    def test_head_percentile_scaling(self):
        x = torch.zeros(2, 10, 10, 1)
        x[0, :5] = torch.arange(1, 51, dtype=torch.float32).reshape(5, 10, 1)
        out = HeadPercentileScaled("image", upper=100.0)({"image": x})["image"]
        self.assertAlmostEqual(out[0].max().item(), 1.0)
        self.assertAlmostEqual(out[0, 0, 0, 0].item(), 1 / 50)
        self.assertEqual(out[0, 5:].abs().sum().item(), 0.0)
        self.assertEqual(out[1].abs().sum().item(), 0.0)  # empty channel stays 0, no division by zero
        with self.assertRaises(ValueError):
            HeadPercentileScaled("image", upper=0)


if __name__ == "__main__":
    unittest.main()
