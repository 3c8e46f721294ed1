# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch

from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.residual import ResidualSign, channel_index, channel_weights_for, check_channel_weights, residual_map
from berdiff.sampling import MaskedBernoulliSampler
from berdiff.schedulers import BernoulliScheduler


class TestResidualMap(unittest.TestCase):
    def setUp(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(2, 3, 8, 8, generator=g)
        self.r = torch.rand(2, 3, 8, 8, generator=g)

    def test_both_is_the_papers_map(self):
        torch.testing.assert_close(residual_map(self.r, self.x), (self.r - self.x).pow(2).sum(1, keepdim=True))

    def test_signs_split_the_squared_residual(self):
        pos = residual_map(self.r, self.x, ResidualSign.POSITIVE)
        neg = residual_map(self.r, self.x, "negative")
        torch.testing.assert_close(pos + neg, residual_map(self.r, self.x))
        # positive counts only where the input is brighter than the reconstruction
        d = self.x - self.r
        torch.testing.assert_close(pos, (d * (d > 0)).pow(2).sum(1, keepdim=True))

    def test_channel_weights_and_intensity(self):
        only_last = residual_map(self.r, self.x, channel_weights=[0, 0, 1])
        torch.testing.assert_close(only_last, (self.r - self.x)[:, 2:].pow(2))
        with_prior = residual_map(self.r, self.x, channel_weights=[0, 0, 1], intensity=self.x[:, 2:])
        torch.testing.assert_close(with_prior, (self.r - self.x)[:, 2:].abs() * self.x[:, 2:])
        # a floor keeps ranking the voxels the reconstruction reproduced by their intensity
        floor = residual_map(self.x, self.x, intensity=self.x[:, 2:], intensity_power=2.0, intensity_floor=0.2)
        torch.testing.assert_close(floor, 0.2 * self.x[:, 2:] ** 2)
        with self.assertRaisesRegex(ValueError, "intensity_power"):
            residual_map(self.r, self.x, intensity=self.x[:, 2:], intensity_power=0)
        with self.assertRaisesRegex(ValueError, "2 channel weights"):
            residual_map(self.r, self.x, channel_weights=[1, 1])

    def test_names_and_checks(self):
        names = ["t1", "t1ce", "t2", "flair"]
        self.assertEqual(channel_weights_for(names, ["flair"]), [0.0, 0.0, 0.0, 1.0])
        self.assertEqual(channel_weights_for(names, ["t2", "flair"]), [0.0, 0.0, 1.0, 1.0])
        self.assertIsNone(channel_weights_for(names, "all"))
        self.assertIsNone(channel_weights_for(names, None))
        for bad in (["dwi"], [], ["flair", "flair"]):
            with self.assertRaisesRegex(ValueError, "residual channels"):
                channel_weights_for(names, bad)
        self.assertEqual(channel_index(names, "flair"), 3)
        self.assertIsNone(channel_index(names, None))
        with self.assertRaisesRegex(ValueError, "unknown channel"):
            channel_index(names, "pd")
        for bad in ([0, 0], [-1, 1], [float("nan")], "flair", []):
            with self.assertRaisesRegex(ValueError, "channel weights"):
                check_channel_weights(bad)


class TestSamplerResidual(unittest.TestCase):
    def test_rule_applies_to_every_image_map(self):
        torch.manual_seed(0)
        ae = autoencoder_from_preset("tiny", in_channels=2)
        unet = denoiser_from_preset("tiny", latent_channels=ae.latent_channels)
        x = torch.rand(2, 2, 16, 16)
        kwargs = dict(noise_level=4, prob_threshold=0.5, num_inference_steps=2, seed=0,
                      output_keys=("anomaly_map", "residual_map", "autoencoder_map", "reconstruction"))
        paper = AnomalyPipeline(ae, unet, **kwargs).eval().run(x)
        rule = AnomalyPipeline(ae, unet, residual_sign="positive", channel_weights=[0, 1], intensity_channel=1,
                               **kwargs).eval().run(x)
        d = (x - paper["reconstruction"])[:, 1:]
        torch.testing.assert_close(paper["reconstruction"], rule["reconstruction"])  # same seeds, same sampling
        torch.testing.assert_close(rule["anomaly_map"], d.clamp_min(0) * x[:, 1:])
        torch.testing.assert_close(rule["residual_map"], rule["anomaly_map"])
        self.assertTrue(torch.all(rule["autoencoder_map"] <= paper["autoencoder_map"].sqrt() * x[:, 1:] + 1e-6))

    def test_bad_options(self):
        s = BernoulliScheduler()
        with self.assertRaisesRegex(ValueError, "residual_sign must be one of"):
            MaskedBernoulliSampler(s, residual_sign="up")
        with self.assertRaisesRegex(ValueError, "intensity_channel"):
            MaskedBernoulliSampler(s, intensity_channel=-1)
        sampler = MaskedBernoulliSampler(s, intensity_channel=3)
        with self.assertRaisesRegex(ValueError, "out of range"):
            sampler.residual(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4), torch.rand(1, 2, 4, 4))


if __name__ == "__main__":
    unittest.main()
