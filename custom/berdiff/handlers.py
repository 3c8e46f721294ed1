# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""Ignite handlers and run steps of the bundles: run summary, timing and memory, progress, preflight checks, errors."""

from __future__ import annotations

import datetime
import logging
import os
import platform
import resource
import sys
import time
from collections.abc import Generator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import monai
import torch
from monai.utils import StrEnum

from berdiff.io import (
    MissingData,
    atomic_write_json,
    case_name,
    check_checkpoint,
    check_unique_outputs,
    inference_datalist,
)
from berdiff.scale import CaseStatus
from berdiff.transforms import root_cause
from berdiff.validation import check_settings, exit_on_error

__all__ = [
    "OnError",
    "RunSummaryHandler",
    "TrainingProgress",
    "format_duration",
    "peak_memory_mb",
    "inference_mode",
    "preflight",
    "training_preflight",
    "run_evaluator",
    "report_failures",
    "RUN_SUMMARY_FIELDS",
    "CASE_FIELDS",
]

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


class OnError(StrEnum):
    """
    What happens when a case fails: ``exit`` stops the run and exits with ``error: <root cause>`` (status 1, no
    stack trace), ``raise`` stops it and raises the root cause (Python API), ``continue`` records the failed case in
    ``run_summary.json``, runs the others and exits with status 1 at the end (:func:`report_failures`).
    """

    RAISE = "raise"
    EXIT = "exit"
    CONTINUE = "continue"


def _is_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def peak_memory_mb(device: torch.device | str) -> tuple[str, float]:
    """
    Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a CUDA device (since the last reset), otherwise the
    process's peak resident set size (``resource.getrusage``, the peak over the process lifetime).

    Args:
        device: the inference device.

    Returns:
        ``(kind, MiB)`` with kind ``"cuda_max_allocated"`` or ``"process_max_rss"``.
    """
    if _is_cuda(device):
        return "cuda_max_allocated", torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return "process_max_rss", rss / (2**20 if sys.platform == "darwin" else 2**10)


