# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""NRRD and MetaImage inputs (converted from the test NIfTI with ITK) through the brain bundle's inference."""

from __future__ import annotations

import locale
import os
import tempfile
import unittest
import warnings

import nibabel as nib
import numpy as np
from parameterized import parameterized

from berdiff.io import is_itk_image, read_itk_header
from berdiff.transforms import CheckImageFilesd
from berdiff.utils import case_name, image_stem
from tests.utils import MODALITIES, NON_RAS_AFFINE, make_case, make_model, run_workflow


def convert(files: list[str], folder: str, suffix: str) -> list[str]:
    """The NIfTI files re-written by ITK as <folder>/<name><suffix>."""
    import itk

    os.makedirs(folder, exist_ok=True)
    out = []
    for f in files:
        out.append(os.path.join(folder, image_stem(f) + suffix))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            itk.imwrite(itk.imread(f), out[-1])
    return out


def convert_dicom(nifti: str, folder: str) -> str:
    """The NIfTI volume (x1000, int16) written by ITK as a DICOM series <folder>/s<k>.dcm, one file per slice of the
    third axis, with its position, orientation and spacing in the per-slice tags."""
    import itk

    img = itk.imread(nifti)
    arr = np.rint(itk.array_from_image(img) * 1000).astype(np.int16)  # (z, y, x)
    direction = np.asarray(itk.array_from_matrix(img.GetDirection()), float)
    spacing, origin = np.asarray(itk.spacing(img), float), np.asarray(itk.origin(img), float)
    os.makedirs(folder, exist_ok=True)
    for i in range(arr.shape[0]):
        s = itk.image_from_array(np.ascontiguousarray(arr[i]))
        s.SetSpacing([float(spacing[0]), float(spacing[1])])
        tags = s.GetMetaDataDictionary()
        tags["0020|0032"] = "\\".join(f"{v:.6f}" for v in origin + i * spacing[2] * direction[:, 2])
        tags["0020|0037"] = "\\".join(f"{v:.6f}" for v in list(direction[:, 0]) + list(direction[:, 1]))
        tags["0018|0050"] = f"{spacing[2]:.6f}"
        tags["0028|0030"] = f"{spacing[1]:.6f}\\{spacing[0]:.6f}"
        tags["0020|0013"] = str(i + 1)
        tags["0008|0060"] = "MR"
        tags["0020|000d"] = "1.2.826.0.1.3680043.2.1125.1.1"
        tags["0020|000e"] = f"1.2.826.0.1.3680043.2.1125.1.{abs(hash(folder)) % 10**8}"
        tags["0008|0018"] = f"1.2.826.0.1.3680043.2.1125.1.3.{i + 1}"
        io = itk.GDCMImageIO.New()
        io.KeepOriginalUIDOn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            itk.imwrite(s, os.path.join(folder, f"s{i:03d}.dcm"), imageio=io)
    return folder


def corners(affine: np.ndarray, shape) -> list:
    """World coordinates of the 8 corner voxels of a grid (sorted, rounded)."""
    idx = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], float)
    return sorted(map(tuple, np.round(idx @ affine.T, 3)[:, :3].tolist()))


class TestItkHeader(unittest.TestCase):
    @parameterized.expand([(".nrrd",), (".mha",)])
    def test_header_matches_nifti(self, suffix):
        with tempfile.TemporaryDirectory() as tmp:
            files = make_case(tmp, "P1", NON_RAS_AFFINE)
            conv = convert(files[:1], os.path.join(tmp, "conv"), suffix)
            self.assertTrue(is_itk_image(conv[0]))
            hdr = read_itk_header(conv[0])
            ref = nib.load(files[0])
            self.assertEqual(hdr.shape, ref.shape)
            np.testing.assert_allclose(hdr.affine, ref.affine, atol=1e-5)
            self.assertEqual(case_name(os.path.join(tmp, "P1_flair" + suffix)), "P1")

    def test_bad_file_one_error(self):
        with tempfile.TemporaryDirectory() as tmp:
            bad = os.path.join(tmp, "x.nrrd")
            with open(bad, "w") as f:
                f.write("not an image")
            with self.assertRaisesRegex(ValueError, "cannot read image .*x.nrrd"):
                CheckImageFilesd("image", num_channels=1)({"image": bad})


class TestItkInference(unittest.TestCase):
    def setUp(self):
        # reading an image through ITK in this process switches LC_CTYPE to "C" (the default text encoding becomes
        # ASCII for the tests that run later in the same process): put the locale back after each test
        self._ctype = locale.setlocale(locale.LC_CTYPE)
        self.addCleanup(locale.setlocale, locale.LC_CTYPE, self._ctype)

    @parameterized.expand([(".nrrd",), (".mha",)])
    def test_maps_on_input_grid(self, suffix):
        with tempfile.TemporaryDirectory() as tmp:
            make_model(tmp)
            files = make_case(os.path.join(tmp, "nifti"), "P1", NON_RAS_AFFINE, seed=3)
            conv = convert(files, os.path.join(tmp, "conv"), suffix)
            run_workflow(tmp, image=conv)
            ref = nib.load(files[0])
            for postfix in ("anomaly", "anomaly_mask"):
                out = nib.load(os.path.join(tmp, "out", f"P1_{postfix}.nii.gz"))
                self.assertEqual(out.shape[:3], ref.shape)
                np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)
            self.assertEqual(len(MODALITIES), len(conv))

    def test_dicom_series(self):
        from monai.transforms import LoadImage

        with tempfile.TemporaryDirectory() as tmp:
            make_model(tmp)
            files = make_case(os.path.join(tmp, "nifti"), "P2", NON_RAS_AFFINE, seed=4)
            series = [convert_dicom(f, os.path.join(tmp, "dicom", f"P2_{m}")) for f, m in zip(files, MODALITIES)]
            hdr = read_itk_header(series[0])
            loaded = LoadImage(image_only=True)(series[0])
            self.assertEqual(hdr.shape, tuple(loaded.shape))
            np.testing.assert_allclose(hdr.affine, loaded.affine.numpy(), atol=1e-4)
            # the same physical grid as the NIfTI (ITK orders the slices along the slice normal)
            ref = nib.load(files[0])
            self.assertEqual(corners(ref.affine, ref.shape), corners(hdr.affine, hdr.shape))
            run_workflow(tmp, image=series)
            for postfix in ("anomaly", "anomaly_mask"):
                out = nib.load(os.path.join(tmp, "out", f"P2_{postfix}.nii.gz"))
                self.assertEqual(out.shape[:3], hdr.shape)
                np.testing.assert_allclose(out.affine, hdr.affine, atol=1e-4)


if __name__ == "__main__":
    unittest.main()
