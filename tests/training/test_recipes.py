# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

from monai.bundle import ConfigParser

from berdiff.training import TRAINING_RECIPES, training_recipe
from tests.utils import BUNDLE


class TestTrainingRecipes(unittest.TestCase):
    def test_reference_is_the_papers(self):
        ae, dm = training_recipe("reference", "autoencoder"), training_recipe("reference", "diffusion")
        self.assertEqual((ae["batch_size"], ae["learning_rate"]), (24, 1.08e-4))  # 4.5e-6 x 24
        self.assertEqual((dm["batch_size"], dm["learning_rate"], dm["ema_momentum"]), (36, 1.0e-4, 0.001))
        self.assertIsNone(dm["train_max_timestep"])

    def test_every_preset_has_both_stages_and_copies(self):
        for preset, stages in TRAINING_RECIPES.items():
            self.assertEqual(set(stages), {"autoencoder", "diffusion"}, preset)
        recipe = training_recipe("small", "autoencoder")
        recipe["batch_size"] = 999
        self.assertEqual(training_recipe("small", "autoencoder")["batch_size"], 8)
        with self.assertRaisesRegex(ValueError, "preset must be one of"):
            training_recipe("huge", "autoencoder")
        with self.assertRaisesRegex(ValueError, "stage must be one of"):
            training_recipe("small", "vae")

    def test_bundle_configs_take_the_presets_recipe(self):
        for preset in ("reference", "small"):
            for stage, files in (("autoencoder", ["train_autoencoder.yaml"]),
                                 ("diffusion", ["train_autoencoder.yaml", "train_diffusion.yaml"])):
                parser = ConfigParser()
                parser.read_config([f"{BUNDLE}/configs/{f}" for f in files])
                parser["preset"] = preset
                expected = training_recipe(preset, stage)
                for knob in ("batch_size", "max_epochs", "ema_momentum"):
                    self.assertEqual(parser.get_parsed_content(knob), expected[knob], (preset, stage, knob))
                self.assertAlmostEqual(parser.get_parsed_content("learning_rate"), expected["learning_rate"])
                # another batch size scales the learning rate by the sqrt rule
                parser["batch_size"] = 4 * expected["batch_size"]
                self.assertAlmostEqual(parser.get_parsed_content("learning_rate"), 2 * expected["learning_rate"])
                if stage == "diffusion":
                    self.assertEqual(parser.get_parsed_content("train_max_timestep"), expected["train_max_timestep"])


if __name__ == "__main__":
    unittest.main()
