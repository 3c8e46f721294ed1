# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest
from collections.abc import Sequence

import torch
from monai.inferers import SliceInferer

from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.schedulers import BernoulliScheduler


def tiny_pipeline(**kwargs) -> AnomalyPipeline:
    """A tiny pipeline whose denoiser output is NOT constant: MONAI's UNet zero-initialises its output convolution
    (flip probability exactly 1/2 everywhere, so the mask would always be empty and the noise would not matter);
    it is randomised here."""
    torch.manual_seed(0)
    ae = autoencoder_from_preset("tiny", in_channels=2)
    unet = denoiser_from_preset("tiny", latent_channels=4)
    torch.nn.init.normal_(unet.out[2].conv.weight, std=0.3)
    torch.nn.init.normal_(unet.out[2].conv.bias, std=0.3)
    kwargs = {"scheduler": BernoulliScheduler(num_train_timesteps=20), "noise_level": 6, **kwargs}
    return AnomalyPipeline(ae, unet, **kwargs).eval()


def volume(num_slices: int = 5, blank: Sequence[int] = ()) -> torch.Tensor:
    """(1, 2, 16, 16, D) volume of distinct random slices (axial axis last), with blank (zero) slices."""
    torch.manual_seed(1)
    vol = torch.rand(1, 2, 16, 16, num_slices)
    for i in blank:
        vol[..., i] = 0.0
    return vol


def slice_maps(pipe: AnomalyPipeline, vol: torch.Tensor, sw_batch_size: int) -> torch.Tensor:
    """The bundle's inferer (configs/inference.yaml): 2D slices of the whole in-plane size, batched."""
    inferer = SliceInferer(roi_size=vol.shape[2:4], spatial_dim=2, sw_batch_size=sw_batch_size, overlap=0.0)
    with torch.no_grad():
        return inferer(vol, pipe)


def assert_same_maps(test: unittest.TestCase, a: torch.Tensor, b: torch.Tensor, msg: str = "") -> None:
    """Equal up to the float rounding of batched convolutions (~1e-6): the random draws are the same."""
    test.assertEqual(a.shape, b.shape, msg)
    torch.testing.assert_close(a, b, rtol=0.0, atol=1e-5, msg=msg)


