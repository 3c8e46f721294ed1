# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import unittest

import torch
from monai.data import DataLoader, Dataset

from berdiff.data.tensor_loader import TensorLoader, device_loader, stack_dataset


class TestTensorLoader(unittest.TestCase):
    def test_epoch_covers_every_sample_once(self):
        x = torch.arange(10).float()[:, None]
        loader = TensorLoader({"image": x}, batch_size=3, drop_last=False, seed=1)
        self.assertEqual(len(loader), 4)
        seen = torch.cat([b["image"][:, 0] for b in loader])
        self.assertEqual(sorted(seen.tolist()), list(range(10)))
        second = torch.cat([b["image"][:, 0] for b in loader])
        self.assertFalse(torch.equal(seen, second))  # a new permutation each epoch
        again = TensorLoader({"image": x}, batch_size=3, drop_last=False, seed=1)
        self.assertTrue(torch.equal(torch.cat([b["image"][:, 0] for b in again]), seen))  # seeded

    def test_drop_last_and_aliases_and_dtype(self):
        x = torch.randint(0, 2, (7, 2, 4, 4), dtype=torch.uint8)
        loader = TensorLoader({"image": x}, batch_size=3, aliases={"label": "image"}, dtype=torch.float32)
        batches = list(loader)
        self.assertEqual(len(batches), 2)
        for b in batches:
            self.assertEqual(b["image"].dtype, torch.float32)
            self.assertIs(b["label"], b["image"])
            self.assertEqual(tuple(b["image"].shape), (3, 2, 4, 4))

    def test_ranks_are_disjoint(self):
        x = torch.arange(11).float()
        parts = [torch.cat([b["image"] for b in TensorLoader({"image": x}, 2, seed=3, rank=r, world_size=2)])
                 for r in range(2)]
        self.assertEqual(len(parts[0]), len(parts[1]))
        self.assertEqual(set(parts[0].tolist()) & set(parts[1].tolist()), set())

    def test_ranks_padded_without_drop_last(self):
        x = torch.arange(5).float()
        parts = [[b["image"] for b in TensorLoader({"image": x}, 1, drop_last=False, seed=0, rank=r, world_size=3)]
                 for r in range(3)]
        self.assertEqual([len(p) for p in parts], [2, 2, 2])  # 5 samples padded to 6: 2 batches of 1 per rank
        seen = torch.cat([torch.cat(p) for p in parts])
        self.assertEqual(len(seen), 6)
        self.assertEqual(set(seen.tolist()), set(range(5)))

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "same number"):
            TensorLoader({"a": torch.zeros(3), "b": torch.zeros(4)}, 1)
        with self.assertRaisesRegex(ValueError, "no batch"):
            TensorLoader({"a": torch.zeros(3)}, 4)
        with self.assertRaisesRegex(ValueError, "aliases"):
            TensorLoader({"a": torch.zeros(3)}, 1, aliases={"label": "image"})

    def test_device_loader_placement(self):
        ds = Dataset([{"image": torch.full((1, 2, 2), float(i))} for i in range(6)])
        self.assertIsInstance(device_loader(ds, 2, placement="device"), TensorLoader)
        self.assertIsInstance(device_loader(ds, 2, placement="loader"), DataLoader)
        self.assertIsInstance(device_loader(ds, 2, placement="auto"), TensorLoader)  # 96 bytes fit
        with self.assertRaises(ValueError):
            device_loader(ds, 2, placement="gpu")
        self.assertEqual(len(device_loader(Dataset([]), 2)), 0)  # no data: an empty loader, the run reports it

    def test_stack_dataset_errors(self):
        with self.assertRaisesRegex(ValueError, "different shapes"):
            stack_dataset([{"image": torch.zeros(2)}, {"image": torch.zeros(3)}], ["image"])
        with self.assertRaisesRegex(ValueError, "empty"):
            stack_dataset([], ["image"])


if __name__ == "__main__":
    unittest.main()
