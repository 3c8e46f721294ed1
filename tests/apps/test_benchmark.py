# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import json
import os
import tempfile
import unittest

import torch
import torch.nn as nn
from monai.networks.schedulers import DDPMScheduler

from berdiff.apps.benchmark.baselines import AutoencoderReconstructionInferer, GaussianPartialNoisingInferer, partial_timesteps
from berdiff.apps.benchmark import Method, benchmark, cache_key
from berdiff.data.lesions import make_lesions
from berdiff.inferers import LatentMap
from berdiff.networks import autoencoder_from_preset
from tests.utils import write_heads


class _OracleEps(nn.Module):
    """Predicts the exact noise of ``x_t`` for a known clean image: DDIM must then return that image."""

    def __init__(self, x0: torch.Tensor, scheduler: DDPMScheduler) -> None:
        super().__init__()
        self.x0, self.ab = x0, scheduler.alphas_cumprod
        self.calls = 0

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        ab = self.ab[timesteps].view(-1, 1, 1, 1)
        return (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()


class TestBaselines(unittest.TestCase):
    def test_partial_timesteps(self):
        self.assertEqual(partial_timesteps(10, None, 100).tolist(), list(range(9, -1, -1)))
        ts = partial_timesteps(200, 20, 1000)
        self.assertEqual((len(ts), int(ts[0]), int(ts[-1])), (20, 199, 0))
        self.assertTrue(bool((ts[1:] < ts[:-1]).all()))
        for bad in ((0, None), (2000, None), (10, 11), (10, 0)):
            with self.assertRaises(ValueError):
                partial_timesteps(bad[0], bad[1], 1000)

    def test_ddim_partial_noising_recovers_image_with_oracle(self):
        sch = DDPMScheduler(num_train_timesteps=100)
        x = torch.rand(2, 1, 8, 8)
        oracle = _OracleEps(x * 2 - 1, sch)
        inf = GaussianPartialNoisingInferer(sch, noise_level=60, num_inference_steps=7)
        out = inf(x, oracle, torch.Generator().manual_seed(0))
        self.assertEqual(oracle.calls, 7)
        torch.testing.assert_close(out["reconstruction"], x, atol=1e-4, rtol=0)
        self.assertEqual(out["anomaly_map"].shape, (2, 1, 8, 8))
        self.assertLess(float(out["anomaly_map"].max()), 1e-6)
        # a wrong network gives a large residual: the map is the squared residual
        zero = GaussianPartialNoisingInferer(sch, noise_level=60, num_inference_steps=7, eta=1.0)
        res = zero(x, lambda x, timesteps: torch.zeros_like(x), torch.Generator().manual_seed(0))
        torch.testing.assert_close(res["anomaly_map"], (res["reconstruction"] - x) ** 2)
        with self.assertRaises(ValueError):
            GaussianPartialNoisingInferer(sch, eta=2.0)
        with self.assertRaises(TypeError):
            GaussianPartialNoisingInferer(object())

    def test_autoencoder_inferer(self):
        ae = autoencoder_from_preset("tiny", in_channels=1).eval()
        x = torch.rand(2, 1, 16, 16)
        out = AutoencoderReconstructionInferer()(x, ae)
        expected = ae.decode_stage_2_outputs(ae.encode_stage_2_inputs(x)).clamp(0, 1)
        torch.testing.assert_close(out["reconstruction"], expected)
        torch.testing.assert_close(out["anomaly_map"], (expected - x) ** 2)


MINI = dict(
    size=32, ae_preset="tiny", denoiser_preset="tiny", denoiser_channels=None, ddpm_channels=(8, 8), ae_iterations=3,
    diffusion_iterations=3, ae_batch_size=4, diffusion_batch_size=4, num_train_timesteps=300,
    noise_levels=(100, 200), prob_thresholds=(0.5,), ddpm_noise_levels=(50,), tune_steps=2, k_values=(1, 3),
    ddpm_steps=2, timing_slices=2, tune_fraction=0.4, threads=1,
)


class TestMiniBenchmark(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.train = os.path.join(cls.tmp.name, "train")
        write_heads(cls.train, 6, 40, 36)
        write_heads(os.path.join(cls.tmp.name, "val"), 6, 40, 36)
        cls.pairs = os.path.join(cls.tmp.name, "pairs")
        make_lesions(os.path.join(cls.tmp.name, "val"), cls.pairs, seed=1, radius_range=(0.12, 0.2))
        cls.out = os.path.join(cls.tmp.name, "out")
        torch.manual_seed(0)
        cls.res = benchmark(train_dir=cls.train, test_dir=cls.pairs, out=cls.out, **MINI)
        with open(os.path.join(cls.out, "benchmarks.md")) as f:
            cls.md = f.read()
        with open(os.path.join(cls.out, "results.json")) as f:
            cls.json = json.load(f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_method_scored_and_table_written(self):
        res = self.res
        self.assertEqual(list(res["methods"]), [str(m) for m in Method.__members__.values()])
        md = self.md
        self.assertEqual(self.json["methods"].keys(), res["methods"].keys())
        for label in ("AE (binary", "unmasked", "masked (ours)", "Gaussian DDPM", "Sweep over K", "Sweep over (L, P)"):
            self.assertIn(label, md)
        for m, r in res["methods"].items():
            t = r["test"]
            self.assertEqual(t["n_slices"], res["data"]["n_test"])
            self.assertEqual(t["n_healthy"], res["data"]["n_test_healthy"])
            for key in ("dice_fixed", "dice_tuned", "dice_oracle"):
                self.assertTrue(0.0 <= t[key] <= 1.0, (m, key, t[key]))
            self.assertTrue(0.0 <= t["auroc"] <= 1.0 and 0.0 <= t["auprc"] <= 1.0, m)
            self.assertTrue(0.0 <= t["auroc_brain_pooled"] <= 1.0 and 0.0 <= t["auprc_brain_pooled"] <= 1.0, m)
            self.assertGreaterEqual(t["dice_oracle"], t["dice_fixed"] - 1e-9, m)
            self.assertGreater(r["timing"]["seconds_per_slice"], 0.0)
            self.assertGreater(r["timing"]["peak_memory_mib"], 0.0)
            self.assertGreater(r["params"], 0)
            self.assertIn(r["threshold"], [round(0.05 * k, 2) for k in range(1, 20)])
        self.assertAlmostEqual(res["methods"]["masked"]["speed_ratio_to_masked"], 1.0)
        # every latent map of the Bernoulli methods is scored on the held-out split and reported; the others have none
        for m in ("masked", "unmasked"):
            latent = res["methods"][m]["test"]["latent_maps"]
            self.assertEqual(sorted(latent), sorted(x.value for x in LatentMap))
            for name, v in latent.items():
                self.assertTrue(0.0 <= v["auroc_brain_pooled"] <= 1.0 and 0.0 <= v["auprc_brain_pooled"] <= 1.0, name)
        self.assertEqual(res["methods"]["ddpm"]["test"]["latent_maps"], {})
        self.assertIn("## Latent maps of the Bernoulli methods", md)
        self.assertIn("latent confident_change", md)
        # the AE's parameters are counted in the Bernoulli methods
        self.assertGreater(res["methods"]["masked"]["params"], res["methods"]["ae"]["params"])

    def test_tuning_uses_only_the_tuning_split(self):
        data = self.res["data"]
        self.assertFalse(set(data["tune_names"]) & set(data["test_names"]))
        self.assertEqual(len(data["tune_names"]) + len(data["test_names"]), 6)
        tuning = self.res["tuning"]
        lp = {(row["L"], row["P"]) for row in tuning["masked_lp"]}
        self.assertTrue({(100, 0.6), (200, 0.5), (300, 0.8), (100, 0.5), (200, 0.5)} <= lp)
        for row in tuning["masked_lp"]:
            self.assertEqual(row["n_slices"], data["n_tune"])
            self.assertTrue(0.0 <= row["mask_fraction"] <= 1.0)
        for row in tuning["unmasked_l"]:
            self.assertEqual(row["mask_fraction"], 1.0)  # no masking: every latent entry may change
        masked = self.res["methods"]["masked"]["settings"]
        self.assertIn((masked["L"], masked["P"]), lp)
        self.assertEqual(sorted(r["K"] for r in tuning["masked_k"]), [1, 2, 3])  # the K grid and tune_steps
        self.assertIn(masked["K"], [r["K"] for r in tuning["masked_k"]])
        refs = {(r["reference"], r.get("weighting")): r for r in tuning["masked_reference"]}
        self.assertEqual(set(refs), {("input", None), ("autoencoder", None), ("input", "confident_change")})
        self.assertIn((masked["reference"], masked["weighting"]), refs)
        self.assertIn("Anomaly map reference", self.md)

    def test_cache_reused_and_keyed(self):
        again = benchmark(train_dir=self.train, test_dir=self.pairs, out=self.out, methods="ae,ddpm", **MINI)
        self.assertEqual(list(again["methods"]), ["ae", "ddpm"])
        self.assertTrue(all(t["cached"] for t in again["training"].values()))
        self.assertEqual(again["training"]["autoencoder"]["key"], self.res["training"]["autoencoder"]["key"])
        files = sorted(os.path.join(self.train, f) for f in os.listdir(self.train))
        self.assertEqual(cache_key(files, {"a": 1}), cache_key(files, {"a": 1}))
        self.assertNotEqual(cache_key(files, {"a": 1}), cache_key(files, {"a": 2}))
        self.assertNotEqual(cache_key(files, {"a": 1}), cache_key(files[:-1], {"a": 1}))

    def test_bootstrap_and_training_records(self):
        for m in ("ae", "unmasked", "ddpm"):
            vs = self.res["methods"][m]["vs_masked"]
            for metric in ("dice_fixed", "dice_tuned", "auprc"):
                self.assertLessEqual(vs[metric]["low"], vs[metric]["high"])
                self.assertEqual(vs[metric]["n"], self.res["data"]["n_test"])
        self.assertNotIn("vs_masked", self.res["methods"]["masked"])
        den = self.res["training"]["bernoulli denoiser"]
        self.assertEqual(den["max_timestep"], 300)  # the largest L visited: the reference (300, 0.8)
        self.assertGreater(den["baseline_loss"], 0.0)
        self.assertLess(den["baseline_loss"], 0.6932)
        self.assertIn("masked minus each baseline", self.md.lower())

    def test_equal_compute_budget(self):
        out = os.path.join(self.tmp.name, "budget")
        res = benchmark(train_dir=self.train, test_dir=self.pairs, out=out, methods="ae,ddpm",
                        **{**MINI, "budget_tflop": 3e-3, "ae_share": 0.5})
        ae, dd = res["training"]["autoencoder"], res["training"]["gaussian ddpm"]
        for t, share in ((ae, 0.5), (dd, 1.0)):
            # as many whole iterations as the budget buys
            self.assertLessEqual(t["train_tflop"], share * 3e-3 + 1e-12)
            self.assertGreater(t["train_tflop"] + t["flops_per_iteration"] / 1e12, share * 3e-3)
        with self.assertRaisesRegex(ValueError, "budget_tflop"):
            benchmark(train_dir=self.train, test_dir=self.pairs, out=out, **{**MINI, "budget_tflop": -1.0})

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "unknown method"):
            benchmark(train_dir=self.train, test_dir=self.pairs, out=self.out, methods="ae,vae", **MINI)
        with self.assertRaisesRegex(FileNotFoundError, "images/"):
            benchmark(train_dir=self.train, test_dir=self.train, out=self.out, **MINI)


if __name__ == "__main__":
    unittest.main()
