# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import itertools
import unittest

import numpy as np
import torch
from monai.inferers import DiffusionInferer
from parameterized import parameterized

from berdiff.schedulers import BernoulliScheduler


def _kernel(x_to: float, x_from: float, alpha: float) -> float:
    """q(x_to | x_from) for the symmetric kernel B(alpha * x_from + (1 - alpha) / 2)."""
    p1 = alpha * x_from + (1 - alpha) / 2
    return p1 if x_to == 1 else 1 - p1


def _brute_force_posterior(x0_prob: float, x_t: int, ab_t: float, ab_s: float) -> float:
    """P(x_s = 1 | x_t, x0 ~ B(x0_prob)) by enumerating x_0 and x_s with Bayes' rule."""
    joint = {0: 0.0, 1: 0.0}
    for x0, xs in itertools.product((0, 1), (0, 1)):
        p_x0 = x0_prob if x0 == 1 else 1 - x0_prob
        joint[xs] += p_x0 * _kernel(xs, x0, ab_s) * _kernel(x_t, xs, ab_t / ab_s)
    # with a soft x0 the D3PM-style estimate normalises over x_s after marginalising x_0 weighted by q(x_s | x0),
    # i.e. proportional to q(x_t | x_s) * sum_x0 q(x_s | x0) p(x0)
    return joint[1] / (joint[0] + joint[1])


