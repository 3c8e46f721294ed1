# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import unittest

import torch

from berdiff.losses import AutoencoderLoss


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


if __name__ == "__main__":
    unittest.main()
