# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""models/model.json: the model description written by the training export and read by inference."""

from __future__ import annotations

import json
import os
import unittest

import torch
from parameterized import parameterized

from berdiff.model_description import (
    MODEL_DESCRIPTION_FORMAT,
    check_noise_level,
    description_path,
    inference_settings,
    make_model_description,
    read_model_description,
    write_model_description,
)
from berdiff.io import identify_preset, load_pipeline_weights
from berdiff.networks import AnomalyPipeline, autoencoder_from_preset, denoiser_from_preset
from berdiff.training import export_pipeline
from tests.utils import TempDirMixin


def tiny_description(**kwargs) -> dict:
    args = {"preset": "tiny", "in_channels": 4, "spatial_size": [32, 32], "latent_channels": 4,
            "num_train_timesteps": 1000, "train_max_timestep": 50, **kwargs}
    return make_model_description(**args)


class TestModelDescription(TempDirMixin, unittest.TestCase):
    def setUp(self):
        super().setUp()
        self.model = os.path.join(self.tmp, "models", "model.pt")

    def test_path_and_round_trip_layout(self):
        self.assertEqual(description_path(self.model), os.path.join(self.tmp, "models", "model.json"))
        write_model_description(self.model, tiny_description(trained_iterations=12))
        with open(description_path(self.model), encoding="utf-8") as f:
            text = f.read()
        self.assertTrue(text.endswith("}\n"))
        self.assertIn('\n    "format": "berdiff-pipeline-v1",\n', text)  # indent 4
        self.assertEqual(
            json.loads(text),
            {"format": MODEL_DESCRIPTION_FORMAT, "preset": "tiny", "in_channels": 4, "spatial_size": [32, 32],
             "pixdim": None, "latent_channels": 4, "denoiser_overrides": {}, "num_train_timesteps": 1000, "schedule": "linear_beta",
             "prediction_type": "flip", "train_max_timestep": 50, "trained_iterations": 12},
        )
        self.assertEqual(read_model_description(self.model), json.loads(text))
        self.assertEqual(sorted(os.listdir(os.path.dirname(self.model))), ["model.json"])  # no temporary file left

    def test_missing(self):
        self.assertIsNone(read_model_description(self.model))
        with self.assertRaisesRegex(FileNotFoundError, "model.json"):
            read_model_description(self.model, required=True)

    @parameterized.expand([
        ("format", "berdiff-pipeline-v0", "format"),
        ("preset", "huge", "preset"),
        ("in_channels", True, "in_channels"),
        ("in_channels", 0, "in_channels"),
        ("spatial_size", [32], "spatial_size"),
        ("spatial_size", "32", "spatial_size"),
        ("num_train_timesteps", 2.5, "num_train_timesteps"),
        ("train_max_timestep", 1001, "train_max_timestep"),
        ("prediction_type", "epsilon", "prediction_type"),
        ("denoiser_overrides", [], "denoiser_overrides"),
        ("trained_iterations", -1, "trained_iterations"),
    ])
    def test_invalid_values_named(self, key, value, expected):
        content = {**tiny_description(), key: value}
        os.makedirs(os.path.dirname(self.model))
        with open(description_path(self.model), "w") as f:
            json.dump(content, f)
        with self.assertRaisesRegex(ValueError, f"model.json: {expected}"):
            read_model_description(self.model)
        with self.assertRaisesRegex(ValueError, expected):
            write_model_description(self.model + ".other", content)

    def test_missing_key_and_bad_json(self):
        os.makedirs(os.path.dirname(self.model))
        content = tiny_description()
        del content["spatial_size"]
        with open(description_path(self.model), "w") as f:
            json.dump(content, f)
        with self.assertRaisesRegex(ValueError, r"missing key\(s\) \['spatial_size'\]"):
            read_model_description(self.model)
        with open(description_path(self.model), "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(ValueError, "cannot read it as JSON"):
            read_model_description(self.model)

    def test_check_noise_level(self):
        check_noise_level(tiny_description(), 50)
        check_noise_level(tiny_description(train_max_timestep=None), 1000)
        with self.assertRaisesRegex(ValueError, r"L = 51 is outside the trained range \[1, 50\] \(train_max_timestep = 50\)"):
            check_noise_level(tiny_description(), 51)
        with self.assertRaisesRegex(ValueError, r"\[1, 1000\] \(T = 1000\)"):
            check_noise_level(tiny_description(train_max_timestep=None), 1001)
        with self.assertRaisesRegex(ValueError, "outside"):
            check_noise_level(tiny_description(), 0)

    def test_inference_settings_fallback_and_description(self):
        fallback = inference_settings(self.model, "small", 4, 64, 500, noise_level=5, num_inference_steps=10)
        self.assertEqual(
            {k: fallback[k] for k in ("preset", "in_channels", "spatial_size", "num_train_timesteps", "description")},
            {"preset": "small", "in_channels": 4, "spatial_size": [64, 64], "num_train_timesteps": 500,
             "description": None},
        )
        self.assertEqual(fallback["num_inference_steps"], 5)  # K capped at L
        self.assertIsNone(inference_settings(self.model, "small", 4, 64)["num_inference_steps"])
        write_model_description(self.model, tiny_description(spatial_size=[48, 40]))
        settings = inference_settings(self.model, "reference", 4, [256, 256], 1000, noise_level=50, num_inference_steps=10)
        self.assertEqual((settings["preset"], settings["spatial_size"], settings["train_max_timestep"]), ("tiny", [48, 40], 50))
        self.assertEqual((settings["num_inference_steps"], settings["description"]), (10, description_path(self.model)))
        with self.assertRaisesRegex(ValueError, "outside the trained range"):
            inference_settings(self.model, "reference", 4, 256, noise_level=51)
        with self.assertRaisesRegex(ValueError, "takes 4 image channel"):
            inference_settings(self.model, "reference", 1, 256)

    def test_grid_auto_from_preset_and_from_description(self):
        # without model.json: "auto" takes the preset's grid (small: 128 px at 2 mm), explicit values stay
        small = inference_settings(self.model, "small", 4, "auto", pixdim="auto")
        self.assertEqual((small["spatial_size"], small["pixdim"]), ([128, 128], 2.0))
        reference = inference_settings(self.model, "reference", 4, "auto", pixdim="auto")
        self.assertEqual((reference["spatial_size"], reference["pixdim"]), ([256, 256], None))
        explicit = inference_settings(self.model, "small", 4, 96, pixdim=None)
        self.assertEqual((explicit["spatial_size"], explicit["pixdim"]), ([96, 96], None))
        self.assertIsNone(inference_settings(self.model, "small", 4, 96, pixdim="input")["pixdim"])
        # with model.json: the grid the model was trained on wins over the config's
        write_model_description(self.model, tiny_description(spatial_size=[64, 64], pixdim=3.0))
        settings = inference_settings(self.model, "small", 4, "auto", pixdim="auto")
        self.assertEqual((settings["spatial_size"], settings["pixdim"]), ([64, 64], 3.0))
        # a description written before pixdim existed means "the input's voxel size"
        with open(description_path(self.model), encoding="utf-8") as f:
            old = json.load(f)
        del old["pixdim"]
        with open(description_path(self.model), "w", encoding="utf-8") as f:
            json.dump(old, f)
        self.assertIsNone(inference_settings(self.model, "small", 4, "auto", pixdim="auto")["pixdim"])
        old["pixdim"] = -1
        with open(description_path(self.model), "w", encoding="utf-8") as f:
            json.dump(old, f)
        with self.assertRaisesRegex(ValueError, "pixdim must be null or a positive number"):
            read_model_description(self.model)

    def test_export_writes_description_and_weights_fit(self):
        torch.manual_seed(0)
        ae, unet = autoencoder_from_preset("tiny", in_channels=1), denoiser_from_preset("tiny")
        export_pipeline(ae, unet, self.model, preset="tiny", spatial_size=24, train_max_timestep=30, trained_iterations=7)
        description = read_model_description(self.model, required=True)
        self.assertEqual(
            (description["in_channels"], description["spatial_size"], description["latent_channels"],
             description["train_max_timestep"], description["trained_iterations"]),
            (1, [24, 24], 4, 30, 7),
        )
        state = torch.load(self.model, weights_only=True)
        self.assertEqual(identify_preset(state), ("tiny", 1))
        pipe = AnomalyPipeline(autoencoder_from_preset("tiny", in_channels=1), denoiser_from_preset("tiny"))
        load_pipeline_weights(pipe, self.model, preset="tiny", in_channels=1)
        self.assertTrue(all(torch.equal(v, state[k]) for k, v in pipe.state_dict().items()))
        # export without a preset: no description, and a stale one is removed
        export_pipeline(ae, unet, self.model)
        self.assertFalse(os.path.exists(description_path(self.model)))

    @parameterized.expand([("small", 1), ("tiny", 4)])
    def test_weights_that_do_not_fit_name_both_presets(self, preset, in_channels):
        torch.manual_seed(0)
        export_pipeline(autoencoder_from_preset("tiny", in_channels=1), denoiser_from_preset("tiny"), self.model)
        pipe = AnomalyPipeline(
            autoencoder_from_preset(preset, in_channels=in_channels), denoiser_from_preset(preset)
        )
        with self.assertRaises(ValueError) as ctx:
            load_pipeline_weights(pipe, self.model, preset=preset, in_channels=in_channels)
        message = str(ctx.exception)
        self.assertIn("model.pt was trained with preset 'tiny' with 1 image channel(s)", message)
        self.assertIn(f"the config builds preset '{preset}' with {in_channels} image channel(s)", message)
        self.assertIn("--preset tiny", message)
        self.assertIn("First difference: size mismatch", message)
        self.assertIsNone(identify_preset({"x": torch.zeros(1)}))


if __name__ == "__main__":
    unittest.main()
