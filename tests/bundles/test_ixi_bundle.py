# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""The 2D IXI T1 bundle on its own: both training stages (stage 2 layered on stage 1) on tiny synthetic heads, then its
inference config on the exported weights; and its training configs kept in step with the brain bundle's."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import unittest
from typing import Any

import nibabel as nib
import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image

from berdiff.model_description import read_model_description
from tests.utils import BUNDLE, IXI_BUNDLE, TempDirClassMixin, write_heads

IXI_CONFIGS = os.path.join(IXI_BUNDLE, "configs")
AE_CONFIG = os.path.join(IXI_CONFIGS, "train_autoencoder.yaml")
DIFF_CONFIG = [AE_CONFIG, os.path.join(IXI_CONFIGS, "train_diffusion.yaml")]

#: the only settings in which the IXI training configs may differ from the brain bundle's (data and sizes)
DATA_KEYS = {
    "train_autoencoder.yaml": (
        "imports", "dataset_dir", "datalist_file", "train_dir", "val_dir", "preset", "spatial_size", "grid",
        "spatial_size_2d", "pixdim", "num_channels",
        "batch_size", "num_workers", "max_epochs", "train#load", "train#datalist", "validate#datalist",
        "blob_augment_prob",  # whether the data's anomalies have intensities the healthy slices never show
        # the training recipe: the brain bundle's comes per preset from berdiff.training.TRAINING_RECIPES (validated
        # on real BraTS); the IXI bundle keeps the one its shipped weights were trained with
        "recipe", "base_learning_rate", "base_batch_size", "ema_momentum",
    ),
    "train_diffusion.yaml": (
        "batch_size",  # stage 2 keeps stage 1's batch size in the IXI bundle
        "recipe", "base_learning_rate", "base_batch_size", "ema_momentum", "train_max_timestep",
    ),
}


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a#b#0": value}`` for every leaf of a config."""
    if isinstance(config, dict):
        items = config.items()
    elif isinstance(config, list):
        items = enumerate(config)
    else:
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}#{key}" if prefix else str(key)))
    return out


class TestIxiConfigsInStep(unittest.TestCase):
    def test_only_data_settings_differ_from_the_brain_bundle(self):
        for name, allowed in DATA_KEYS.items():
            with self.subTest(name):
                brain = _flat(ConfigParser.load_config_file(os.path.join(BUNDLE, "configs", name)))
                ixi = _flat(ConfigParser.load_config_file(os.path.join(IXI_CONFIGS, name)))
                differ = {k for k in set(brain) | set(ixi) if brain.get(k, "<absent>") != ixi.get(k, "<absent>")}
                unexpected = sorted(k for k in differ if not any(k == a or k.startswith(a + "#") for a in allowed))
                self.assertEqual(unexpected, [], f"{name}: change both bundles' copies")
                self.assertTrue(differ)

    def test_configs_have_no_path_to_another_bundle(self):
        for path in glob.glob(os.path.join(IXI_BUNDLE, "**", "*"), recursive=True):
            self.assertFalse(os.path.islink(path), path)
            if path.endswith((".yaml", ".json", ".conf")):
                with open(path, encoding="utf-8") as f:
                    self.assertNotIn("brats_mri_bernoulli_anomaly", f.read(), path)


class TestIxiTrainingAndInference(TempDirClassMixin, unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        write_heads(os.path.join(cls.tmp, "data", "train"), 6, 40, 36)
        write_heads(os.path.join(cls.tmp, "data", "val"), 2, 40, 36)

    def _train(self, config) -> ConfigWorkflow:
        wf = ConfigWorkflow(
            config_file=config, workflow_type="train", bundle_root=IXI_BUNDLE, dataset_dir=os.path.join(self.tmp, "data"),
            models_dir=os.path.join(self.tmp, "models"), output_dir=os.path.join(self.tmp, "logs"), preset="tiny",
            spatial_size=32, batch_size=4, max_epochs=1, log_interval=1, train_max_timestep=4,
        )
        wf.initialize()
        self.assertEqual(wf.check_properties(), [])
        with contextlib.redirect_stdout(io.StringIO()):
            wf.run()
        wf.finalize()
        return wf

    def test_two_stages_then_inference(self):
        wf = self._train(AE_CONFIG)
        self.assertEqual(wf.parser.get_parsed_content("train#trainer").state.iteration, 2)  # 6 images, batch 4
        stage1 = os.path.join(self.tmp, "models", "stages", "autoencoder")
        self.assertTrue(os.path.isfile(os.path.join(stage1, "autoencoder_best.pt")))
        self._train(DIFF_CONFIG)
        model = os.path.join(self.tmp, "models", "model.pt")
        description = read_model_description(model, required=True)
        self.assertEqual((description["preset"], description["in_channels"], description["spatial_size"]),
                         ("tiny", 1, [32, 32]))

        images = os.path.join(self.tmp, "images")
        os.makedirs(images)
        Image.open(os.path.join(self.tmp, "data", "val", "sub00.png")).save(os.path.join(images, "head.png"))
        out = os.path.join(self.tmp, "out")
        wf = ConfigWorkflow(
            config_file=os.path.join(IXI_CONFIGS, "inference.yaml"), workflow_type="infer", bundle_root=IXI_BUNDLE,
            ckpt_path=model, dataset_dir=images, output_dir=out, noise_level=4, num_inference_steps=2, device="cpu",
            anomaly_threshold=0.01,
        )
        wf.initialize()
        self.assertEqual(wf.check_properties(), [])
        wf.run()
        wf.finalize()
        amap = nib.load(os.path.join(out, "head_anomaly.nii.gz"))
        mask = np.asarray(nib.load(os.path.join(out, "head_anomaly_mask.nii.gz")).dataobj)
        self.assertEqual(amap.shape, (36, 40))  # MONAI's PIL convention: (W, H) of the input
        self.assertTrue(np.isfinite(amap.get_fdata()).all() and amap.get_fdata().min() >= 0)
        self.assertEqual(mask.shape, amap.shape)
        self.assertTrue(set(np.unique(mask)) <= {0, 1})


if __name__ == "__main__":
    unittest.main()
