# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Both training stages of the brain MRI bundle through ``monai.bundle`` on tiny synthetic BraTS-layout subjects."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import unittest

import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow

from berdiff.data.brats import prepare_brats
from berdiff.losses import timestep_only_bce
from berdiff.model_description import read_model_description
from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.training import DelayedAdversarialLoss, latest_checkpoint, training_loss_output
from tests.utils import BUNDLE, TempDirClassMixin, write_brats_subjects

CONFIGS = os.path.abspath(os.path.join(BUNDLE, "configs"))
AE_CONFIG = os.path.join(CONFIGS, "train_autoencoder.yaml")
#: stage 2 is layered on stage 1's config
DIFF_CONFIG = [AE_CONFIG, os.path.join(CONFIGS, "train_diffusion.yaml")]
MULTI_GPU_CONFIG = os.path.join(CONFIGS, "multi_gpu_train.yaml")


def _workflow(config, tmp: str, data: str, **overrides) -> ConfigWorkflow:
    settings = {
        "bundle_root": os.path.abspath(BUNDLE),
        "dataset_dir": data,
        "models_dir": os.path.join(tmp, "models"),
        "output_dir": os.path.join(tmp, "logs"),
        "preset": "tiny",
        "spatial_size": 32,
        "batch_size": 8,
        "num_workers": 0,
        "max_epochs": 1,
        **overrides,
    }
    wf = ConfigWorkflow(config_file=config, workflow_type="train", **settings)
    wf.initialize()
    return wf


def flip_bce(unet: torch.nn.Module, scheduler, codes: torch.Tensor) -> float:
    """BCE of the predicted flip probability (from the logits, whatever the scheduler's prediction type) on fresh noise
    at every timestep of [0, T) (the training range), each with one of ``codes`` in turn: the timestep-only
    predictor's expected loss on this set is ``timestep_only_bce``."""
    gen = torch.Generator().manual_seed(0)
    t = torch.arange(scheduler.num_train_timesteps)
    x0 = codes.float()[t % len(codes)]
    xt = scheduler.add_noise(x0, torch.rand(x0.shape, generator=gen), t)
    unet = unet.eval()
    with torch.no_grad():
        logits = torch.cat([unet(xt[i : i + 512], timesteps=t[i : i + 512]) for i in range(0, len(t), 512)])
    flip = scheduler.predict_flip(logits, xt).clamp(1e-6, 1 - 1e-6)
    return torch.nn.functional.binary_cross_entropy(flip, (xt != x0).float()).item()


