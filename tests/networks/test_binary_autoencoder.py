# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch
from monai.networks.nets import DiffusionModelUNet
from parameterized import parameterized

from berdiff.networks import BinaryAutoencoder, autoencoder_from_preset, denoiser_from_preset


def tiny_ae(in_channels: int = 1, spatial_dims: int = 2) -> BinaryAutoencoder:
    return autoencoder_from_preset("tiny", in_channels=in_channels, spatial_dims=spatial_dims)


class TestBinaryAutoencoder(unittest.TestCase):
    @parameterized.expand([(1,), (4,)])
    def test_shapes_and_binary_codes(self, channels):
        ae = tiny_ae(channels)
        x = torch.rand(2, channels, 16, 16)
        for train in (True, False):
            ae.train(train)
            recon, probs, code = ae(x)
            self.assertEqual(recon.shape, x.shape)
            self.assertEqual(probs.shape, (2, 4, 8, 8))
            self.assertEqual(code.shape, probs.shape)
            self.assertTrue(torch.equal(code.detach(), code.detach().round()))
            self.assertTrue(((probs >= 0) & (probs <= 1)).all())
        ae.eval()
        stage2 = ae.encode_stage_2_inputs(x)
        self.assertTrue(torch.equal(stage2, (ae.encode(x) > 0.5).float()))
        self.assertEqual(ae.decode_stage_2_outputs(stage2).shape, x.shape)

    def test_stage_2_code_ignores_autocast(self):
        """The code under bf16 autocast (inference) equals the float32 code (training's cached codes)."""
        torch.manual_seed(0)
        ae = tiny_ae(1).eval()
        x = torch.rand(4, 1, 64, 64)
        reference = ae.encode_stage_2_inputs(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            naive = (ae.encode(x) > 0.5).float()  # what the encoder gives under autocast
            code = ae.encode_stage_2_inputs(x)
        self.assertGreater((naive != reference).float().mean().item(), 0.0)  # bf16 would change some bits here
        self.assertTrue(torch.equal(code, reference))
        self.assertEqual(code.dtype, torch.float32)

    def test_3d(self):
        ae = tiny_ae(1, spatial_dims=3)
        recon, probs, _ = ae(torch.rand(1, 1, 8, 8, 8))
        self.assertEqual(recon.shape, (1, 1, 8, 8, 8))
        self.assertEqual(probs.shape, (1, 4, 4, 4, 4))

    def test_straight_through_gradient_reaches_encoder(self):
        ae = tiny_ae(1).train()
        recon, _, _ = ae(torch.rand(2, 1, 16, 16))
        recon.abs().mean().backward()
        enc_grads = [p.grad for p in ae.encoder.parameters() if p.grad is not None]
        self.assertTrue(enc_grads)
        self.assertGreater(sum(g.abs().sum().item() for g in enc_grads), 0.0)
        self.assertIsNotNone(ae.to_logits.conv.weight.grad)

    def test_soft_codes_decode(self):
        ae = tiny_ae(1).eval()
        soft = torch.rand(2, 4, 8, 8)
        out = ae.decode(soft)
        self.assertEqual(out.shape, (2, 1, 16, 16))
        self.assertTrue(torch.isfinite(out).all())

    def test_eval_code_deterministic_train_code_stochastic(self):
        ae = tiny_ae(1)
        x = torch.rand(2, 1, 16, 16)
        ae.eval()
        self.assertTrue(torch.equal(ae(x)[2], ae(x)[2]))
        ae.train()
        with torch.no_grad():
            probs = ae.encode(x)
            codes = torch.stack([ae.binarize(probs) for _ in range(200)])
        self.assertTrue(torch.allclose(codes.mean(0), probs, atol=0.15))

    def test_bad_inputs(self):
        ae = tiny_ae(4)
        with self.assertRaisesRegex(ValueError, "input channels"):
            ae(torch.rand(1, 3, 16, 16))
        with self.assertRaisesRegex(ValueError, "divisible"):
            ae(torch.rand(1, 4, 15, 16))
        with self.assertRaisesRegex(ValueError, "tensor"):
            ae(torch.rand(4, 16, 16))
        with self.assertRaises(ValueError):
            BinaryAutoencoder(train_mode="gumbel")
        with self.assertRaises(ValueError):
            autoencoder_from_preset("huge")


class TestPresets(unittest.TestCase):
    def test_reference_autoencoder_parameter_count(self):
        with torch.device("meta"):
            ae = autoencoder_from_preset("reference", in_channels=4)
        # method.md: the reference architecture rebuilt from MONAI blocks has 4,103,716 parameters
        self.assertEqual(sum(p.numel() for p in ae.parameters()), 4_103_716)
        self.assertEqual(ae.downsample_factor, 8)
        self.assertEqual(ae.latent_channels, 128)

    def test_reference_denoiser_parameter_count(self):
        with torch.device("meta"):
            unet = denoiser_from_preset("reference")
        self.assertIsInstance(unet, DiffusionModelUNet)
        self.assertEqual(sum(p.numel() for p in unet.parameters()), 36_034_432)

    def test_small_presets_fit_together(self):
        ae = autoencoder_from_preset("small", in_channels=4).eval()
        unet = denoiser_from_preset("small").eval()
        with torch.no_grad():
            code = ae.encode_stage_2_inputs(torch.rand(1, 4, 32, 32))
            out = unet(code, timesteps=torch.tensor([3]))
        self.assertEqual(out.shape, code.shape)
        # zero-initialised output convolution: logits 0, flip probability 1/2 at initialisation
        self.assertEqual(out.abs().max().item(), 0.0)


if __name__ == "__main__":
    unittest.main()