class TestAnomalyPipeline(unittest.TestCase):
    def test_forward_single_tensor_and_state_dict(self):
        pipe = tiny_pipeline()
        out = pipe(torch.rand(3, 2, 16, 16))
        self.assertEqual(out.shape, (3, 1, 16, 16))
        keys = set(pipe.state_dict())
        self.assertTrue(keys)
        self.assertTrue(all(k.startswith(("autoencoder.", "unet.")) for k in keys), keys)

    def test_seeded_forward_is_reproducible(self):
        pipe = tiny_pipeline(seed=3, output_keys=("anomaly_map", "latent_flip_map", "reconstruction"))
        x = torch.rand(2, 2, 16, 16)
        self.assertTrue(torch.equal(pipe(x), pipe(x)))
        mask = pipe.run(x)["mask"]
        self.assertTrue(0.0 < mask.float().mean().item() < 1.0)  # the network is not constant: masks are non-trivial
        other = tiny_pipeline(seed=4, output_keys=pipe.output_keys)
        self.assertFalse(torch.equal(pipe(x), other(x)))  # the seed matters
        self.assertFalse(torch.equal(pipe(x), tiny_pipeline(seed=None, output_keys=pipe.output_keys)(x)))

    def test_maps_do_not_depend_on_the_batch(self):
        """sw_batch_size, the slice's position and blank slices beside it do not change a slice's maps."""
        keys = ("anomaly_map", "latent_flip_map", "reconstruction")
        pipe = tiny_pipeline(output_keys=keys)
        vol = volume(5, blank=[1])
        ref = slice_maps(pipe, vol, 1)
        self.assertGreater(ref[:, 0].abs().amax().item(), 0.0)
        for sw in (2, 3, 5):
            assert_same_maps(self, slice_maps(pipe, vol, sw), ref, f"sw_batch_size {sw}")
        # slice 3 alone, at another position (first), and with skip_empty off beside the blank slice
        assert_same_maps(self, pipe(vol[..., 3]), ref[..., 3])
        moved = slice_maps(pipe, vol[..., [3, 0, 1, 2, 4]], 5)
        assert_same_maps(self, moved[..., 0], ref[..., 3])
        no_skip = tiny_pipeline(output_keys=keys, skip_empty=False)
        both = no_skip(torch.cat([vol[..., 1], vol[..., 3]]))
        assert_same_maps(self, both[1:], ref[..., 3])
        # explicit per-sample generators are still honoured
        x = torch.cat([vol[..., 0], vol[..., 2]])
        out = pipe.run(x, generator=[torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)])
        alone = pipe.run(x[1:], generator=[torch.Generator().manual_seed(8)])
        assert_same_maps(self, out["anomaly_map"][1:], alone["anomaly_map"])

    def test_output_keys(self):
        pipe = tiny_pipeline(output_keys=("anomaly_map", "latent_flip_map", "reconstruction"))
        self.assertEqual(pipe(torch.rand(1, 2, 16, 16)).shape, (1, 4, 16, 16))
        with self.assertRaises(ValueError):
            tiny_pipeline(output_keys=("nope",))

    def test_autoencoder_map_decodes_only_when_asked(self):
        x = torch.rand(3, 2, 16, 16)
        x[1] = 0.0  # an empty slice: the partial path too
        maps = {}
        for keys in (("anomaly_map",), ("anomaly_map", "autoencoder_map")):
            pipe = tiny_pipeline(output_keys=keys)
            decodes = []
            pipe.autoencoder.decoder.register_forward_hook(lambda m, i, o: decodes.append(i[0].shape[0]))
            maps[keys] = pipe(x)
            self.assertEqual(decodes, [2] * len(keys), keys)  # the input code is decoded only for the second map
            self.assertEqual("autoencoder_map" in pipe.run(x), "autoencoder_map" in keys)
        self.assertTrue(torch.equal(maps[("anomaly_map",)], maps[("anomaly_map", "autoencoder_map")][:, :1]))

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
        self.assertTrue(pipe.run(x[[0, 2]])["mask"].any())  # a non-constant network: the mask is not empty
        self.assertTrue(torch.allclose(out[[0, 2]], ref))
        self.assertEqual(pipe(torch.zeros(2, 2, 16, 16)).abs().max().item(), 0.0)

    def test_latent_weighting_with_empty_slices(self):
        keys = ("anomaly_map", "residual_map", "latent_confident_change")
        pipe = tiny_pipeline(output_keys=keys, latent_weighting="confident_change", latent_weight_floor=0.1)
        x = torch.rand(3, 2, 16, 16)
        x[1] = 0.0
        out = pipe(x)
        self.assertEqual(out.shape, (3, 3, 16, 16))
        self.assertEqual(out[1].abs().max().item(), 0.0)
        anomaly, residual, latent = out[:, 0], out[:, 1], out[:, 2]
        self.assertTrue(torch.allclose(anomaly, residual * (0.1 + latent)))
        # the residual is the paper's map: what an unweighted pipeline returns as its anomaly map
        plain = tiny_pipeline(output_keys=("anomaly_map",))(x)
        self.assertTrue(torch.allclose(plain[:, 0], residual))

    def test_input_residual_with_the_autoencoder_reference(self):
        keys = ("anomaly_map", "residual_map", "input_residual_map", "reconstruction")
        x = torch.rand(3, 2, 16, 16)
        x[1] = 0.0  # an empty slice: the partial path too
        out = tiny_pipeline(output_keys=keys, anomaly_reference="autoencoder")(x)
        self.assertEqual(out.shape, (3, 5, 16, 16))
        self.assertEqual(out[1, :3].abs().max().item(), 0.0)
        # the paper's map: the reconstruction against the input, what the input reference gives as its anomaly map
        recon = out[:, 3:]
        self.assertTrue(torch.allclose(out[:, 2], ((recon - x) ** 2).sum(1)))
        plain = tiny_pipeline(output_keys=("anomaly_map",))(x)
        self.assertTrue(torch.allclose(plain[:, 0], out[:, 2]))
        self.assertTrue(torch.equal(out[:, 0], out[:, 1]))  # no latent weighting
        self.assertFalse(torch.allclose(out[[0, 2], 1], out[[0, 2], 2]))  # against the autoencoder: another map

    def test_num_samples_averages_consecutive_draws(self):
        keys = ("anomaly_map", "latent_flip_probability", "reconstruction")
        x = torch.rand(3, 2, 16, 16)
        x[1] = 0.0  # an empty slice: the partial path too
        single = tiny_pipeline(seed=5, output_keys=keys)
        averaged = tiny_pipeline(seed=5, output_keys=keys, num_samples=3)
        draws = []
        generators = single._generator(x)
        for _ in range(3):  # the same per-sample generators, drawn from one after the other
            outputs = single.run(x, generators)
            draws.append(torch.cat([outputs[k] for k in keys], dim=1))
        self.assertFalse(torch.allclose(draws[0], draws[1]))  # the draws differ, so the mean is not one of them
        assert_same_maps(self, averaged(x), torch.stack(draws).mean(0))
        assert_same_maps(self, tiny_pipeline(seed=5, output_keys=keys, num_samples=1)(x), draws[0])
        self.assertEqual(averaged(x)[1, :2].abs().max().item(), 0.0)  # empty slices keep zero maps
        for bad in (0, -2, 1.5, True):
            with self.assertRaisesRegex(ValueError, "num_samples"):
                tiny_pipeline(num_samples=bad)

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
