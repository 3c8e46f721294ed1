# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
``run_summary.json``: the per-case status, timing split and memory of an inference run, written atomically after
every case (:class:`RunSummaryHandler`), and the peak-memory probe it uses.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from typing import Any

import monai
import torch

from berdiff.handlers.memory import peak_memory_mb, uses_cuda
from berdiff.scale.cases import CaseStatus
from berdiff.utils import atomic_write_json, case_name, to_json_safe
from berdiff.validation.errors import root_cause

__all__ = ["RUN_SUMMARY_FIELDS", "CASE_FIELDS", "RunSummaryHandler"]

logger = logging.getLogger(__name__)

#: top-level fields of ``run_summary.json``
RUN_SUMMARY_FIELDS = (
    "status",
    "error",
    "started_utc",
    "finished_utc",
    "wall_time_s",
    "num_cases",
    "num_slices",
    "slices_per_s",
    "cases_per_s",
    "num_done",
    "num_skipped",
    "num_failed",
    "time_split_s",
    "device",
    "device_name",
    "memory_kind",
    "peak_memory_mb",
    "versions",
    "settings",
    "cases",
    "done",
    "skipped",
    "failed",
)


#: fields of each entry of ``run_summary.json["cases"]``
CASE_FIELDS = (
    "case",
    "status",
    "error",
    "image",
    "wall_time_s",
    "load_time_s",
    "preprocess_time_s",
    "wait_time_s",
    "network_time_s",
    "postprocess_time_s",
    "write_time_s",
    "inference_time_s",
    "num_slices",
    "num_head_slices",
    "slices_per_s",
    "peak_memory_mb",
    "outputs",
)


