# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import math
import unittest
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from berdiff.training import BlobAugmentPrepareBatch, random_blobs

REPO = Path(__file__).resolve().parents[2]


def _brains(batch: int = 6, channels: int = 2, size: int = 64) -> torch.Tensor:
    """Disc-shaped 'brains' with a smooth intensity ramp per channel, exactly zero outside."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    ramp = torch.stack([0.3 + 0.4 * xx / size + 0.1 * c for c in range(channels)])
    return (ramp * disc)[None].repeat(batch, 1, 1, 1).float()


class TestRandomBlobs(unittest.TestCase):
    def test_background_and_shape_kept_and_change_map_matches(self):
        x = _brains()
        y, changed = random_blobs(x, torch.Generator().manual_seed(0), prob=1.0)
        self.assertEqual(y.shape, x.shape)
        self.assertEqual(changed.shape, (6, 1, 64, 64))
        background = (x == 0).all(1, keepdim=True)
        self.assertTrue(torch.equal(y * background, torch.zeros_like(y)))
        self.assertTrue(torch.equal(changed * background, torch.zeros_like(changed)))
        # every sample has a blob, and pixels differ only where the change map says so
        self.assertTrue(((changed > 0.5).flatten(1).any(1)).all())
        differs = (y - x).abs().amax(1, keepdim=True) > 1e-6
        self.assertTrue(torch.all(changed[differs] > 0))
        # convex blend of the image and the blob intensities
        self.assertGreaterEqual(float(y.min()), 0.0)
        self.assertLessEqual(float(y.max()), 1.2 + 1e-6)

    def test_prob_zero_is_identity_and_seeded(self):
        x = _brains()
        y, changed = random_blobs(x, torch.Generator().manual_seed(0), prob=0.0)
        self.assertTrue(torch.equal(y, x))
        self.assertEqual(float(changed.sum()), 0.0)
        a, _ = random_blobs(x, torch.Generator().manual_seed(3), prob=0.5)
        b, _ = random_blobs(x, torch.Generator().manual_seed(3), prob=0.5)
        c, _ = random_blobs(x, torch.Generator().manual_seed(4), prob=0.5)
        self.assertTrue(torch.equal(a, b))
        self.assertFalse(torch.equal(a, c))

    def test_blob_area_follows_the_radius(self):
        # one opaque blob per sample, far smaller than the disc: its area is pi a b with a, b in the radius range
        x = _brains(batch=32, channels=1, size=128)
        _, changed = random_blobs(
            x, torch.Generator().manual_seed(1), prob=1.0, max_blobs=1, radius=(0.05, 0.08), opacity=(1.0, 1.0)
        )
        area = (changed > 0.5).flatten(1).sum(1).float()
        inside = area[area > 0]
        side = 128
        self.assertTrue(torch.all(inside <= math.pi * (0.08 * side) ** 2 * 1.1))
        # a blob centred near the disc's edge is cut by it, so only the median is bounded from below
        self.assertGreater(float(inside.median()), math.pi * (0.05 * side) ** 2 * 0.5)

    def test_intensities_are_foreign_per_channel(self):
        x = _brains(batch=8, channels=3)
        y, changed = random_blobs(
            x, torch.Generator().manual_seed(2), prob=1.0, max_blobs=1, intensity=(2.0, 3.0), opacity=(1.0, 1.0)
        )
        centre = changed[:, 0] > 0.99
        values = y.permute(1, 0, 2, 3)[:, centre]  # (C, N)
        self.assertTrue(torch.all((values > 1.9) & (values < 3.1)))

    def test_bad_arguments(self):
        x = _brains()
        for kwargs, message in (
            ({"prob": 1.5}, "prob"),
            ({"max_blobs": 0}, "max_blobs"),
            ({"radius": (0.2, 0.1)}, "radius"),
            ({"opacity": (0.5, 1.5)}, "opacity"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                random_blobs(x, None, **kwargs)
        with self.assertRaisesRegex(ValueError, r"\(B, C, H, W\)"):
            random_blobs(x[0], None)
        with self.assertRaisesRegex(ValueError, "radius"):
            BlobAugmentPrepareBatch(radius=(0.3, 0.1))


class TestBlobAugmentPrepareBatch(unittest.TestCase):
    def test_input_is_target(self):
        x = _brains()
        prepare = BlobAugmentPrepareBatch(prob=1.0, seed=5)
        inputs, targets = prepare({"image": x, "label": x.clone()}, torch.device("cpu"))
        self.assertIs(inputs, targets)
        self.assertFalse(torch.equal(inputs, x))
        # reproducible from the seed, different on the next batch
        again = BlobAugmentPrepareBatch(prob=1.0, seed=5)({"image": x, "label": x}, "cpu")[0]
        self.assertTrue(torch.equal(inputs, again))
        self.assertFalse(torch.equal(prepare({"image": x, "label": x}, "cpu")[0], inputs))

    def test_off_is_the_default_batch(self):
        x = _brains()
        inputs, targets = BlobAugmentPrepareBatch(prob=0.0)({"image": x, "label": x}, "cpu")
        self.assertTrue(torch.equal(inputs, x))
        self.assertTrue(torch.equal(targets, x))

    def test_bundle_configs_wire_it_into_stage_one(self):
        for bundle, default in (("brats_mri_bernoulli_anomaly", 0.0), ("ixi_t1_bernoulli_anomaly", 0.0)):
            parser = ConfigParser()
            parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train_autoencoder.yaml"))
            self.assertEqual(parser["blob_augment_prob"], default, bundle)
            self.assertEqual(parser["train"]["trainer"]["prepare_batch"], "@train#prepare_batch", bundle)
            parser["blob_augment_prob"] = 0.25
            prepare = parser.get_parsed_content("train#prepare_batch")
            self.assertIsInstance(prepare, BlobAugmentPrepareBatch)
            self.assertEqual(prepare.prob, 0.25)


if __name__ == "__main__":
    unittest.main()
