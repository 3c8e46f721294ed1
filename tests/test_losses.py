# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch

from berdiff.losses import AutoencoderLoss, timestep_only_bce
from berdiff.schedulers import BernoulliScheduler


class TestAutoencoderLoss(unittest.TestCase):
    def test_values(self):
        x = torch.zeros(2, 1, 4, 4)
        recon = torch.full_like(x, 0.5)
        probs = torch.full((2, 3, 2, 2), 0.5)
        self.assertAlmostEqual(AutoencoderLoss()(recon, x).item(), 0.5)
        self.assertAlmostEqual(AutoencoderLoss()((recon, probs, probs), x).item(), 0.5)
        self.assertAlmostEqual(AutoencoderLoss(code_weight=2.0)((recon, probs, probs), x).item(), 0.5 + 2 * 0.25)

    def test_errors(self):
        with self.assertRaises(ValueError):
            AutoencoderLoss(l1_weight=-1)
        with self.assertRaises(ValueError):
            AutoencoderLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, 4, 4))
        with self.assertRaises(ValueError):
            AutoencoderLoss(code_weight=1.0)(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))


class TestTimestepOnlyBce(unittest.TestCase):
    def test_equals_bce_of_the_flip_rate_predictor(self):
        sched = BernoulliScheduler(num_train_timesteps=1000)
        for end in (50, 400, None):
            t = torch.arange(end or 1000)
            p = (1 - sched.alphas_cumprod[t].double()) / 2
            # the BCE of predicting p_t for a target drawn with rate p_t is H(p_t); compare with torch's BCE
            bce = torch.nn.functional.binary_cross_entropy(p, p, reduction="mean").item()
            self.assertAlmostEqual(timestep_only_bce(sched, end), bce, places=6)
        self.assertLess(timestep_only_bce(sched, 50), timestep_only_bce(sched, 1000))
        self.assertLess(timestep_only_bce(sched), float(torch.log(torch.tensor(2.0))))

    def test_range(self):
        with self.assertRaises(ValueError):
            timestep_only_bce(BernoulliScheduler(num_train_timesteps=10), 11)


if __name__ == "__main__":
    unittest.main()
