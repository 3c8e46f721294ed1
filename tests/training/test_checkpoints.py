# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.training.checkpoints and .datalist: stage weights in and out, resuming, the training datalists."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import unittest

import torch

from berdiff.io import MissingData
from berdiff.networks import autoencoder_from_preset
from berdiff.training import latest_checkpoint, load_weights, training_datalist
from berdiff.utils import atomic_save_torch


class _TempDirCase(unittest.TestCase):
    """A fresh temporary folder ``self.tmp`` per test (to become ``tests.utils.TempDirMixin``)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()

    def tearDown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class TestStageWeights(_TempDirCase):
    def test_load_weights_first_existing_candidate(self):
        torch.manual_seed(0)
        source = autoencoder_from_preset("tiny", in_channels=1)
        path = atomic_save_torch(source.state_dict(), os.path.join(self.tmp, "autoencoder.pt"))
        target = autoencoder_from_preset("tiny", in_channels=1)
        out = load_weights(target, [os.path.join(self.tmp, "missing.pt"), path])
        self.assertIs(out, target)
        for k, v in source.state_dict().items():
            self.assertTrue(torch.equal(v, target.state_dict()[k]), k)

    def test_missing_and_wrong_weights(self):
        net = autoencoder_from_preset("tiny", in_channels=1)
        missing = os.path.join(self.tmp, "missing.pt")
        with self.assertRaisesRegex(FileNotFoundError, "train the earlier stage first"):
            load_weights(net, missing)
        before = {k: v.clone() for k, v in net.state_dict().items()}
        self.assertIs(load_weights(net, missing, missing_ok=True), net)
        self.assertTrue(all(torch.equal(before[k], v) for k, v in net.state_dict().items()))
        other = os.path.join(self.tmp, "x.pt")
        atomic_save_torch(autoencoder_from_preset("tiny", in_channels=4).state_dict(), other)
        with self.assertRaisesRegex(ValueError, "does not fit"):
            load_weights(net, other)

    def test_latest_checkpoint(self):
        with self.assertRaisesRegex(FileNotFoundError, "checkpoint"):
            latest_checkpoint(self.tmp)
        old = os.path.join(self.tmp, "checkpoint_1.pt")
        new = os.path.join(self.tmp, "checkpoint_2.pt")
        for i, path in enumerate((old, new)):
            atomic_save_torch({"i": torch.tensor(i)}, path)
            os.utime(path, (time.time() + i, time.time() + i))
        self.assertEqual(latest_checkpoint(self.tmp), new)


class TestTrainingDatalist(_TempDirCase):
    def test_json_sections(self):
        path = os.path.join(self.tmp, "datalist.json")
        with open(path, "w") as f:
            json.dump({"training": [{"image": "a.npy"}], "validation": []}, f)
        items = training_datalist(path)
        self.assertEqual(items, [{"image": os.path.join(self.tmp, "a.npy")}])
        self.assertEqual(training_datalist(path, key="validation"), [])
        self.assertEqual(training_datalist(path, key="training_diseased"), [])

    def test_missing_source_is_deferred(self):
        missing = os.path.join(self.tmp, "nothing.json")
        items = training_datalist(missing)
        self.assertIsInstance(items, MissingData)
        self.assertEqual(len(items), 0)
        self.assertIsInstance(items.error, FileNotFoundError)
        with self.assertRaises(FileNotFoundError):
            training_datalist(missing, defer_missing=False)

    def test_bad_json(self):
        path = os.path.join(self.tmp, "datalist.json")
        with open(path, "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(ValueError, "cannot read datalist"):
            training_datalist(path)


if __name__ == "__main__":
    unittest.main()