class RunSummaryHandler:
    """
    Writes ``<output_dir>/<filename>`` (``run_summary.json``, atomically, after every case and at the end) and shows
    a progress bar over cases (tqdm). Per case: status (``done``, ``failed`` with its error, or ``writing`` while a
    background thread still writes its files), wall time on the main thread and its split: ``load_time_s`` (reading
    the files) and ``preprocess_time_s`` (the rest of the preprocessing), both measured where they run (a data loader
    worker, see :class:`berdiff.scale.CaseDataset`), ``wait_time_s`` (the main thread waiting for the data),
    ``network_time_s`` (from the inferer's ``last_stats``, see :class:`berdiff.scale.HeadSliceInferer`),
    ``postprocess_time_s`` (mask, ``Invertd``, handing the files to the writer) and ``write_time_s`` (NIfTI
    writing, in the background with :class:`berdiff.scale.WriteQueue`); number of slices and of head (non-constant)
    slices, slices per second, peak memory, output files. Run level: status (``running``, ``completed``,
    ``completed_with_failures`` or ``failed`` with the error), totals, cases per second, the summed time split, the
    names of the cases done, skipped (``skip_existing``) and failed, device, versions and the ``settings`` given.
    Peak memory: see :func:`peak_memory_mb`.

    Attach it as an evaluator handler (``val_handlers``); one case per iteration (``batch_size=1``).

    Args:
        output_dir: folder of the summary.
        settings: run settings recorded as they are.
        filename: summary file name.
        image_key: image key in ``engine.state.batch``.
        output_postfixes: postfixes of the files written per case (``<case>_<postfix><output_ext>``), listed under
            ``outputs``.
        output_ext: extension of the output files.
        progress: show a tqdm progress bar over cases (otherwise one printed line per case: ``inference: case
            i/n ...``).
        skipped: datalist items (or case names) skipped because their outputs were complete.
        write_queue: the :class:`berdiff.scale.WriteQueue` of the ``SaveImaged`` writers, if any: a case is done
            when its files are written.
    """

    def __init__(
        self,
        output_dir: str,
        settings: Mapping[str, Any] | None = None,
        filename: str = "run_summary.json",
        image_key: str = "image",
        output_postfixes: Sequence[str] = ("anomaly", "anomaly_mask", "latent_flip"),
        output_ext: str = ".nii.gz",
        progress: bool = True,
        skipped: Sequence[Any] = (),
        write_queue: Any = None,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.path = os.path.join(self.output_dir, filename)
        self.settings = to_json_safe(dict(settings or {}))
        self.image_key = image_key
        self.output_postfixes = tuple(output_postfixes)
        self.output_ext = output_ext
        self.progress = progress
        self.skipped = [str(s.get("case")) if isinstance(s, Mapping) else str(s) for s in skipped]
        self.write_queue = write_queue
        self._bar: Any = None
        self._reset()

    def _reset(self) -> None:
        self.summary: dict[str, Any] = {}
        self._t_run = self._t_get = self._t_iter = 0.0
        self._pending: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        """Registers the event handlers on an ignite engine."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.get_batch_started)
        engine.add_event_handler(Events.ITERATION_STARTED, self.iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def started(self, engine: Any) -> None:
        self._reset()
        device = torch.device(getattr(engine.state, "device", None) or "cpu")
        if uses_cuda(device):
            torch.cuda.reset_peak_memory_stats(device)
        self._device_obj = device
        self._t_run = time.perf_counter()
        self.summary = {
            "status": "running",
            "error": None,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished_utc": None,
            "wall_time_s": 0.0,
            "num_cases": 0,
            "num_slices": 0,
            "slices_per_s": None,
            "cases_per_s": None,
            "num_done": 0,
            "num_skipped": len(self.skipped),
            "num_failed": 0,
            "time_split_s": {},
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if uses_cuda(device) else platform.processor() or "cpu",
            "memory_kind": peak_memory_mb(device)[0],
            "peak_memory_mb": None,
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__},
            "settings": self.settings,
            "cases": [],
            "done": [],
            "skipped": list(self.skipped),
            "failed": [],
        }
        engine.state.run_summary = self.summary
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self._num_cases(engine), desc="cases", unit="case", dynamic_ncols=True)
        atomic_write_json(self.summary, self.path)

    @staticmethod
    def _num_cases(engine: Any) -> int | None:
        try:
            return len(engine.data_loader)
        except TypeError:
            return None

    def get_batch_started(self, engine: Any) -> None:
        self._t_get = time.perf_counter()
        if uses_cuda(self._device_obj):
            torch.cuda.reset_peak_memory_stats(self._device_obj)

    def iteration_started(self, engine: Any) -> None:
        self._t_iter = time.perf_counter()
        stats = getattr(getattr(engine, "inferer", None), "last_stats", None)
        if isinstance(stats, dict):
            stats.clear()

    def _batch(self, engine: Any) -> Any:
        batch = engine.state.batch
        if isinstance(batch, (list, tuple)):  # decollated
            batch = batch[0]
        return batch

    def _image(self, engine: Any) -> Any:
        batch = self._batch(engine)
        return batch[self.image_key] if isinstance(batch, Mapping) else batch

    def _batch_time(self, engine: Any, key: str) -> float | None:
        batch = self._batch(engine)
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if value is None:
            return None
        value = to_json_safe(value)
        value = value[0] if isinstance(value, list) and value else value
        return round(float(value), 4) if isinstance(value, (int, float)) else None

    @staticmethod
    def _source(source: Any) -> Any:
        if isinstance(source, (list, tuple)) and source and isinstance(source[0], (list, tuple)):
            source = [s[0] if isinstance(s, (list, tuple)) and len(s) == 1 else s for s in source]
            source = source[0] if len(source) == 1 else source
        return source[0] if isinstance(source, (list, tuple)) and len(source) == 1 else source

    def _failed_case(self, engine: Any, failure: Mapping[str, Any], now: float) -> dict[str, Any]:
        name = failure.get("case") or f"case_{engine.state.iteration - 1}"
        case = dict.fromkeys(CASE_FIELDS)
        case.update(
            case=name,
            status=CaseStatus.FAILED.value,
            error=failure.get("error"),
            image=to_json_safe(self._source(failure.get("image"))),
            wall_time_s=round(now - self._t_get, 4),
            outputs=[],
        )
        return case

    def iteration_completed(self, engine: Any) -> None:
        if uses_cuda(self._device_obj):
            torch.cuda.synchronize(self._device_obj)
        now = time.perf_counter()
        failure = getattr(engine.state, "case_failure", None)
        if failure:
            case = self._failed_case(engine, failure, now)
        else:
            case = self._done_case(engine, now)
        self.summary["cases"].append(case)
        self._poll(engine, block=False)
        self._update_totals(now)
        atomic_write_json(self.summary, self.path)
        if self._bar is not None:
            self._bar.set_postfix(case=case["case"], slices_per_s=case["slices_per_s"])
            self._bar.update(1)
        else:  # one line per case instead of the bar (logs, the demo)
            total = self._num_cases(engine)
            print(
                f"inference: case {len(self.summary['cases'])}/{total if total is not None else '?'} {case['case']}: "
                f"{case['wall_time_s']:.1f} s",
                flush=True,
            )

    def _done_case(self, engine: Any, now: float) -> dict[str, Any]:
        image = self._image(engine)
        meta = getattr(image, "meta", {}) or {}
        source = self._source(meta.get("filename_or_obj", f"case_{engine.state.iteration - 1}"))
        name = case_name(source)
        img = torch.as_tensor(image).detach()
        if img.ndim == 5:  # collated (1, C, H, W, D)
            img = img[0]
        flat = img.reshape(-1, img.shape[-1]) if img.ndim >= 2 else img.reshape(1, -1)
        num_slices = int(img.shape[-1])
        num_head = int((flat.amax(dim=0) > flat.amin(dim=0)).sum())
        wall = now - self._t_get
        inference = now - self._t_iter
        stats = getattr(getattr(engine, "inferer", None), "last_stats", None) or {}
        network = stats.get("network_time_s")
        _, mem = peak_memory_mb(self._device_obj)
        outputs = [f"{name}_{p}{self.output_ext}" for p in self.output_postfixes]
        case = {
            "case": name,
            "status": CaseStatus.WRITING.value if self.write_queue is not None else CaseStatus.DONE.value,
            "error": None,
            "image": to_json_safe(source),
            "wall_time_s": round(wall, 4),
            "load_time_s": self._batch_time(engine, "load_time_s"),
            "preprocess_time_s": self._batch_time(engine, "preprocess_time_s"),
            "wait_time_s": round(self._t_iter - self._t_get, 4),
            "network_time_s": None if network is None else round(float(network), 4),
            "postprocess_time_s": None if network is None else round(inference - float(network), 4),
            "write_time_s": None,
            "inference_time_s": round(inference, 4),
            "num_slices": num_slices,
            "num_head_slices": num_head,
            "slices_per_s": round(num_slices / wall, 3) if wall > 0 else None,
            "peak_memory_mb": round(mem, 1),
            "outputs": outputs,
        }
        if self.write_queue is not None:
            self._pending.append(case)
        return case

    def _poll(self, engine: Any, block: bool) -> None:
        """Marks the cases whose background writes finished as done (or failed)."""
        if self.write_queue is None:
            return
        still = []
        for case in self._pending:
            files = [os.path.join(self.output_dir, o) for o in case["outputs"]]
            finished, seconds, error = self.write_queue.status(files, block=block)
            if not finished:
                still.append(case)
                continue
            case["write_time_s"] = round(seconds, 4)
            if error is None:
                case["status"] = CaseStatus.DONE.value
                continue
            case["status"], case["error"] = CaseStatus.FAILED.value, error
            if not getattr(engine, "continue_on_error", False):
                self._pending = []
                raise RuntimeError(f"writing the outputs of case {case['case']} failed: {error}")
        self._pending = still

    def _update_totals(self, now: float) -> None:
        cases = self.summary["cases"]
        self.summary["wall_time_s"] = round(now - self._t_run, 4)
        self.summary["num_cases"] = len(cases)
        self.summary["num_slices"] = sum(c["num_slices"] or 0 for c in cases)
        done = [c for c in cases if c["status"] == CaseStatus.DONE]
        self.summary["done"] = [c["case"] for c in done]
        self.summary["failed"] = [c["case"] for c in cases if c["status"] == CaseStatus.FAILED]
        self.summary["num_done"] = len(done)
        self.summary["num_failed"] = len(self.summary["failed"])
        total = sum(c["wall_time_s"] for c in cases if c["num_slices"])
        self.summary["slices_per_s"] = round(self.summary["num_slices"] / total, 3) if total > 0 else None
        wall = self.summary["wall_time_s"]
        self.summary["cases_per_s"] = round(len(done) / wall, 4) if wall > 0 else None
        parts = ("load", "preprocess", "wait", "network", "postprocess", "write")
        self.summary["time_split_s"] = {
            p: round(sum(c[f"{p}_time_s"] or 0.0 for c in done), 4) for p in parts
        }
        mems = [c["peak_memory_mb"] for c in cases if c["peak_memory_mb"] is not None]
        self.summary["peak_memory_mb"] = max(mems) if mems else round(peak_memory_mb(self._device_obj)[1], 1)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def completed(self, engine: Any) -> None:
        self._close()
        if self.write_queue is not None:
            self.write_queue.wait_all()
        self._poll(engine, block=True)
        self._update_totals(time.perf_counter())
        self.summary["status"] = "completed_with_failures" if self.summary["num_failed"] else "completed"
        self.summary["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_json(self.summary, self.path)
        logger.info(
            f"inference done: {self.summary['num_done']} case(s) done, {self.summary['num_skipped']} skipped, "
            f"{self.summary['num_failed']} failed; {self.summary['num_slices']} slices, "
            f"{self.summary['cases_per_s']} cases/s; summary: {self.path}"
        )

    def exception_raised(self, engine: Any, e: BaseException) -> None:
        """Records the failure (root cause) in the summary, then re-raises the root cause."""
        self._close()
        cause = root_cause(e)
        if self.write_queue is not None:  # files already handed over are completed (atomically)
            self.write_queue.wait_all()
        if self.summary:
            try:
                self._poll(engine, block=True)
            except RuntimeError:
                pass
            self._update_totals(time.perf_counter())
            self.summary["status"] = "failed"
            self.summary["error"] = f"{type(cause).__name__}: {cause}"
            self.summary["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            atomic_write_json(self.summary, self.path)
        raise cause