class TestBernoulliScheduler(unittest.TestCase):
    def test_alpha_bar_matches_reference_values(self):
        sch = BernoulliScheduler()
        for t, expected in [(100, 0.8951), (200, 0.6563), (300, 0.3940), (500, 0.0778)]:
            self.assertAlmostEqual(sch.alphas_cumprod[t].item(), expected, places=4)

    @parameterized.expand([(0,), (99,), (199,), (499,), (999,)])
    def test_forward_flip_rate(self, t):
        sch = BernoulliScheduler()
        torch.manual_seed(0)
        x0 = torch.randint(0, 2, (4, 16, 64, 64)).float()
        xt = sch.add_noise(x0, torch.rand_like(x0), torch.full((4,), t))
        rate = (xt != x0).float().mean().item()
        expected = (1 - sch.alphas_cumprod[t].item()) / 2
        n = x0.numel()
        tol = 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-6
        self.assertAlmostEqual(rate, expected, delta=tol)
        # symmetric kernel: zeros flip as often as ones
        for bit in (0.0, 1.0):
            sel = x0 == bit
            self.assertAlmostEqual((xt[sel] != bit).float().mean().item(), expected, delta=3 * tol)
        self.assertTrue(torch.equal(xt, xt.round()))

    def test_add_noise_per_sample_timesteps(self):
        sch = BernoulliScheduler()
        x0 = torch.zeros(2, 8, 64, 64)
        xt = sch.add_noise(x0, torch.rand_like(x0), torch.tensor([0, 999]))
        self.assertLess(xt[0].mean().item(), 0.01)
        self.assertAlmostEqual(xt[1].mean().item(), 0.5, delta=0.02)

    @parameterized.expand([("gaussian",), ("negative",), ("one",), ("nan",), ("shape",)])
    def test_add_noise_rejects_bad_noise(self, kind):
        sch = BernoulliScheduler(num_train_timesteps=10)
        x0 = torch.zeros(2, 3, 4, 4)
        noise = {
            "gaussian": torch.randn_like(x0),
            "negative": torch.full_like(x0, -0.1),
            "one": torch.ones_like(x0),
            "nan": torch.full_like(x0, float("nan")),
            "shape": torch.rand(2, 3, 4, 5),
        }[kind]
        with self.assertRaises(ValueError):
            sch.add_noise(x0, noise, torch.tensor([1, 2]))

    def test_add_noise_rejects_bad_timesteps(self):
        sch = BernoulliScheduler(num_train_timesteps=10)
        x0 = torch.zeros(1, 1, 2, 2)
        with self.assertRaises(ValueError):
            sch.add_noise(x0, torch.rand_like(x0), torch.tensor([10]))

    @parameterized.expand([(1, 0), (10, 9), (10, 3), (500, 100), (999, 0), (200, 199)])
    def test_posterior_matches_bayes(self, t, s):
        sch = BernoulliScheduler()
        ab = sch.alphas_cumprod.double()
        x0_prob = torch.tensor([0.0, 0.13, 0.5, 0.87, 1.0, 0.0, 0.13, 0.5, 0.87, 1.0])
        x_t = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]).float()
        got = sch.posterior(x0_prob, x_t, t, s)
        expected = torch.tensor(
            [_brute_force_posterior(p.item(), int(x.item()), ab[t].item(), ab[s].item()) for p, x in zip(x0_prob, x_t)],
            dtype=torch.float64,
        )
        self.assertTrue(torch.allclose(got.double(), expected, atol=1e-5), f"{got} vs {expected}")
        self.assertTrue(((got >= 0) & (got <= 1)).all())

    def test_strided_posterior_is_composition_of_kernels(self):
        # one strided jump t -> s equals the exact Bayes posterior with alpha_{t|s} = ab_t / ab_s, which differs
        # from (and must not be confused with) a one-step posterior from t
        sch = BernoulliScheduler()
        x0, xt = torch.tensor([0.9]), torch.tensor([0.0])
        strided = sch.posterior(x0, xt, 500, 100)
        one_step = sch.posterior(x0, xt, 500, 499)
        self.assertGreater(abs(strided.item() - one_step.item()), 1e-3)

    def test_posterior_last_step_returns_x0(self):
        sch = BernoulliScheduler()
        x0 = torch.rand(2, 3, 4, 4)
        self.assertTrue(torch.equal(sch.posterior(x0, torch.ones_like(x0), 0, -1), x0))
        with self.assertRaises(ValueError):
            sch.posterior(x0, x0, 5, 5)

    def test_posterior_per_sample_timesteps(self):
        sch = BernoulliScheduler()
        x0, xt = torch.rand(2, 3, 4, 4), torch.randint(0, 2, (2, 3, 4, 4)).float()
        batched = sch.posterior(x0, xt, torch.tensor([10, 300]), torch.tensor([5, -1]))
        self.assertTrue(torch.allclose(batched[0], sch.posterior(x0[:1], xt[:1], 10, 5)[0]))
        self.assertTrue(torch.equal(batched[1], x0[1]))

    def test_posterior_int_timesteps_equal_tensor_timesteps(self):
        """The inference loop passes Python ints (no device sync): same values as 0-d tensors, same checks."""
        sch = BernoulliScheduler()
        x0, xt = torch.rand(2, 3, 4, 4), torch.randint(0, 2, (2, 3, 4, 4)).float()
        for t, s in ((199, 177), (21, 0), (5, 4), (3, -1)):
            self.assertTrue(torch.equal(sch.posterior(x0, xt, t, s), sch.posterior(x0, xt, torch.tensor(t), torch.tensor(s))))
            self.assertTrue(torch.equal(sch.posterior(x0, xt, np.int64(t), s), sch.posterior(x0, xt, t, s)))
        for bad in ((5, 7), (1000, 3)):
            with self.assertRaises(ValueError):
                sch.posterior(x0, xt, *bad)

    @parameterized.expand([(1000, None, 1000), (1000, 199, 200), (1000, 199, 20), (1000, 199, 1), (10, 9, 7)])
    def test_set_timesteps_strictly_decreasing(self, T, start, n):
        sch = BernoulliScheduler(num_train_timesteps=T)
        sch.set_timesteps(n, start_timestep=start)
        ts = sch.timesteps.tolist()
        self.assertEqual(len(ts), n)
        self.assertEqual(ts[0], T - 1 if start is None else start)
        self.assertEqual(ts[-1], 0 if n > 1 else ts[0])
        self.assertTrue(all(a > b for a, b in zip(ts, ts[1:])))
        self.assertEqual(sch.previous_timestep(ts[-1]), -1)

    def test_set_timesteps_validation(self):
        sch = BernoulliScheduler(num_train_timesteps=100)
        for n, start in [(0, None), (11, 9), (5, 100), (5, -1)]:
            with self.assertRaises(ValueError):
                sch.set_timesteps(n, start_timestep=start)

    def test_invalid_prediction_type_and_schedule(self):
        with self.assertRaises(ValueError):
            BernoulliScheduler(prediction_type="epsilon")
        with self.assertRaises(Exception):
            BernoulliScheduler(schedule="no_such_schedule")

    def test_config_round_trip(self):
        sch = BernoulliScheduler(num_train_timesteps=50, schedule="scaled_linear_beta", prediction_type="sample",
                                 beta_start=1e-3, beta_end=3e-2)
        again = BernoulliScheduler(**sch.get_config())
        self.assertTrue(torch.equal(sch.alphas_cumprod, again.alphas_cumprod))
        self.assertEqual(again.prediction_type, "sample")

    def test_step_prediction_types(self):
        torch.manual_seed(0)
        x_t = torch.randint(0, 2, (2, 4, 8, 8)).float()
        logits = torch.randn_like(x_t)
        flip = BernoulliScheduler(num_train_timesteps=20)
        x0 = flip.predict_original(logits, x_t)
        p = torch.sigmoid(logits)
        self.assertTrue(torch.allclose(x0, (x_t - p).abs()))
        sample = BernoulliScheduler(num_train_timesteps=20, prediction_type="sample")
        self.assertTrue(torch.allclose(sample.predict_original(logits, x_t), p))
        self.assertTrue(torch.allclose(sample.predict_flip(logits, x_t), (x_t - p).abs()))

    def test_step_last_is_binary_and_generator_reproducible(self):
        sch = BernoulliScheduler(num_train_timesteps=20)
        sch.set_timesteps(5)
        x_t = torch.randint(0, 2, (2, 4, 8, 8)).float()
        logits = torch.randn_like(x_t)
        a, _ = sch.step(logits, sch.timesteps[0], x_t, generator=torch.Generator().manual_seed(3))
        b, _ = sch.step(logits, sch.timesteps[0], x_t, generator=torch.Generator().manual_seed(3))
        self.assertTrue(torch.equal(a, b))
        last, x0 = sch.step(logits, sch.timesteps[-1], x_t)
        self.assertTrue(torch.equal(last, (x0 > 0.5).float()))

    def test_works_with_monai_diffusion_inferer(self):
        sch = BernoulliScheduler(num_train_timesteps=10)
        net = lambda x, timesteps, context=None: torch.zeros_like(x)  # noqa: E731
        inferer = DiffusionInferer(sch)
        x0 = torch.randint(0, 2, (2, 3, 4, 4)).float()
        out = inferer(x0, net, noise=torch.rand_like(x0), timesteps=torch.tensor([1, 9]))
        self.assertEqual(out.shape, x0.shape)
        sch.set_timesteps(4)
        sample = inferer.sample(x0, net, scheduler=sch, verbose=False)
        self.assertTrue(torch.equal(sample, sample.round()))


if __name__ == "__main__":
    unittest.main()
