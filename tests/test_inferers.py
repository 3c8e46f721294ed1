# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch
import torch.nn as nn
from parameterized import parameterized

from berdiff.inferers import MaskedBernoulliInferer
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler


class RegionFlipDenoiser(nn.Module):
    """
    Fake denoiser that believes the clean code is all ones inside a known latent region: there it predicts a flip
    (probability ~1) for every 0 bit; everywhere else it predicts no flip. Records the timesteps it is called with.
    """

    def __init__(self, region: tuple[slice, slice]):
        super().__init__()
        self.region = region
        self.calls: list[int] = []

    def forward(self, x, timesteps):
        self.calls.append(int(timesteps[0]))
        logits = torch.full_like(x, -20.0)
        inside = x[..., self.region[0], self.region[1]]
        logits[..., self.region[0], self.region[1]] = torch.where(inside < 0.5, 20.0, -20.0)
        return logits


class ZeroCodeAutoencoder(nn.Module):
    """Fake autoencoder: the code of any image is all zeros (B, 4, H, W); decoding gives a zero image."""

    def encode_stage_2_inputs(self, x):
        return torch.zeros(x.shape[0], 4, *x.shape[2:])

    def decode_stage_2_outputs(self, code):
        return torch.zeros(code.shape[0], 1, *code.shape[2:])