def _to_builtin(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_builtin(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_builtin(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


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
        self.settings = _to_builtin(dict(settings or {}))
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
        if _is_cuda(device):
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
            "device_name": torch.cuda.get_device_name(device) if _is_cuda(device) else platform.processor() or "cpu",
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
        if _is_cuda(self._device_obj):
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
        value = _to_builtin(value)
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
            image=_to_builtin(self._source(failure.get("image"))),
            wall_time_s=round(now - self._t_get, 4),
            outputs=[],
        )
        return case

    def iteration_completed(self, engine: Any) -> None:
        if _is_cuda(self._device_obj):
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
            "image": _to_builtin(source),
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


def format_duration(seconds: float | None) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour); ``?`` when unknown."""
    if seconds is None or not seconds == seconds or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _loss_values(output: Any) -> dict[str, float]:
    """The loss(es) of a trainer iteration output (``decollate`` off: a dict; on: a list of dicts)."""
    from berdiff.training import training_loss_output

    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if not isinstance(output, Mapping):
        return {}
    try:
        value = training_loss_output(output)
    except (KeyError, TypeError, ValueError):
        return {}
    return dict(value) if isinstance(value, Mapping) else {"loss": float(value)}


class TrainingProgress:
    """
    Training progress in the terminal (stdout, flushed): one line per epoch with the epoch's mean loss, the elapsed
    time and the estimated time left, and within long epochs one line at least every ``interval_s`` seconds, so that a
    slow run can be told from a hung one. The estimate extrapolates the iterations done in this run (a resumed run
    counts from where it resumed). Attach it as a trainer handler (``train_handlers``) on the main process only.

    Args:
        name: the run's name at the start of every line (e.g. ``train_autoencoder``).
        interval_s: longest silence within an epoch, in seconds (one line after the iteration that exceeds it).
        stream: where the lines go (default ``sys.stdout`` at the time of printing).
        enabled: False prints nothing (e.g. ranks other than 0).
    """

    def __init__(
        self, name: str = "training", interval_s: float = 20.0, stream: Any = None, enabled: bool = True
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}.")
        self.name = name
        self.interval_s = float(interval_s)
        self.stream = stream
        self.enabled = enabled
        self._t0 = self._t_line = 0.0
        self._start_iteration = 0
        self._sums: dict[str, float] = {}
        self._count = 0

    def attach(self, engine: Any) -> None:
        """Registers the event handlers on an ignite engine."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _print(self, text: str) -> None:
        if self.enabled:
            print(f"{self.name}: {text}", file=self.stream or sys.stdout, flush=True)
        self._t_line = time.perf_counter()

    def _timing(self, engine: Any) -> str:
        state = engine.state
        elapsed = time.perf_counter() - self._t0
        done = state.iteration - self._start_iteration
        total = (state.max_epochs or 0) * (state.epoch_length or 0)
        eta = elapsed / done * max(total - state.iteration, 0) if done > 0 and total else None
        return f"elapsed {format_duration(elapsed)}, eta {format_duration(eta)}"

    def _losses(self) -> str:
        if not self._count:
            return ""
        return ", ".join(f"{k} {v / self._count:.4f}" for k, v in self._sums.items()) + ", "

    def started(self, engine: Any) -> None:
        self._t0 = time.perf_counter()
        self._start_iteration = engine.state.iteration
        state = engine.state
        self._print(
            f"starting at epoch {state.epoch + 1}/{state.max_epochs} ({state.epoch_length} iterations per epoch)"
        )

    def epoch_started(self, engine: Any) -> None:
        self._sums, self._count = {}, 0

    def iteration_completed(self, engine: Any) -> None:
        for k, v in _loss_values(engine.state.output).items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._count += 1
        if time.perf_counter() - self._t_line >= self.interval_s:
            state = engine.state
            within = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
            self._print(
                f"epoch {state.epoch}/{state.max_epochs}, iteration {within}/{state.epoch_length}, "
                f"{self._losses()}{self._timing(engine)}"
            )

    def epoch_completed(self, engine: Any) -> None:
        state = engine.state
        self._print(f"epoch {state.epoch}/{state.max_epochs}, {self._losses()}{self._timing(engine)}")

    def completed(self, engine: Any) -> None:
        self._print(f"done in {format_duration(time.perf_counter() - self._t0)}")


@contextmanager
def inference_mode(*nets: torch.nn.Module) -> Generator[list, None, None]:
    """
    Like ``monai.networks.utils.eval_mode`` (networks in eval mode, restored afterwards) but under
    ``torch.inference_mode`` instead of ``torch.no_grad``; usable as an engine's ``mode``.

    Args:
        nets: networks to put in eval mode.
    """
    training = [n for n in nets if getattr(n, "training", False)]
    try:
        with torch.inference_mode():
            yield [n.eval() if hasattr(n, "eval") else n for n in nets]
    finally:
        for n in training:
            n.train()


def _fail(error: BaseException, on_error: str) -> None:
    """Reports ``error``'s root cause: ``exit`` without a stack trace (:func:`berdiff.validation.exit_on_error`), or
    ``raise``."""
    cause = root_cause(error)
    if on_error in (OnError.EXIT, OnError.CONTINUE):
        logger.debug(f"run failed: {type(cause).__name__}: {cause}")
        exit_on_error(error)
    if cause is error:
        raise error
    raise cause from None


def _check_on_error(on_error: str) -> None:
    if on_error not in OnError.__members__.values():
        raise ValueError(f"on_error must be one of {list(OnError.__members__.values())}, got {on_error!r}.")


def preflight(
    image: Any = None,
    datalist: Any = None,
    dataset_dir: Any = None,
    modalities: Sequence[str] = ("t1", "t1ce", "t2", "flair"),
    datalist_key: str | None = None,
    ckpt_path: str | None = None,
    allow_random_weights: bool = False,
    on_error: str = OnError.EXIT,
    settings: Mapping[str, Any] | None = None,
    threshold_file: str | None = None,
) -> int:
    """
    Checks the settings (:func:`berdiff.validation.check_settings`), the inputs
    (:func:`berdiff.io.inference_datalist`; no two cases with the same output names), the calibration file and the
    model weights (present, and a state dict of the preset of ``models/model.json``, else the configured one; L
    within the trained range) before the workflow builds its components, so
    that a bad knob, input folder or datalist gives one clear error line instead of a configuration stack trace.
    Arguments as in ``configs/inference.yaml``; ``settings``: knob name -> value (the config's ``checked_settings``).

    Returns:
        the number of cases.
    """
    _check_on_error(on_error)
    try:
        settings = check_settings(settings or {})
        cases = inference_datalist(image, datalist, dataset_dir, modalities, datalist_key)
        check_unique_outputs(cases)
        if threshold_file:
            from berdiff.evaluation import load_threshold

            load_threshold(threshold_file)
        if ckpt_path is not None:
            preset, in_channels = settings.get("preset"), len(modalities)
            if "noise_level" in settings:  # models/model.json decides the sizes and the trained range of L
                from berdiff.model_description import inference_settings

                model = inference_settings(
                    ckpt_path, preset, in_channels, settings.get("spatial_size"),
                    settings.get("num_train_timesteps", 1000), settings["noise_level"],
                    settings.get("num_inference_steps"),
                )
                preset, in_channels = model["preset"], model["in_channels"]
            check_checkpoint(ckpt_path, allow_random_weights, preset, in_channels)
    except Exception as e:
        _fail(e, on_error)
    return len(cases)


def training_preflight(
    settings: Mapping[str, Any] | None = None,
    datalist: Sequence[Any] | None = None,
    weights: str | Sequence[str] | None = None,
    on_error: str = OnError.EXIT,
) -> int:
    """
    The first step of a training config's ``run``: checks the settings (:func:`berdiff.validation.check_settings`),
    that the training data are there (a :class:`berdiff.io.MissingData` list reports its error) and not empty,
    and that the weights of the earlier stage exist, before anything is built or written.

    Args:
        settings: knob name -> value.
        datalist: the training datalist (``@train#datalist``).
        weights: the earlier stage's checkpoint (or candidate files, the first existing one is used); None: none.
        on_error: an :class:`OnError`.

    Returns:
        the number of training items.
    """
    _check_on_error(on_error)
    try:
        check_settings(settings or {})
        if isinstance(datalist, MissingData):
            raise datalist.error
        if datalist is not None and len(datalist) == 0:
            raise ValueError("the training datalist holds no items: nothing to train on.")
        if weights is not None:
            candidates = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
            if not any(os.path.isfile(p) for p in candidates):
                raise FileNotFoundError(
                    f"checkpoint not found: {', '.join(map(str, candidates))} (train the earlier stage first)."
                )
    except Exception as e:
        _fail(e, on_error)
    return len(datalist or [])


def run_evaluator(
    evaluator: Any,
    ckpt_path: str | None = None,
    allow_random_weights: bool = False,
    on_error: str = OnError.EXIT,
    use_inference_mode: bool = True,
) -> Any:
    """
    Runs an evaluator (the bundle's ``run`` step): checks the model weights first (:func:`berdiff.io.
    check_checkpoint`), and on failure reports the root cause of the error (the clear ``ValueError`` of an input check
    rather than MONAI's ``RuntimeError("applying transform ...")`` wrapper).

    Args:
        evaluator: the ``SupervisedEvaluator``.
        ckpt_path: the model weights; None skips the check.
        allow_random_weights: allow a missing ``ckpt_path`` (tests, debugging).
        on_error: an :class:`OnError`: ``exit`` prints ``error: <root cause>`` and exits with status 1 without a
            stack trace (command line), ``raise`` raises the root cause (Python API).
        use_inference_mode: run the network under :func:`inference_mode` (``torch.inference_mode``) instead of
            the evaluator's default ``no_grad`` context.

    Returns:
        the evaluator's state.
    """
    _check_on_error(on_error)
    if use_inference_mode:
        evaluator.mode = inference_mode
    try:
        if ckpt_path is not None and not check_checkpoint(ckpt_path, allow_random_weights):
            logger.warning(f"model weights {ckpt_path} not found: running with RANDOM weights (allow_random_weights).")
        evaluator.run()
    except Exception as e:
        _fail(e, on_error)
    return evaluator.state


def report_failures(evaluator: Any, on_error: str = OnError.EXIT) -> int:
    """
    The last step of a run with ``on_error=continue``: when some cases failed (recorded in ``run_summary.json``
    by :class:`RunSummaryHandler`), prints ``error: N case(s) failed: ...`` and exits with status 1 (``raise``:
    raises a ``RuntimeError``); the other cases' outputs are complete. A no-op when no case failed.

    Args:
        evaluator: the evaluator that ran (its ``state.run_summary``).
        on_error: an :class:`OnError`.

    Returns:
        the number of failed cases (0).
    """
    summary = getattr(getattr(evaluator, "state", None), "run_summary", None) or {}
    failed = list(summary.get("failed") or [])
    if not failed:
        return 0
    shown = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    error = RuntimeError(
        f"{len(failed)} of {summary.get('num_cases')} case(s) failed: {shown} (errors in run_summary.json; the "
        "other cases are complete)"
    )
    _fail(error, OnError.RAISE if on_error == OnError.RAISE else OnError.EXIT)
    return len(failed)
