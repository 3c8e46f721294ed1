# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import DiffusionInferer

from berdiff.engines import BernoulliPrepareBatch
from berdiff.losses import timestep_only_bce
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler


class TestBernoulliPrepareBatch(unittest.TestCase):
    def test_target_is_flip_mask(self):
        sch = BernoulliScheduler(num_train_timesteps=50)
        prep = BernoulliPrepareBatch(sch)
        codes = torch.randint(0, 2, (4, 3, 8, 8)).float()
        images, target, args, kwargs = prep({"image": codes})
        self.assertTrue(torch.equal(images, codes))
        noisy = sch.add_noise(codes, kwargs["noise"], kwargs["timesteps"])
        self.assertTrue(torch.equal(target, (noisy != codes).float()))
        self.assertTrue(((kwargs["noise"] >= 0) & (kwargs["noise"] < 1)).all())
        self.assertEqual(kwargs["timesteps"].shape, (4,))
        self.assertEqual(args, ())

    def test_max_timestep(self):
        sch = BernoulliScheduler(num_train_timesteps=1000)
        codes = torch.randint(0, 2, (256, 1, 2, 2)).float()
        t = BernoulliPrepareBatch(sch, max_timestep=50)({"image": codes})[3]["timesteps"]
        self.assertLess(t.max().item(), 50)
        self.assertGreater(t.unique().numel(), 20)
        for bad in (0, 1001):
            with self.assertRaises(ValueError):
                BernoulliPrepareBatch(sch, max_timestep=bad)

    def test_sample_prediction_target_and_validation(self):
        sch = BernoulliScheduler(num_train_timesteps=50, prediction_type="sample")
        codes = torch.randint(0, 2, (2, 3, 4, 4)).float()
        self.assertTrue(torch.equal(BernoulliPrepareBatch(sch)({"image": codes})[1], codes))
        with self.assertRaisesRegex(ValueError, "binary"):
            BernoulliPrepareBatch(sch)({"image": torch.rand(2, 3, 4, 4)})
        with self.assertRaises(TypeError):
            BernoulliPrepareBatch(object())

    def test_on_the_fly_encoding(self):
        ae = autoencoder_from_preset("tiny", in_channels=1)
        prep = BernoulliPrepareBatch(BernoulliScheduler(num_train_timesteps=10), autoencoder=ae)
        images, target, _, _ = prep({"image": torch.rand(2, 1, 16, 16)})
        self.assertEqual(images.shape, (2, 4, 8, 8))
        self.assertTrue(torch.all((images == 0) | (images == 1)))

    def test_supervised_trainer_learns(self):
        """The trained denoiser beats the best predictor that sees only the timestep (it learned the codes)."""
        torch.manual_seed(0)
        sch = BernoulliScheduler(num_train_timesteps=1000)
        top = 200  # train_max_timestep: the timestep-only loss is 0.21 nats there, far from 0
        unet = denoiser_from_preset("tiny", latent_channels=4)
        # one fixed "healthy" code with a spatial pattern: knowing it tells which bits of x_t were flipped
        code = (torch.arange(64).reshape(8, 8) % 3 == 0).float().expand(4, 8, 8)
        data = [{"image": code.unsqueeze(0).repeat(16, 1, 1, 1)} for _ in range(100)]
        losses = []
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=1,
            train_data_loader=data,
            network=unet,
            optimizer=torch.optim.Adam(unet.parameters(), 1e-2),
            loss_function=torch.nn.BCEWithLogitsLoss(),
            inferer=DiffusionInferer(sch),
            prepare_batch=BernoulliPrepareBatch(sch, max_timestep=top),
            decollate=False,
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"].item()))
        trainer.run()
        self.assertAlmostEqual(losses[0], 0.6931, places=3)  # zero-initialised output: p = 1/2
        # held-out noise, every timestep of [0, top) equally often: the expected loss of the timestep-only
        # predictor on this set is exactly timestep_only_bce(sch, top)
        self.assertLess(flip_bce(unet, sch, code, top), timestep_only_bce(sch, top) - 0.01)


def flip_bce(unet: torch.nn.Module, sch: BernoulliScheduler, code: torch.Tensor, top: int, reps: int = 3) -> float:
    """BCE of the flip logits on fresh noise of ``code`` at every timestep in [0, top), ``reps`` times each."""
    gen = torch.Generator().manual_seed(123)
    t = torch.arange(top).repeat(reps)
    x0 = code.unsqueeze(0).repeat(len(t), 1, 1, 1)
    xt = sch.add_noise(x0, torch.rand(x0.shape, generator=gen), t)
    with torch.no_grad():
        logits = torch.cat([unet(xt[i : i + 200], timesteps=t[i : i + 200]) for i in range(0, len(t), 200)])
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, (xt != x0).float()).item()

if __name__ == "__main__":
    unittest.main()
