# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import math
import unittest

import torch
import torch.nn as nn
from ignite.engine import Engine
from monai.inferers import DiffusionInferer

from berdiff.data.tensor_loader import TensorLoader
from berdiff.engines import BernoulliPrepareBatch
from berdiff.networks import autoencoder_from_preset
from berdiff.schedulers import BernoulliScheduler
from berdiff.training import (
    LossMonitor,
    WarmupEMAHandler,
    adamw,
    build_trainer,
    encode_dataset,
    resolve_precision,
    scaled_learning_rate,
    training_flops,
)


class TestSettings(unittest.TestCase):
    def test_precision(self):
        self.assertEqual(resolve_precision("auto", "cpu"), "fp32")
        self.assertEqual(resolve_precision("auto", "cuda"), "bf16")
        with self.assertRaisesRegex(ValueError, "CUDA"):
            resolve_precision("bf16", "cpu")
        with self.assertRaises(ValueError):
            resolve_precision("fp8", "cpu")

    def test_learning_rate_rule(self):
        self.assertAlmostEqual(scaled_learning_rate(1e-4, 144, 36, "sqrt"), 2e-4)
        self.assertAlmostEqual(scaled_learning_rate(1e-4, 144, 36, "linear"), 4e-4)
        self.assertAlmostEqual(scaled_learning_rate(1e-4, 144, 36, "none"), 1e-4)
        with self.assertRaises(ValueError):
            scaled_learning_rate(1e-4, 0, 36)

    def test_adamw_is_fused_on_cpu_and_equals_adam_without_decay(self):
        torch.manual_seed(0)
        a, b = nn.Linear(4, 3), nn.Linear(4, 3)
        b.load_state_dict(a.state_dict())
        opt_a, opt_b = adamw(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2, foreach=False)
        self.assertTrue(opt_a.defaults["fused"])
        x = torch.randn(8, 4)
        for _ in range(3):
            for net, opt in ((a, opt_a), (b, opt_b)):
                opt.zero_grad()
                net(x).pow(2).mean().backward()
                opt.step()
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


class TestWarmupEMA(unittest.TestCase):
    def test_momentum_schedule_and_update(self):
        net = nn.Linear(2, 2, bias=False)
        ema = WarmupEMAHandler(net, momentum=0.001)
        self.assertAlmostEqual(ema.momentum_at(1), 9 / 11)
        self.assertAlmostEqual(ema.momentum_at(100_000), 0.001)
        engine = Engine(lambda e, b: None)
        ema.attach(engine)
        init = net.weight.detach().clone()
        with torch.no_grad():
            net.weight.add_(1.0)  # the "trained" weights move away from the initialisation

        # after 1000 iterations of training at fixed weights, the EMA holds almost none of the initialisation
        engine.run([0] * 1000, max_epochs=1)
        share_init = ((ema.ema_model.weight - net.weight) / (init - net.weight)).mean().item()
        self.assertLess(share_init, 0.01)
        plain = 0.999**1000  # a plain EMA with momentum 0.001 keeps 37 % of the initialisation
        self.assertGreater(plain, 0.36)
        no_warmup = WarmupEMAHandler(nn.Linear(2, 2), momentum=0.001, warmup=False)
        self.assertEqual(no_warmup.momentum_at(1), 0.001)


class TestBuildTrainer(unittest.TestCase):
    def test_trains_the_denoiser_below_the_timestep_only_loss(self):
        """A tiny denoiser trained through the fast path beats the closed-form loss of a timestep-only predictor on
        codes with structure (every channel is constant: a flipped bit is one that differs from its channel's
        value, which a network can learn and a timestep-only predictor cannot see)."""
        from berdiff.losses import timestep_only_bce
        from berdiff.networks import denoiser_from_preset

        torch.manual_seed(0)
        codes = torch.tensor([1, 0, 1, 0], dtype=torch.uint8)[None, :, None, None].expand(32, 4, 8, 8).contiguous()
        sched = BernoulliScheduler(num_train_timesteps=1000)
        unet = denoiser_from_preset("tiny", latent_channels=4)
        loader = TensorLoader({"image": codes}, batch_size=16, dtype=torch.float32)
        monitor = LossMonitor(interval=25, log=False)
        trainer = build_trainer(
            "cpu", 1000, loader, unet, adamw(unet.parameters(), 3e-3), nn.BCEWithLogitsLoss(),
            inferer=DiffusionInferer(sched), prepare_batch=BernoulliPrepareBatch(sched, max_timestep=300),
            max_iterations=100,
        )
        monitor.attach(trainer)
        trainer.run()
        self.assertEqual(trainer.state.iteration, 100)
        self.assertEqual([it for it, _ in monitor.history][-1], 100)
        self.assertLess(monitor.final_loss(1), 0.9 * timestep_only_bce(sched, 300))  # measured 0.264 vs 0.322

    def test_errors(self):
        net = nn.Linear(2, 2)
        with self.assertRaisesRegex(ValueError, "max_iterations"):
            build_trainer("cpu", 1, [], net, adamw(net.parameters(), 1e-3), nn.MSELoss(), max_iterations=0)
        with self.assertRaisesRegex(ValueError, "CUDA"):
            build_trainer("cpu", 1, [], net, adamw(net.parameters(), 1e-3), nn.MSELoss(), precision="bf16")


class TestEncodeAndFlops(unittest.TestCase):
    def test_encode_dataset_matches_single_slice_codes(self):
        torch.manual_seed(0)
        ae = autoencoder_from_preset("tiny", in_channels=1).eval()
        images = torch.rand(5, 1, 16, 16)
        codes = encode_dataset([{"image": x} for x in images], ae, "cpu", batch_size=2)
        self.assertEqual(codes.dtype, torch.uint8)
        expected = torch.cat([ae.encode_stage_2_inputs(x[None]) for x in images])
        self.assertTrue(torch.equal(codes.float(), expected))

    def test_training_flops_counts_forward_and_backward(self):
        lin = nn.Linear(10, 20, bias=False)
        x = torch.randn(4, 10)
        # forward 2*4*10*20; backward: grad wrt weight only (x needs no grad), 2*4*10*20
        self.assertEqual(training_flops(lambda: lin(x).sum()), 2 * (2 * 4 * 10 * 20))
        self.assertTrue(math.isfinite(training_flops(lambda: lin(x).pow(2).mean())))


if __name__ == "__main__":
    unittest.main()