class TestBratsTraining(TempDirClassMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        write_brats_subjects(os.path.join(cls.tmp, "src"))
        cls.data = os.path.join(cls.tmp, "prepared")
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_brats(os.path.join(cls.tmp, "src"), cls.data, val_fraction=0.25, spatial_size=32)
        # 13 healthy training slices -> 2 iterations per epoch with batch 8

    def test_two_stages_and_model_export(self):
        tmp = os.path.join(self.tmp, "two_stages")
        wf = _workflow(AE_CONFIG, tmp, self.data)
        self.assertEqual(wf.check_properties(), [])
        wf.run()
        wf.finalize()
        stage1 = os.path.join(tmp, "models", "stages", "autoencoder")
        for name in ("autoencoder_best.pt", "autoencoder_final.pt", "checkpoint_final.pt"):
            self.assertTrue(os.path.isfile(os.path.join(stage1, name)), name)
        self.assertTrue(os.listdir(os.path.join(tmp, "logs")))  # TensorBoard events

        # 30 epochs of 2 iterations (validation once, at the end), a learning rate for so short a run
        wf = _workflow(DIFF_CONFIG, tmp, self.data, max_epochs=30, val_interval=30, learning_rate=1e-2)
        self.assertEqual(wf.check_properties(), [])
        trainer = wf.parser.get_parsed_content("train#trainer")
        wf.run()
        wf.finalize()
        self.assertEqual(trainer.state.iteration, 60)
        # the denoiser learned the codes: it beats the best predictor that sees only the timestep
        unet, scheduler = wf.parser.get_parsed_content("network_def"), wf.parser.get_parsed_content("scheduler")
        codes = wf.parser.get_parsed_content("train#dataloader").data["image"].float()  # encoded once, on the device
        self.assertEqual(scheduler.prediction_type, "sample")  # the default
        # measured 0.331 against 0.576 after these 60 iterations (the flip prediction type got only ~0.01 below)
        self.assertLess(flip_bce(unet, scheduler, codes), 0.75 * timestep_only_bce(scheduler))
        model_path = os.path.join(tmp, "models", "model.pt")
        # no other *.pt; the model description beside the weights
        self.assertEqual(sorted(os.listdir(os.path.join(tmp, "models"))), ["model.json", "model.pt", "stages"])
        description = read_model_description(model_path, required=True)
        self.assertEqual(
            {k: description[k] for k in ("preset", "in_channels", "spatial_size", "latent_channels",
                                         "num_train_timesteps", "train_max_timestep", "trained_iterations",
                                         "prediction_type", "pixdim")},
            {"preset": "tiny", "in_channels": 4, "spatial_size": [32, 32], "pixdim": None, "latent_channels": 4,
             "num_train_timesteps": 1000, "train_max_timestep": None, "trained_iterations": 60,
             "prediction_type": "sample"},
        )
        state = torch.load(model_path, weights_only=True)
        pipeline = AnomalyPipeline(autoencoder_from_preset("tiny", in_channels=4), denoiser_from_preset("tiny"))
        pipeline.load_state_dict(state, strict=True)
        best_ae = torch.load(os.path.join(stage1, "autoencoder_best.pt"), weights_only=True)
        ema_path = os.path.join(tmp, "models", "stages", "diffusion", "denoiser_final.pt")
        ema_unet = torch.load(ema_path, weights_only=True)
        self.assertTrue(all(torch.equal(state[f"autoencoder.{k}"], v) for k, v in best_ae.items()))
        self.assertTrue(all(torch.equal(state[f"unet.{k}"], v) for k, v in ema_unet.items()))
        with torch.no_grad():
            out = AnomalyPipeline(pipeline.autoencoder, pipeline.unet, noise_level=5)(torch.rand(1, 4, 32, 32))
        self.assertEqual(out.shape, (1, 1, 32, 32))

    def test_grid_comes_from_the_prepared_data(self):
        data = os.path.join(self.tmp, "prepared_2mm")
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_brats(os.path.join(self.tmp, "src"), data, val_fraction=0.25, spatial_size=32, pixdim=2.0)
        wf = _workflow(DIFF_CONFIG, os.path.join(self.tmp, "grid"), data, spatial_size="auto")
        self.assertEqual(wf.parser.get_parsed_content("spatial_size_2d"), [32, 32])
        self.assertEqual(wf.parser.get_parsed_content("pixdim"), 2.0)
        export = [h for h in wf.parser.get_parsed_content("train#handlers") if type(h).__name__ == "ExportPipeline"]
        self.assertEqual(export[0].description_args["pixdim"], 2.0)  # -> models/model.json
        wf = _workflow(AE_CONFIG, os.path.join(self.tmp, "grid"), data, spatial_size=64)
        with self.assertRaises(Exception) as ctx:
            wf.parser.get_parsed_content("spatial_size_2d")
        err = ctx.exception
        while err.__cause__ is not None:
            err = err.__cause__
        self.assertRegex(str(err), r"prepared at \[32, 32\]")

    def test_resume_continues_iteration_and_weights(self):
        tmp = os.path.join(self.tmp, "resume")
        wf = _workflow(AE_CONFIG, tmp, self.data, max_epochs=2, ckpt_interval=2)
        trainer = wf.parser.get_parsed_content("train#trainer")

        def crash(engine):
            raise KeyboardInterrupt("simulated stop")

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), crash)
        with self.assertRaises(KeyboardInterrupt):
            wf.run()
        ckpt_dir = os.path.join(tmp, "models", "stages", "autoencoder")
        ckpt = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)
        stopped = int(ckpt["trainer"]["iteration"])
        self.assertEqual(stopped, 3)  # checkpoint_final.pt, written when the run stopped mid-epoch

        wf = _workflow(AE_CONFIG, tmp, self.data, max_epochs=2, ckpt_interval=2, resume=True)
        trainer = wf.parser.get_parsed_content("train#trainer")
        network, ema = wf.parser.get_parsed_content("network_def"), wf.parser.get_parsed_content("ema")
        seen = {}

        def first_iteration(engine):
            seen["iteration"] = engine.state.iteration
            seen["model"] = all(torch.equal(v, ckpt["model"][k]) for k, v in network.state_dict().items())
            seen["ema"] = all(torch.equal(v, ckpt["ema"][k]) for k, v in ema.ema_model.state_dict().items())

        trainer.add_event_handler(Events.ITERATION_STARTED(once=stopped + 1), first_iteration)
        wf.run()
        wf.finalize()
        self.assertEqual(seen, {"iteration": stopped + 1, "model": True, "ema": True})
        self.assertEqual((trainer.state.iteration, trainer.state.epoch), (4, 2))

    def test_adversarial_stage1(self):
        g_loss, d_loss = DelayedAdversarialLoss(False, 0.5, start_iteration=2), DelayedAdversarialLoss(True, 1.0, 2)
        fake, real = torch.randn(2, 1, 4, 4, requires_grad=True), torch.randn(2, 1, 4, 4)
        g_loss.iteration = d_loss.iteration = 1
        self.assertEqual((g_loss([fake]).item(), d_loss([real], [fake]).item()), (0.0, 0.0))
        d_loss([real], [fake]).backward()  # zero but differentiable before the start
        g_loss.iteration = d_loss.iteration = 2
        self.assertGreater(g_loss([fake]).item(), 0.0)
        self.assertGreater(d_loss(real, fake).item(), 0.0)

        tmp = os.path.join(self.tmp, "adversarial")
        wf = _workflow(AE_CONFIG, tmp, self.data, adversarial=True, adv_start_iteration=2)
        self.assertEqual(wf.check_properties(), [])
        trainer = wf.parser.get_parsed_content("train#trainer")
        wf.run()
        wf.finalize()
        self.assertEqual(type(trainer).__name__, "AdversarialTrainer")
        losses = training_loss_output(trainer.state.output)
        self.assertGreater(losses["train_discriminator_loss"], 0.0)  # active at iteration 2
        ckpt_path = os.path.join(tmp, "models", "stages", "autoencoder", "checkpoint_final.pt")
        ckpt = torch.load(ckpt_path, weights_only=True)
        self.assertEqual(int(ckpt["trainer"]["iteration"]), 2)
        self.assertIn("discriminator", ckpt)

    def test_ddp_two_processes_gloo(self):
        tmp = os.path.join(self.tmp, "ddp")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        common = [
            "--bundle_root", os.path.abspath(BUNDLE), "--dataset_dir", self.data, "--models_dir",
            os.path.join(tmp, "models"), "--output_dir", os.path.join(tmp, "logs"), "--preset", "tiny",
            "--spatial_size", "32", "--batch_size", "4", "--num_workers", "0", "--max_epochs", "1", "--log_interval", "1",
        ]
        for configs in ([AE_CONFIG, MULTI_GPU_CONFIG], [*DIFF_CONFIG, MULTI_GPU_CONFIG]):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "monai.bundle", "run", "training", "--config_file", repr(configs), *common]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
            self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
            log = proc.stdout + proc.stderr
            # 13 slices over 2 ranks with batch 4: 2 iterations per rank, logged by rank 0 only
            self.assertEqual(log.count("Iter: 2/2 -- train_loss"), 1, log[-3000:])
        state = torch.load(os.path.join(tmp, "models", "model.pt"), weights_only=True)
        pipeline = AnomalyPipeline(autoencoder_from_preset("tiny", in_channels=4), denoiser_from_preset("tiny"))
        pipeline.load_state_dict(state)


if __name__ == "__main__":
    unittest.main()
