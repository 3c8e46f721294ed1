# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""berdiff.scale: case plan (shards, skip_existing), head-slice inferer, timed dataset, background writes, merging."""

from __future__ import annotations

import os
import tempfile
import threading
import time
import unittest

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from monai.data import MetaTensor
from monai.inferers import SliceInferer

from berdiff.io import AtomicNibabelWriter
from berdiff.scale import (
    CASE_ERROR_KEY,
    CPU_SW_BATCH_SIZE,
    CaseDataset,
    HeadSliceInferer,
    WriteQueue,
    background_writer,
    destroy_distributed,
    merge_run_summaries,
    outputs_complete,
    plan_cases,
    summary_filename,
)
from berdiff.transforms import volume_preprocessing

POSTFIXES = ("anomaly", "anomaly_mask", "latent_flip")


def _items(n: int) -> list[dict]:
    return [{"image": f"/data/c{i}/c{i}_t1.nii.gz", "case": f"c{i}"} for i in range(n)]


def _touch(folder: str, case: str, postfixes=POSTFIXES) -> None:
    for p in postfixes:
        with open(os.path.join(folder, f"{case}_{p}.nii.gz"), "wb") as f:
            f.write(b"x")


class TestPlanCases(unittest.TestCase):
    def test_shards_disjoint_complete_without_padding(self):
        items = _items(7)
        for world in (1, 2, 3, 8):
            plans = [plan_cases(items, "/nowhere", POSTFIXES, rank=r, world_size=world) for r in range(world)]
            names = [it["case"] for p in plans for it in p.todo]
            self.assertEqual(sorted(names), sorted(it["case"] for it in items), world)  # no duplicates, none lost
            self.assertEqual([len(p.todo) for p in plans], [len(items[r::world]) for r in range(world)])
            self.assertTrue(all(p.names == [f"c{i}" for i in range(7)] for p in plans))

    def test_skip_existing_complete_only(self):
        with tempfile.TemporaryDirectory() as tmp:
            _touch(tmp, "c0")
            _touch(tmp, "c1", POSTFIXES[:2])  # partial: redone
            stale = os.path.join(tmp, ".c1_latent_flip.nii.gz.abc.tmp.nii.gz")
            open(stale, "w").close()
            self.assertTrue(outputs_complete(tmp, "c0", POSTFIXES))
            self.assertFalse(outputs_complete(tmp, "c1", POSTFIXES))
            plan = plan_cases(_items(3), tmp, POSTFIXES, skip_existing=True)
            self.assertEqual([it["case"] for it in plan.skipped], ["c0"])
            self.assertEqual([it["case"] for it in plan.todo], ["c1", "c2"])
            self.assertFalse(os.path.exists(stale))
            plan = plan_cases(_items(3), tmp, POSTFIXES, skip_existing=False)
            self.assertEqual(len(plan.todo), 3)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "same case name"):
            plan_cases(_items(2) + _items(1), "/nowhere", POSTFIXES)
        with self.assertRaisesRegex(ValueError, "rank must be in"):
            plan_cases(_items(2), "/nowhere", POSTFIXES, rank=2, world_size=2)

    def test_single_process_summary_name(self):
        self.assertEqual(summary_filename(), "run_summary.json")


