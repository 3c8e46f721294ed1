# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Latent maps of MaskedBernoulliInferer on synthetic codes whose anomalous bits are known.

The "autoencoder" is the identity (the image is the code), and the denoiser returns the exact posterior flip
probability under a known healthy code ``h``: every clean bit equals ``h`` except with a small probability ``eps``. The
input code is ``h`` with every bit flipped in a known region. A latent map that means "the input's bits are anomalous
here" must rank that region above everything else.
"""

from __future__ import annotations

import unittest

import torch
import torch.nn as nn
from sklearn.metrics import roc_auc_score

from berdiff.inferers import LATENT_MAP_KEYS, LatentMap, MaskedBernoulliInferer, latent_map_keys
from berdiff.schedulers import BernoulliScheduler


class IdentityCodec(nn.Module):
    """The image is the binary code: encode and decode are the identity."""

    def encode_stage_2_inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x > 0.5).float()

    def decode_stage_2_outputs(self, code: torch.Tensor) -> torch.Tensor:
        return code


class PosteriorDenoiser(nn.Module):
    """
    Flip logits of the exact posterior ``P(x_0 != x_t | x_t)`` under the prior "each clean bit equals ``healthy``
    with probability ``1 - eps``" and the scheduler's forward process (bits are independent, so the posterior of a bit
    depends on that bit of ``x_t`` only).
    """

    def __init__(self, healthy: torch.Tensor, scheduler: BernoulliScheduler, eps: float = 0.02):
        super().__init__()
        self.healthy, self.scheduler, self.eps = healthy, scheduler, eps

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        q = self.scheduler.flip_prob(timesteps, x).double()
        agrees = x == self.healthy
        # x_t == h: x_0 != x_t means x_0 = not h (prior eps) and the bit flipped (q)
        p_agree = self.eps * q / (self.eps * q + (1 - self.eps) * (1 - q))
        # x_t != h: x_0 != x_t means x_0 = h (prior 1 - eps) and the bit flipped (q)
        p_differ = (1 - self.eps) * q / ((1 - self.eps) * q + self.eps * (1 - q))
        p = torch.where(agrees, p_agree, p_differ).clamp(1e-6, 1 - 1e-6)
        return torch.logit(p).float()


def _synthetic(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    healthy = (torch.rand(2, 8, 24, 24, generator=g) < 0.5).float()
    region = torch.zeros(2, 1, 24, 24, dtype=torch.bool)
    region[0, :, 4:10, 6:14] = True
    region[1, :, 14:20, 2:8] = True
    anomalous = region.expand_as(healthy) & (torch.rand(healthy.shape, generator=g) < 0.75)
    code = torch.where(anomalous, 1 - healthy, healthy)
    return healthy, code, region


class TestLatentMapsOnSyntheticCodes(unittest.TestCase):
    def _run(self, **kwargs):
        healthy, code, region = _synthetic()
        scheduler = BernoulliScheduler(num_train_timesteps=1000)
        kw = {"noise_level": 300, "num_inference_steps": 10, "prob_threshold": 0.5, **kwargs}
        inferer = MaskedBernoulliInferer(scheduler, **kw)
        out = inferer(code, IdentityCodec(), PosteriorDenoiser(healthy, scheduler), torch.Generator().manual_seed(1))
        return out, code, healthy, region

    def test_anomalous_bits_score_highest(self):
        out, code, healthy, region = self._run()
        self.assertTrue(torch.equal(out["input_code"], code))
        labels = region.flatten().numpy()
        auroc = {key: roc_auc_score(labels, out[key].flatten().numpy()) for key in LATENT_MAP_KEYS}
        # the maps that compare the predicted healthy code (or the final code) with the input code separate the
        # region almost perfectly ...
        for key in ("latent_code_change", "latent_changed_bits", "latent_mask_fraction"):
            self.assertGreater(auroc[key], 0.95, (key, auroc))
        # ... and the code-change probability is highest inside the region: its smallest value there is above its
        # largest value outside
        change = out["latent_code_change"]
        self.assertGreater(change[region].min().item(), change[~region].max().item())
        self.assertGreater(auroc["latent_confident_change"], 0.95, auroc)
        # the flip probability of the noisy code x_t is dominated by the injected noise: clearly worse
        self.assertLess(auroc["latent_flip_probability"], auroc["latent_code_change"] - 0.02, auroc)
        # the anomalous bits are healed (the code is the healthy one), and few healthy bits change
        inside = region.expand_as(code)
        self.assertGreater((out["code"] == healthy)[inside].float().mean().item(), 0.9)
        self.assertLess((out["code"] != code)[~inside].float().mean().item(), 0.05)
        # the values mean what their names say
        self.assertTrue(torch.allclose(out["latent_changed_bits"], (out["code"] - code).abs().mean(1, keepdim=True)))
        self.assertTrue(torch.allclose(out["latent_mask_fraction"], out["mask"].float().mean(1, keepdim=True)))
        self.assertTrue(torch.equal(out["latent_flip_map"], out["latent_flip_probability"]))
        for key in LATENT_MAP_KEYS:
            self.assertEqual(out[key].shape, (2, 1, 24, 24))
            self.assertTrue(((out[key] >= 0) & (out[key] <= 1)).all(), key)
        # the autoencoder-only map of an exact codec is zero; the anomaly map counts the changed bits
        self.assertEqual(out["autoencoder_map"].abs().max().item(), 0.0)
        self.assertTrue(torch.allclose(out["anomaly_map"], code.shape[1] * out["latent_changed_bits"]))

    def test_confident_change_ignores_uncertain_healthy_bits(self):
        # a healthy "textured" region whose bits the denoiser cannot predict (it answers x0_hat = 0.5 there, flip
        # logit 0: an under-trained denoiser in fine texture) beside the anomalous region it is sure about
        healthy, code, region = _synthetic()
        textured = torch.zeros_like(region)
        textured[:, :, 16:24, 12:24] = True
        textured &= ~region
        scheduler = BernoulliScheduler(num_train_timesteps=1000)
        exact = PosteriorDenoiser(healthy, scheduler)

        def unsure_in_texture(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return exact(x, timesteps).masked_fill(textured.expand_as(x), 0.0)

        inferer = MaskedBernoulliInferer(scheduler, noise_level=100, num_inference_steps=10, prob_threshold=0.5)
        out = inferer(code, IdentityCodec(), unsure_in_texture, torch.Generator().manual_seed(1))
        labels = region.flatten().numpy()
        auroc = {key: roc_auc_score(labels, out[key].flatten().numpy()) for key in LATENT_MAP_KEYS}
        # the mean difference counts the guessed bits of the textured region (|0.5 - z| = 0.5); the confident share
        # counts only the bits the denoiser is sure about
        self.assertGreater(auroc["latent_confident_change"], 0.95, auroc)
        self.assertLess(auroc["latent_code_change"], auroc["latent_confident_change"] - 0.05, auroc)
        confident = out["latent_confident_change"]
        self.assertEqual(confident[textured].max().item(), 0.0)

    def test_marginal_step_posterior_heals_more_than_plug_in(self):
        # with an exact posterior denoiser, the marginal reverse step is ancestral sampling of the prior: about eps of
        # the healthy bits differ from h; the plug-in step keeps bits of x_t (noise and anomaly) far more often
        results = {}
        for rule in ("marginal", "plug_in"):
            out, code, healthy, region = self._run(step_posterior=rule)
            inside = region.expand_as(code)
            results[rule] = (
                (out["code"] != healthy)[inside & (code != healthy)].float().mean().item(),  # anomalous bits kept
                (out["code"] != code)[~inside].float().mean().item(),  # healthy bits changed
            )
        self.assertLess(results["marginal"][0], 0.15, results)
        self.assertLess(results["marginal"][1], 0.05, results)
        self.assertGreater(results["plug_in"][0], 2 * results["marginal"][0], results)
        self.assertGreater(results["plug_in"][1], 2 * results["marginal"][1], results)
        with self.assertRaisesRegex(ValueError, "step_posterior"):
            MaskedBernoulliInferer(BernoulliScheduler(), noise_level=10, step_posterior="exact")

    def test_unmasked_changes_healthy_bits(self):
        # without the mask the denoising re-draws every bit: the final code can differ outside the region too, but
        # the predicted healthy code still differs from the input mostly inside it
        out, _, _, region = self._run(masked=False)
        labels = region.flatten().numpy()
        self.assertGreater(roc_auc_score(labels, out["latent_code_change"].flatten().numpy()), 0.97)
        self.assertTrue(out["mask"].all())
        self.assertEqual(out["latent_mask_fraction"].min().item(), 1.0)

    def test_latent_weighting_ranks_the_residual_by_the_latent_map(self):
        # an inexact autoencoder: its decoder adds a fixed error of the size of a bit to every pixel, so that the
        # residual alone also lights up healthy pixels; weighting it by the confident code change suppresses them
        healthy, code, region = _synthetic()
        error = (torch.rand(code.shape, generator=torch.Generator().manual_seed(7)) - 0.5) * 3.0

        class NoisyCodec(IdentityCodec):
            def decode_stage_2_outputs(self, c: torch.Tensor) -> torch.Tensor:
                return c + error[: len(c)]

        scheduler = BernoulliScheduler(num_train_timesteps=1000)
        maps = {}
        for weighting in (None, "confident_change"):
            inferer = MaskedBernoulliInferer(
                scheduler, noise_level=300, num_inference_steps=10, prob_threshold=0.5, final_code="soft",
                latent_weighting=weighting, latent_weight_floor=0.05,
            )
            out = inferer(code, NoisyCodec(), PosteriorDenoiser(healthy, scheduler), torch.Generator().manual_seed(1))
            maps[weighting] = out
        plain, weighted = maps[None], maps["confident_change"]
        # same draws: the residual is the same, the weighted map is the residual times (floor + latent map)
        self.assertTrue(torch.equal(plain["residual_map"], weighted["residual_map"]))
        self.assertTrue(torch.equal(plain["anomaly_map"], plain["residual_map"]))
        self.assertTrue(torch.allclose(
            weighted["anomaly_map"], weighted["residual_map"] * (0.05 + weighted["latent_confident_change"])
        ))
        labels = region.flatten().numpy()
        auroc = {k: roc_auc_score(labels, m["anomaly_map"].flatten().numpy()) for k, m in maps.items()}
        self.assertGreater(auroc["confident_change"], 0.97, auroc)
        self.assertGreater(auroc["confident_change"], auroc[None] + 0.03, auroc)
        for bad, message in (({"latent_weighting": "confident"}, "latent_weighting"),
                             ({"latent_weight_floor": 0.0}, "latent_weight_floor")):
            with self.assertRaisesRegex(ValueError, message):
                MaskedBernoulliInferer(scheduler, noise_level=10, **bad)

    def test_latent_map_keys(self):
        self.assertEqual(latent_map_keys("code_change"), ["latent_code_change"])
        self.assertEqual(latent_map_keys(["mask_fraction", "flip_probability"]),
                         ["latent_mask_fraction", "latent_flip_probability"])
        self.assertEqual(latent_map_keys("none"), [])
        self.assertEqual(latent_map_keys(None), [])
        self.assertEqual(latent_map_keys([]), [])
        self.assertEqual([f"latent_{m.value}" for m in LatentMap], list(LATENT_MAP_KEYS))
        with self.assertRaisesRegex(ValueError, "unknown latent map"):
            latent_map_keys("latent_flip")
        with self.assertRaisesRegex(ValueError, "repeat"):
            latent_map_keys(["code_change", "code_change"])


if __name__ == "__main__":
    unittest.main()