class RecordingDenoiser(nn.Module):
    """Fake denoiser predicting "no flip" everywhere; records the inputs and timesteps of its calls."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, int]] = []

    def forward(self, x, timesteps):
        self.calls.append((x.clone(), int(timesteps[0])))
        return torch.full_like(x, -20.0)


def _ae():
    torch.manual_seed(0)
    return autoencoder_from_preset("tiny", in_channels=2).eval()


class TestMaskedBernoulliInferer(unittest.TestCase):
    def test_entries_outside_mask_keep_input_code(self):
        ae, region = _ae(), (slice(2, 5), slice(3, 6))
        den = RegionFlipDenoiser(region)
        sch = BernoulliScheduler(num_train_timesteps=100)
        inf = MaskedBernoulliInferer(sch, noise_level=60, prob_threshold=0.5)
        x = torch.rand(2, 2, 16, 16)
        out = inf(x, ae, den, generator=torch.Generator().manual_seed(1))
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[region] = True
        self.assertTrue(out["mask"][..., inside].any())
        self.assertFalse(out["mask"][..., ~inside].any())
        # every entry outside the mask equals the input code; the region is healed to the model's belief (ones)
        mask = out["mask"]
        self.assertTrue(torch.equal(out["code"][~mask], out["input_code"][~mask]))
        self.assertTrue((out["code"][..., inside] == 1).all())
        self.assertTrue((out["input_code"][..., inside] == 0).any())  # something really was healed
        # one network call per visited timestep, starting at L - 1
        self.assertEqual(den.calls, list(range(59, -1, -1)))
        # the latent flip map is positive only around the region (upsampled x2)
        lfm = out["latent_flip_map"]
        self.assertGreater(lfm[..., 6:8, 8:10].min().item(), 0.05)
        self.assertLess(lfm[..., 12:, 0:3].max().item(), 1e-6)

    def test_first_noising_uses_index_l_minus_1(self):
        """x_{L-1} ~ q(x_{L-1} | z_in): the first network input has flip rate (1 - ab[L-1]) / 2, not (1 - ab[L]) / 2."""
        sch = BernoulliScheduler(num_train_timesteps=10)
        den = RecordingDenoiser()
        L = 2
        MaskedBernoulliInferer(sch, noise_level=L, num_inference_steps=L)(
            torch.zeros(16, 1, 64, 64), ZeroCodeAutoencoder(), den, generator=torch.Generator().manual_seed(0)
        )
        self.assertEqual([t for _, t in den.calls], [L - 1, 0])
        first = den.calls[0][0]  # the code is all zeros, so every 1 is a flip
        rate, n = first.mean().item(), first.numel()
        expected, wrong = ((1 - sch.alphas_cumprod[[L - 1, L]].double()) / 2).tolist()
        sigma = (expected * (1 - expected) / n) ** 0.5
        self.assertLess(abs(rate - expected), 4 * sigma)
        self.assertGreater(abs(rate - wrong), 20 * sigma)

    def test_mask_is_per_sample(self):
        ae = _ae()

        class PerSample(nn.Module):
            def forward(self, x, timesteps):
                logits = torch.full_like(x, -20.0)
                logits[1, :, :2, :2] = 20.0  # only the second sample has an anomaly
                return logits

        inf = MaskedBernoulliInferer(BernoulliScheduler(num_train_timesteps=20), noise_level=10, prob_threshold=0.5)
        out = inf(torch.rand(2, 2, 16, 16), ae, PerSample())
        self.assertEqual(out["mask"][0].sum().item(), 0)
        self.assertEqual(out["mask"][1].sum().item(), 4 * 4)

    @parameterized.expand([(10, None), (10, 3), (10, 1)])
    def test_keys_shapes_and_steps(self, L, K):
        ae = _ae()
        den = RegionFlipDenoiser((slice(0, 1), slice(0, 1)))
        inf = MaskedBernoulliInferer(BernoulliScheduler(num_train_timesteps=20), noise_level=L, num_inference_steps=K)
        out = inf(torch.rand(3, 2, 16, 16), ae, den)
        self.assertEqual(out["reconstruction"].shape, (3, 2, 16, 16))
        self.assertEqual(out["anomaly_map"].shape, (3, 1, 16, 16))
        self.assertEqual(out["latent_flip_map"].shape, (3, 1, 16, 16))
        self.assertEqual(out["mask"].shape, (3, 4, 8, 8))
        self.assertEqual(len(den.calls), L if K is None else K)
        self.assertEqual(den.calls[0], L - 1)
        self.assertTrue((out["anomaly_map"] >= 0).all() and (out["anomaly_map"] <= 2).all())

    def test_anomaly_map_is_summed_squared_residual(self):
        ae = _ae()
        inf = MaskedBernoulliInferer(BernoulliScheduler(num_train_timesteps=20), noise_level=5)
        x = torch.rand(1, 2, 16, 16)
        out = inf(x, ae, RegionFlipDenoiser((slice(0, 0), slice(0, 0))))
        self.assertTrue(torch.allclose(out["anomaly_map"], ((out["reconstruction"] - x) ** 2).sum(1, keepdim=True)))
        # nothing masked: the reconstruction is the decoded input code
        self.assertTrue(torch.allclose(out["reconstruction"], ae.decode(out["input_code"]).clamp(0, 1)))

    def test_batch_equals_single_runs_and_seeds_reproduce(self):
        torch.manual_seed(0)
        ae = autoencoder_from_preset("tiny", in_channels=2).eval()
        unet = denoiser_from_preset("tiny", latent_channels=4).eval()
        with torch.no_grad():  # a non-trivial denoiser: randomise the zero-initialised output layer
            for p in unet.parameters():
                p.add_(0.3 * torch.randn_like(p))
        inf = MaskedBernoulliInferer(BernoulliScheduler(num_train_timesteps=50), noise_level=20, prob_threshold=0.4)
        x = torch.rand(2, 2, 16, 16)
        gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
        batch = inf(x, ae, unet, generator=gens())
        for i in range(2):
            single = inf(x[i : i + 1], ae, unet, generator=[gens()[i]])
            for key in ("reconstruction", "anomaly_map", "latent_flip_map", "mask", "code"):
                self.assertTrue(torch.allclose(batch[key][i : i + 1].float(), single[key].float(), atol=1e-5), key)
        again = inf(x, ae, unet, generator=gens())
        self.assertTrue(torch.equal(batch["anomaly_map"], again["anomaly_map"]))
        one_gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        self.assertTrue(torch.equal(inf(x, ae, unet, one_gen())["code"], inf(x, ae, unet, one_gen())["code"]))

    def test_autoencoder_reference_is_zero_outside_changed_code(self):
        ae, region = _ae(), (slice(2, 5), slice(3, 6))
        sch = BernoulliScheduler(num_train_timesteps=100)
        x = torch.rand(1, 2, 16, 16)
        kw = {"noise_level": 40, "prob_threshold": 0.5}
        gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
        a = MaskedBernoulliInferer(sch, anomaly_reference="autoencoder", **kw)(x, ae, RegionFlipDenoiser(region), gen())
        b = MaskedBernoulliInferer(sch, **kw)(x, ae, RegionFlipDenoiser(region), gen())
        self.assertTrue(torch.equal(a["reconstruction"], b["reconstruction"]))
        expected = ((a["reconstruction"] - ae.decode(a["input_code"]).clamp(0, 1)) ** 2).sum(1, keepdim=True)
        self.assertTrue(torch.allclose(a["anomaly_map"], expected))
        # far from the healed region (decoder receptive field aside) nothing changed
        self.assertLess(a["anomaly_map"][..., 14:, :2].max().item(), b["anomaly_map"][..., 14:, :2].max().item() + 1e-6)
        self.assertGreater(a["anomaly_map"].max().item(), 0.0)
        # the paper's map (against the input) is kept beside it, and is the residual map of the input reference
        self.assertTrue(torch.allclose(a["input_residual_map"], ((a["reconstruction"] - x) ** 2).sum(1, keepdim=True)))
        self.assertTrue(torch.equal(a["input_residual_map"], b["residual_map"]))
        self.assertTrue(torch.equal(b["input_residual_map"], b["residual_map"]))
        self.assertFalse(torch.allclose(a["input_residual_map"], a["residual_map"]))
        with self.assertRaises(ValueError):
            MaskedBernoulliInferer(sch, anomaly_reference="healthy", **kw)

    def test_unmasked_and_soft_final(self):
        ae = _ae()
        den = RegionFlipDenoiser((slice(2, 5), slice(3, 6)))
        sch = BernoulliScheduler(num_train_timesteps=20)
        out = MaskedBernoulliInferer(sch, noise_level=10, masked=False, final_code="soft")(torch.rand(1, 2, 16, 16), ae, den)
        self.assertTrue(out["mask"].all())
        # the soft final code is x0_hat itself: in [0, 1] but not exactly binary
        self.assertTrue(((out["code"] >= 0) & (out["code"] <= 1)).all())
        self.assertFalse(torch.equal(out["code"], out["code"].round()))

    def test_validation(self):
        sch = BernoulliScheduler(num_train_timesteps=20)
        for kwargs in ({"noise_level": 0}, {"noise_level": 21}, {"noise_level": 5, "num_inference_steps": 6},
                       {"prob_threshold": 1.5}, {"final_code": "hard"}, {"latent_reduction": "median"}):
            with self.assertRaises(ValueError, msg=str(kwargs)):
                MaskedBernoulliInferer(sch, **{"noise_level": 5, **kwargs})
        with self.assertRaises(TypeError):
            MaskedBernoulliInferer(object(), noise_level=5)


if __name__ == "__main__":
    unittest.main()