class _Recorder(nn.Module):
    """Deterministic per-slice network; records the batch sizes it sees; fails above ``max_batch``."""

    def __init__(self, max_batch: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.batches: list[int] = []
        self.max_batch = max_batch

    def forward(self, x):
        if self.max_batch is not None and x.shape[0] > self.max_batch:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self.batches.append(x.shape[0])
        return self.conv(x)


class TestHeadSliceInferer(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.vol = torch.zeros(1, 2, 12, 10, 40)
        self.vol[..., 3:33] = torch.rand(1, 2, 12, 10, 30)  # 30 head slices, 10 constant ones

    def test_equals_slice_inferer_and_batches_head_slices(self):
        net = _Recorder()
        ours = HeadSliceInferer(sw_batch_size=8)(self.vol, net)
        self.assertEqual(net.batches, [8, 8, 8, 6, 8, 2])  # head slices first, then the constant ones
        with torch.no_grad():
            ref = SliceInferer(roi_size=(12, 10), sw_batch_size=8, spatial_dim=2)(self.vol, net)
        torch.testing.assert_close(ours, ref)

    def test_auto_on_cpu_and_metatensor(self):
        net = _Recorder()
        inferer = HeadSliceInferer()
        out = inferer(MetaTensor(self.vol, meta={"filename_or_obj": "x.nii.gz"}), net)
        self.assertIsInstance(out, MetaTensor)
        self.assertEqual(out.meta["filename_or_obj"], "x.nii.gz")
        self.assertEqual(max(net.batches), CPU_SW_BATCH_SIZE)
        self.assertEqual(inferer.last_stats["num_head_slices"], 30)
        self.assertEqual(inferer.last_stats["num_calls"], len(net.batches))
        self.assertGreater(inferer.last_stats["network_time_s"], 0)

    def test_auto_halves_on_out_of_memory(self):
        net = _Recorder(max_batch=5)
        inferer = HeadSliceInferer()
        out = inferer(self.vol, net)
        self.assertLessEqual(max(net.batches), 5)
        self.assertEqual(sum(net.batches), 40)
        self.assertEqual(inferer.last_stats["sw_batch_size"], 4)
        ref_net = _Recorder()
        ref_net.load_state_dict(net.state_dict())
        torch.testing.assert_close(out, HeadSliceInferer(sw_batch_size=40)(self.vol, ref_net))
        # a fixed batch size is not changed: the error propagates
        with self.assertRaises(torch.OutOfMemoryError):
            HeadSliceInferer(sw_batch_size=8)(self.vol, _Recorder(max_batch=5))

    def test_bad_arguments(self):
        for bad in ("big", 0):
            with self.assertRaisesRegex(ValueError, "sw_batch_size"):
                HeadSliceInferer(sw_batch_size=bad)
        with self.assertRaisesRegex(ValueError, "expects"):
            HeadSliceInferer()(torch.zeros(1, 2, 4, 4), _Recorder())


class TestCaseDataset(unittest.TestCase):
    def test_timing_and_error_items(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "a.nii.gz")
            vol = np.zeros((8, 8, 3, 2), np.float32)
            vol[2:6, 2:6] = 1.0 + np.random.default_rng(0).random((4, 4, 3, 2))
            nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
            transform = volume_preprocessing(num_channels=2, spatial_size=(8, 8))
            data = [{"image": path}, {"image": os.path.join(tmp, "missing.nii.gz")}]
            ds = CaseDataset(data, transform)
            item = ds[0]
            self.assertEqual(tuple(item["image"].shape), (2, 8, 8, 3))
            self.assertGreater(item["load_time_s"], 0)
            self.assertGreater(item["preprocess_time_s"], 0)
            bad = ds[1]
            self.assertEqual(bad["case"], "missing")
            self.assertEqual(bad[f"{CASE_ERROR_KEY}_type"], "ValueError")
            self.assertIn("image file not found", bad[CASE_ERROR_KEY])
            with self.assertRaises(Exception):
                CaseDataset(data, transform, catch_errors=False)[1]


class TestWriteQueue(unittest.TestCase):
    def test_background_atomic_writes_and_errors(self):
        with tempfile.TemporaryDirectory() as tmp:
            queue = WriteQueue(num_threads=1, max_pending=2)
            writer_cls = background_writer(queue)
            self.assertTrue(issubclass(writer_cls, AtomicNibabelWriter))
            self.assertIs(background_writer(None), AtomicNibabelWriter)
            names = []
            for i in range(4):
                w = writer_cls(output_dtype=np.float32)
                w.set_data_array(torch.full((1, 5, 6, 3), float(i)), channel_dim=0)
                w.set_metadata({"affine": np.eye(4), "original_affine": np.eye(4)}, resample=False)
                names.append(os.path.join(tmp, f"c{i}_anomaly.nii.gz"))
                w.write(names[-1])
            gate = threading.Event()

            def failing():
                gate.wait(5)
                raise OSError("disk full")

            queue.submit(os.path.join(tmp, "bad.nii.gz"), failing)
            self.assertEqual(queue.status([os.path.join(tmp, "bad.nii.gz")]), (False, 0.0, None))
            gate.set()
            queue.close()
            for i, name in enumerate(names):
                np.testing.assert_array_equal(nib.load(name).get_fdata(), np.full((5, 6, 3), float(i)))
            done, seconds, error = queue.status(names)
            self.assertTrue(done and seconds > 0 and error is None)
            self.assertEqual(queue.status([os.path.join(tmp, "bad.nii.gz")])[2], "OSError: disk full")
            self.assertEqual(sorted(os.listdir(tmp)), sorted(os.path.basename(n) for n in names))

    def test_inline(self):
        queue = WriteQueue(num_threads=0)
        t0 = time.perf_counter()
        queue.submit("/x/a", lambda: time.sleep(0.05))
        self.assertGreaterEqual(time.perf_counter() - t0, 0.05)  # ran in the calling thread
        self.assertTrue(queue.status(["/x/a"])[0])


class TestMergeSummaries(unittest.TestCase):
    def test_merge(self):
        def case(name, wall):
            return {"case": name, "status": "done", "wall_time_s": wall, "num_slices": 5}

        a = {"status": "completed", "started_utc": "2026-01-01T00:00:01", "finished_utc": "2026-01-01T00:00:09",
             "wall_time_s": 8.0, "num_cases": 2, "num_slices": 10, "num_done": 2, "num_skipped": 1, "num_failed": 0,
             "peak_memory_mb": 100.0, "time_split_s": {"network": 4.0, "load": 1.0},
             "cases": [case("c0", 4.0), case("c2", 4.0)], "done": ["c0", "c2"], "skipped": ["c4"], "failed": [],
             "settings": {"K": 10}}
        b = {"status": "completed", "started_utc": "2026-01-01T00:00:00", "finished_utc": "2026-01-01T00:00:05",
             "wall_time_s": 5.0, "num_cases": 2, "num_slices": 10, "num_done": 1, "num_skipped": 0, "num_failed": 1,
             "peak_memory_mb": 150.0, "time_split_s": {"network": 2.0, "load": 0.5},
             "cases": [case("c1", 5.0), {"case": "c3", "status": "failed", "wall_time_s": 0.1, "num_slices": None}],
             "done": ["c1"], "skipped": [], "failed": ["c3"], "settings": {"K": 10}}
        merged = merge_run_summaries([a, b], order=["c0", "c1", "c2", "c3", "c4"])
        self.assertEqual([c["case"] for c in merged["cases"]], ["c0", "c1", "c2", "c3"])
        self.assertEqual((merged["done"], merged["skipped"], merged["failed"]), (["c0", "c1", "c2"], ["c4"], ["c3"]))
        self.assertEqual((merged["num_done"], merged["num_failed"], merged["num_skipped"]), (3, 1, 1))
        self.assertEqual(merged["status"], "completed_with_failures")
        self.assertEqual(merged["wall_time_s"], 8.0)
        self.assertAlmostEqual(merged["cases_per_s"], 3 / 8.0, places=4)
        self.assertEqual(merged["peak_memory_mb"], 150.0)
        self.assertEqual(merged["time_split_s"], {"load": 1.5, "network": 6.0})
        self.assertEqual((merged["started_utc"], merged["finished_utc"]), (b["started_utc"], a["finished_utc"]))
        self.assertEqual(merged["num_processes"], 2)
        with self.assertRaisesRegex(ValueError, "no run summaries"):
            merge_run_summaries([])


def _destroy_worker(rank: int, store_file: str, folder: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2)
    if rank == 1:
        time.sleep(1.0)  # the slow rank: still working when rank 0 reaches the teardown
    entered = time.time()
    destroyed = destroy_distributed()
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(f"{entered} {time.time()} {destroyed} {dist.is_initialized()} {destroy_distributed()}")


class TestDestroyDistributed(unittest.TestCase):
    def test_no_group(self):
        self.assertFalse(dist.is_initialized())
        self.assertFalse(destroy_distributed())

    def test_waits_for_every_rank(self):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_destroy_worker, args=(os.path.join(tmp, "store"), tmp), nprocs=2, join=True)
            rows = []
            for rank in range(2):
                with open(os.path.join(tmp, f"rank{rank}.txt")) as f:
                    entered, left, destroyed, still, again = f.read().split()
                rows.append((float(entered), float(left)))
                self.assertEqual((destroyed, still, again), ("True", "False", "False"))
        # rank 0 came first but left only after the slow rank 1 had reached the teardown too
        self.assertGreaterEqual(rows[0][1], rows[1][0])
        self.assertGreater(rows[1][0] - rows[0][0], 0.5)


if __name__ == "__main__":
    unittest.main()
