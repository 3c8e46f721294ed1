# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import unittest

import torch
from monai.inferers import SliceInferer

from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler


def tiny_pipeline(**kwargs) -> AnomalyPipeline:
    torch.manual_seed(0)
    ae = autoencoder_from_preset("tiny", in_channels=2)
    unet = denoiser_from_preset("tiny", latent_channels=4)
    kwargs = {"scheduler": BernoulliScheduler(num_train_timesteps=20), "noise_level": 6, **kwargs}
    return AnomalyPipeline(ae, unet, **kwargs).eval()


class TestAnomalyPipeline(unittest.TestCase):
    def test_forward_single_tensor_and_state_dict(self):
        pipe = tiny_pipeline()
        out = pipe(torch.rand(3, 2, 16, 16))
        self.assertEqual(out.shape, (3, 1, 16, 16))
        keys = set(pipe.state_dict())
        self.assertTrue(keys)
        self.assertTrue(all(k.startswith(("autoencoder.", "unet.")) for k in keys), keys)

    def test_seeded_forward_is_reproducible(self):
        pipe = tiny_pipeline(seed=3)
        x = torch.rand(2, 2, 16, 16)
        self.assertTrue(torch.equal(pipe(x), pipe(x)))

    def test_output_keys(self):
        pipe = tiny_pipeline(output_keys=("anomaly_map", "latent_flip_map", "reconstruction"))
        self.assertEqual(pipe(torch.rand(1, 2, 16, 16)).shape, (1, 4, 16, 16))
        with self.assertRaises(ValueError):
            tiny_pipeline(output_keys=("nope",))

    def test_empty_slices_skipped(self):
        pipe = tiny_pipeline(output_keys=("anomaly_map", "reconstruction"))
        x = torch.rand(3, 2, 16, 16)
        x[1] = 0.0
        calls = []
        pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        out = pipe(x)
        self.assertTrue(all(c == 2 for c in calls))
        self.assertEqual(out[1, 0].abs().max().item(), 0.0)
        self.assertTrue(torch.equal(out[1, 1:], x[1]))
        # the other samples match a run without the empty one
        ref = pipe(x[[0, 2]])
        self.assertTrue(torch.allclose(out[[0, 2]], ref))
        self.assertEqual(pipe(torch.zeros(2, 2, 16, 16)).abs().max().item(), 0.0)

    def test_nan_input_rejected(self):
        pipe = tiny_pipeline()
        x = torch.rand(1, 2, 16, 16)
        x[0, 0, 0, 0] = float("nan")
        with self.assertRaisesRegex(ValueError, "NaN"):
            pipe(x)

    def test_slice_inferer_over_volume(self):
        pipe = tiny_pipeline()
        vol = torch.rand(1, 2, 12, 12, 3)
        out = SliceInferer(roi_size=(16, 16), spatial_dim=2, sw_batch_size=2)(vol, pipe)
        self.assertEqual(out.shape, (1, 1, 12, 12, 3))


if __name__ == "__main__":
    unittest.main()
