# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
"""
Inference over many volumes (``configs/inference.yaml`` and ``configs/multi_gpu_inference.yaml``):

* :func:`plan_cases`: which cases this process runs: its share under torchrun (``cases[rank::world_size]``, no
  padding, no duplicates) without the cases whose outputs are all complete (``skip_existing``);
* :class:`CaseDataset`: a MONAI ``Dataset`` that times loading and preprocessing per case and, with
  ``catch_errors``, turns a case that fails to load into an error item instead of stopping the data loader;
* :class:`HeadSliceInferer`: whole-volume batches of the head (non-constant) axial slices, ``sw_batch_size="auto"``
  (all head slices at once if the device's free memory allows, halved on CUDA out-of-memory; a fixed value on CPU);
* :class:`CaseEvaluator`: a ``SupervisedEvaluator`` that records a failing case and goes on (``on_error=continue``);
* :class:`WriteQueue` / :func:`background_writer`: NIfTI files written by a background thread through
  :class:`berdiff.io.AtomicNibabelWriter` (temporary file + ``os.replace``);
* torchrun helpers: :func:`init_distributed`, :func:`local_device`, :func:`summary_filename`,
  :func:`merge_run_summaries`, :func:`finish_distributed`.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.transforms import Compose, LoadImage, LoadImaged
from monai.utils import StrEnum, convert_to_dst_type

from berdiff.io import AtomicNibabelWriter, atomic_write_json, case_name
from berdiff.transforms import root_cause

__all__ = [
    "CASE_ERROR_KEY",
    "CPU_SW_BATCH_SIZE",
    "CaseDataset",
    "CaseEvaluator",
    "CasePlan",
    "CaseStatus",
    "HeadSliceInferer",
    "WriteQueue",
    "background_writer",
    "case_outputs",
    "finish_distributed",
    "init_distributed",
    "is_out_of_memory",
    "local_device",
    "merge_run_summaries",
    "outputs_complete",
    "plan_cases",
    "rank_and_world_size",
    "summary_filename",
]

logger = logging.getLogger(__name__)

#: key of the item :class:`CaseDataset` returns for a case that failed to load (its value: the error message)
CASE_ERROR_KEY = "case_error"
#: ``sw_batch_size="auto"`` on CPU: slices per network call (larger batches barely help a CPU and cost memory)
CPU_SW_BATCH_SIZE = 16
#: ``sw_batch_size="auto"`` on CUDA: upper bound of the first try (then halved on out-of-memory)
CUDA_MAX_SW_BATCH_SIZE = 512
#: ``sw_batch_size="auto"`` on CUDA: bytes per slice pixel assumed when sizing the first try from the free memory,
#: from the issue's H200 measurement (reference preset, 155 slices of 256x256, bf16: 9.8 GB peak, ~970 B/pixel),
#: doubled without bf16 autocast
CUDA_BYTES_PER_PIXEL = 1024


class CaseStatus(StrEnum):
    """Status of a case in ``run_summary.json``."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    WRITING = "writing"  # computed, files still being written by the background thread


# ---------------------------------------------------------------------------------------------------- case plan


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised ``torch.distributed`` process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def case_outputs(output_dir: str, case: str, output_postfixes: Sequence[str], output_ext: str = ".nii.gz") -> list[str]:
    """The output files of a case: ``<output_dir>/<case>_<postfix><output_ext>``."""
    return [os.path.join(os.fspath(output_dir), f"{case}_{p}{output_ext}") for p in output_postfixes]


def outputs_complete(
    output_dir: str, case: str, output_postfixes: Sequence[str], output_ext: str = ".nii.gz"
) -> bool:
    """
    True when every output file of ``case`` exists and is not empty. Output files are written atomically (temporary
    file, then ``os.replace``), so a file under its final name is complete; a case killed mid-way misses some of
    its files and is therefore redone.
    """
    files = case_outputs(output_dir, case, output_postfixes, output_ext)
    return bool(files) and all(os.path.isfile(f) and os.path.getsize(f) > 0 for f in files)


def _remove_stale_temp_files(output_dir: str, case: str) -> None:
    """Removes the hidden temporary files (``.<case>_<postfix>...tmp...``) a killed run left for ``case``."""
    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(f".{case}_") and ".tmp" in name:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


@dataclass
class CasePlan:
    """
    The cases of one process.

    Attributes:
        todo: the datalist items to run.
        skipped: the items whose outputs were already complete (``skip_existing``).
        rank: this process's rank.
        world_size: the number of processes.
        num_total: the number of cases of the whole run (all ranks, before skipping).
        names: the case names of the whole run, in datalist order.
    """

    todo: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    num_total: int = 0
    names: list[str] = field(default_factory=list)


def plan_cases(
    items: Sequence[Mapping],
    output_dir: str,
    output_postfixes: Sequence[str],
    skip_existing: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    output_ext: str = ".nii.gz",
) -> CasePlan:
    """
    The cases this process runs. Under torchrun every rank takes ``items[rank::world_size]``: each case belongs to
    exactly one rank (no padding, nothing written twice) and is processed wholly by it. The split is made on the
    full list before skipping, so it does not depend on what other ranks have already written.

    Args:
        items: the datalist (items with ``image`` and ``case``).
        output_dir: the output folder.
        output_postfixes: postfixes of the files written per case.
        skip_existing: leave out the cases whose outputs are all complete (:func:`outputs_complete`); the hidden
            temporary files a killed run left for this process's cases are removed.
        rank: this process's rank; from ``torch.distributed`` when None.
        world_size: the number of processes; from ``torch.distributed`` when None.
        output_ext: extension of the output files.
    """
    r, w = rank_and_world_size()
    rank = r if rank is None else int(rank)
    world_size = w if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}.")
    # outputs are named after the first image file (berdiff.io.case_name_formatter)
    names = [case_name(it["image"]) for it in items]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs have the same case name (their outputs would overwrite each other): {duplicates}")
    plan = CasePlan(rank=rank, world_size=world_size, num_total=len(items), names=names)
    for item, name in list(zip(items, names))[rank::world_size]:
        if skip_existing:
            _remove_stale_temp_files(output_dir, name)
        if skip_existing and outputs_complete(output_dir, name, output_postfixes, output_ext):
            plan.skipped.append(dict(item))
        else:
            plan.todo.append(dict(item))
    if plan.skipped:
        logger.info(f"skip_existing: {len(plan.skipped)} complete case(s) skipped, {len(plan.todo)} to run.")
    return plan


# ---------------------------------------------------------------------------------------------------- data


def _load_end(transform: Any) -> int:
    """Index after the last ``LoadImage(d)`` of a ``Compose`` (0 when there is none)."""
    end = 0
    for i, t in enumerate(getattr(transform, "transforms", ())):
        if isinstance(t, (LoadImaged, LoadImage)):
            end = i + 1
    return end


class CaseDataset(Dataset):
    """
    A MONAI ``Dataset`` of whole cases that records, in every item, ``load_time_s`` (the transforms up to the last
    ``LoadImage(d)``: reading and decoding the files) and ``preprocess_time_s`` (the rest), measured in the process
    that runs it (a data loader worker). With ``catch_errors`` a case that fails (missing or corrupt file, NaN, ...)
    gives an item ``{"case", "image", CASE_ERROR_KEY: "<message>", CASE_ERROR_KEY + "_type": "<Error>"}`` instead
    of raising, so that one bad case does not stop the data loader, and so that the root cause reaches the main
    process intact (a data loader worker would re-raise MONAI's ``RuntimeError("applying transform ...")`` wrapper
    as a plain ``RuntimeError``): :class:`CaseEvaluator` re-raises it or records it and goes on.

    Args:
        data: the datalist items.
        transform: the preprocessing (a ``Compose``; another callable is timed as preprocessing only).
        catch_errors: return error items instead of raising.
    """

    def __init__(self, data: Sequence, transform: Callable | None = None, catch_errors: bool = True) -> None:
        super().__init__(data=data, transform=transform)
        self.catch_errors = bool(catch_errors)
        self._load_end = _load_end(transform)

    def _transform(self, index: int) -> Any:
        item = self.data[index]
        try:
            t0 = time.perf_counter()
            if isinstance(self.transform, Compose) and self._load_end:
                data = self.transform(item, end=self._load_end)
                t1 = time.perf_counter()
                data = self.transform(data, start=self._load_end)
            else:
                t1 = t0
                data = super()._transform(index)
            t2 = time.perf_counter()
        except Exception as e:
            if not self.catch_errors:
                raise
            cause = root_cause(e)
            image = item.get("image") if isinstance(item, Mapping) else item
            try:
                name = case_name(image)
            except Exception:
                name = f"case_{index}"
            return {"case": name, "image": image, CASE_ERROR_KEY: str(cause), f"{CASE_ERROR_KEY}_type": type(cause).__name__}
        if isinstance(data, dict):
            data["load_time_s"] = t1 - t0
            data["preprocess_time_s"] = t2 - t1
        return data


# ---------------------------------------------------------------------------------------------------- inferer


def is_out_of_memory(error: BaseException) -> bool:
    """True for a CUDA (or CPU allocator) out-of-memory error."""
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(error, oom)) or "out of memory" in str(error).lower()


class HeadSliceInferer(Inferer):
    """
    Runs a 2D network over the axial slices of a volume in whole-volume batches of the head slices: the slices that
    are not constant (everything outside the head is background) are sent through ``network`` in batches of
    ``sw_batch_size``; the constant slices go through in their own calls (``AnomalyPipeline`` gives them zero maps
    without running its networks). With ``sw_batch_size="auto"``: on CPU :data:`CPU_SW_BATCH_SIZE`; on CUDA all head
    slices of the volume at once, capped by the device's free memory (:data:`CUDA_BYTES_PER_PIXEL`) and
    :data:`CUDA_MAX_SW_BATCH_SIZE`, halved (and remembered) whenever a batch runs out of memory.

    Input ``(B, C, *spatial)``, output ``(B, C_out, *spatial)`` like ``monai.inferers.SliceInferer`` with a
    ``roi_size`` equal to the in-plane size; the output is a ``MetaTensor`` with the input's metadata when the input
    is one. :attr:`last_stats` holds the network time (synchronised on CUDA once per volume), the number of calls and
    the batch size used of the last call.

    Args:
        sw_batch_size: slices per network call, or ``"auto"``.
        spatial_dim: the slicing axis among the spatial axes (2: the axial axis of RAS volumes).
        amp: whether the caller runs under bf16 autocast (sizes the ``auto`` batch on CUDA).
    """

    def __init__(self, sw_batch_size: int | str = "auto", spatial_dim: int = 2, amp: bool = False) -> None:
        super().__init__()
        if isinstance(sw_batch_size, str):
            if sw_batch_size != "auto":
                raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {sw_batch_size!r}.")
        elif int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be a positive integer or 'auto', got {sw_batch_size}.")
        self.sw_batch_size = sw_batch_size if isinstance(sw_batch_size, str) else int(sw_batch_size)
        self.spatial_dim = int(spatial_dim)
        self.amp = bool(amp)
        self._cap: int | None = None  # "auto": batch size after the last out-of-memory error
        self.last_stats: dict[str, Any] = {}

    def batch_size_for(self, num_slices: int, slice_shape: Sequence[int], device: torch.device) -> int:
        """The batch size used for ``num_slices`` head slices of ``slice_shape`` (C, H, W) on ``device``."""
        if self.sw_batch_size != "auto":
            return max(1, min(int(self.sw_batch_size), num_slices))
        if device.type != "cuda":
            cap = CPU_SW_BATCH_SIZE
        else:
            cap = CUDA_MAX_SW_BATCH_SIZE
            if torch.cuda.is_available():
                free, _ = torch.cuda.mem_get_info(device)
                pixels = 1
                for n in slice_shape[1:]:
                    pixels *= int(n)
                per_slice = CUDA_BYTES_PER_PIXEL * pixels * (1 if self.amp else 2)
                cap = min(cap, int(0.8 * free // max(per_slice, 1)))
        if self._cap is not None:  # lowered after an out-of-memory error
            cap = min(cap, self._cap)
        return max(1, min(cap, num_slices))

    def _run_chunks(self, x: torch.Tensor, idx: torch.Tensor, network: Callable, batch: int, out: list, *args: Any, **kwargs: Any) -> int:
        """Runs ``network`` on ``x[idx]`` in chunks of ``batch`` (halved on CUDA out-of-memory with ``auto``)."""
        calls = 0
        start = 0
        while start < len(idx):
            sel = idx[start : start + batch]
            try:
                out.append((sel, network(x[sel], *args, **kwargs)))
            except Exception as e:
                if not (self.sw_batch_size == "auto" and is_out_of_memory(e) and batch > 1):
                    raise
                batch = max(1, batch // 2)
                self._cap = batch
                if x.device.type == "cuda":
                    torch.cuda.empty_cache()
                logger.warning(f"out of memory: sw_batch_size 'auto' lowered to {batch} slices per call.")
                continue
            calls += 1
            start += len(sel)
        return calls

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """
        Args:
            inputs: ``(B, C, *spatial)`` with 3 spatial axes.
            network: a 2D network ``(N, C, H, W) -> (N, C_out, H, W)``.
            args: passed to ``network``.
            kwargs: passed to ``network``.
        """
        if inputs.ndim != 5:
            raise ValueError(f"HeadSliceInferer expects (B, C, H, W, D) inputs, got shape {tuple(inputs.shape)}.")
        t0 = time.perf_counter()
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        axis = 2 + self.spatial_dim
        b, c = data.shape[:2]
        moved = data.movedim(axis, 2)  # (B, C, D, h, w)
        depth, plane = moved.shape[2], moved.shape[3:]
        x = moved.permute(0, 2, 1, 3, 4).reshape(b * depth, c, *plane)
        flat = x.reshape(x.shape[0], -1)
        head = flat.amax(dim=1) > flat.amin(dim=1)  # one host sync per volume
        head_idx = head.nonzero().flatten()
        background_idx = (~head).nonzero().flatten()
        batch = self.batch_size_for(len(head_idx), x.shape[1:], x.device)
        pieces: list = []
        calls = self._run_chunks(x, head_idx, network, batch, pieces, *args, **kwargs)
        batch = min(batch, self._cap or batch)
        calls += self._run_chunks(x, background_idx, network, max(batch, 1), pieces, *args, **kwargs)
        first = pieces[0][1]
        result = torch.empty((x.shape[0], first.shape[1], *first.shape[2:]), dtype=first.dtype, device=first.device)
        for sel, value in pieces:
            result[sel.to(result.device)] = value.to(result.dtype)
        out = result.reshape(b, depth, result.shape[1], *result.shape[2:]).permute(0, 2, 1, 3, 4).movedim(2, axis)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        self.last_stats = {
            "network_time_s": time.perf_counter() - t0,
            "num_calls": calls,
            "sw_batch_size": int(batch),
            "num_head_slices": int(len(head_idx)),
        }
        out = out.contiguous()
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out


# ---------------------------------------------------------------------------------------------------- evaluator


def _uncollate(value: Any) -> Any:
    """The item of a batch of one: ``['a']`` -> ``'a'``, ``[('a',), ('b',)]`` -> ``['a', 'b']``."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) and len(v) == 1 for v in value):
        value = [v[0] for v in value]
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    return value


class CaseEvaluator(SupervisedEvaluator):
    """
    A MONAI ``SupervisedEvaluator`` over whole cases (``batch_size=1``) that can go on after a failing case. With
    ``continue_on_error`` an error item of :class:`CaseDataset` or an exception in the network or the
    post-processing (incl. ``SaveImaged``) of a case is recorded in ``engine.state.case_failure``
    (``{"case", "image", "error"}``, read by :class:`berdiff.handlers.RunSummaryHandler`) and the next case runs;
    otherwise errors propagate as in ``SupervisedEvaluator``.

    Args:
        args: as ``SupervisedEvaluator``.
        continue_on_error: record failing cases and go on.
        kwargs: as ``SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, continue_on_error: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.continue_on_error = bool(continue_on_error)
        self.state.case_failure = None

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        """
        As ``SupervisedEvaluator.run``; with no case to run (all skipped, or a torchrun rank without cases) the
        ``STARTED`` and ``COMPLETED`` events still fire, so that the run summary is written (MONAI skips the run).
        """
        try:
            empty = len(self.data_loader) == 0
        except TypeError:
            empty = False
        if not empty:
            super().run(global_epoch)
            return
        from ignite.engine import Events

        self.state.case_failure = None
        self._fire_event(Events.STARTED)
        self._fire_event(Events.COMPLETED)

    @staticmethod
    def _failure(batchdata: Any, error: str) -> dict[str, Any]:
        """The failed case (named like its output files, see :func:`berdiff.io.case_name`), its files, the error."""
        case = image = None
        if isinstance(batchdata, Mapping):
            image = batchdata.get("image")
            meta = getattr(image, "meta", None)
            image = _uncollate(meta.get("filename_or_obj") if meta is not None else image)
            case = _uncollate(batchdata.get("case"))
        try:
            case = case_name(image) if image else case
        except (TypeError, ValueError):
            pass
        return {"case": None if case is None else str(case), "image": image, "error": error}

    def _iteration(self, engine: Any, batchdata: Any) -> dict:
        engine.state.case_failure = None
        error = batchdata.get(CASE_ERROR_KEY) if isinstance(batchdata, Mapping) else None
        if error is not None:
            error = error[0] if isinstance(error, (list, tuple)) else error
            kind = batchdata.get(f"{CASE_ERROR_KEY}_type", "RuntimeError")
            kind = kind[0] if isinstance(kind, (list, tuple)) else kind
            if not self.continue_on_error:  # the root cause, with its built-in type (ValueError, OSError, ...)
                exc_type = getattr(builtins, str(kind), None)
                if not (isinstance(exc_type, type) and issubclass(exc_type, Exception)):
                    exc_type = RuntimeError
                raise exc_type(str(error))
            error = f"{kind}: {error}"
            engine.state.case_failure = self._failure(batchdata, error)
            logger.error(f"case {engine.state.case_failure['case']} failed: {error}")
            return {}
        if not self.continue_on_error:
            return super()._iteration(engine, batchdata)
        try:
            return super()._iteration(engine, batchdata)
        except Exception as e:
            cause = root_cause(e)
            engine.state.case_failure = self._failure(batchdata, f"{type(cause).__name__}: {cause}")
            logger.error(f"case {engine.state.case_failure['case']} failed: {type(cause).__name__}: {cause}")
            return {}


# ---------------------------------------------------------------------------------------------------- writing


class WriteQueue:
    """
    Runs file writes in background threads so that the network does not wait for NIfTI compression. At most
    ``max_pending`` writes wait at a time (the caller blocks beyond that, bounding memory). With
    ``num_threads=0`` writes run at once in the caller's thread. The outcome of every file is kept by its absolute
    name (:meth:`status`).

    Args:
        num_threads: writer threads (0: write in the calling thread).
        max_pending: writes queued at most.
    """

    def __init__(self, num_threads: int = 1, max_pending: int = 16) -> None:
        self.num_threads = int(num_threads)
        self.max_pending = max(1, int(max_pending))
        self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="berdiff-write") if self.num_threads > 0 else None
        self._futures: dict[str, Future] = {}
        self._lock = threading.Lock()

    def submit(self, filename: str, fn: Callable[[], Any]) -> Future:
        """Queues ``fn`` (which writes ``filename``); returns its future (its result: the seconds it took)."""

        def timed() -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

        key = os.path.abspath(os.fspath(filename))
        if self._pool is None:
            fut: Future = Future()
            try:
                fut.set_result(timed())
            except BaseException as e:  # recorded like a background failure
                fut.set_exception(e)
        else:
            pending = [f for f in self._futures.values() if not f.done()]
            while len(pending) >= self.max_pending:
                wait(pending, return_when=FIRST_COMPLETED)
                pending = [f for f in pending if not f.done()]
            fut = self._pool.submit(timed)
        with self._lock:
            self._futures[key] = fut
        return fut

    def status(self, filenames: Sequence[str], block: bool = False) -> tuple[bool, float, str | None]:
        """
        ``(finished, seconds, error)`` of the writes of ``filenames``: finished when none is pending, the summed write
        time, and the first error (``"<Error>: <message>"``) or None. Files never queued count as finished.

        Args:
            filenames: the files.
            block: wait for pending writes.
        """
        with self._lock:
            futs = [self._futures.get(os.path.abspath(os.fspath(f))) for f in filenames]
        futs = [f for f in futs if f is not None]
        if block:
            wait(futs)
        if not all(f.done() for f in futs):
            return False, 0.0, None
        seconds, error = 0.0, None
        for f in futs:
            e = f.exception()
            if e is None:
                seconds += f.result()
            elif error is None:
                cause = root_cause(e)
                error = f"{type(cause).__name__}: {cause}"
        return True, seconds, error

    def wait_all(self) -> None:
        """Waits for every queued write."""
        with self._lock:
            futs = list(self._futures.values())
        wait(futs)

    def close(self) -> None:
        """Waits for the writes and stops the threads."""
        self.wait_all()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def background_writer(queue: WriteQueue | None) -> type[AtomicNibabelWriter]:
    """
    A ``SaveImaged`` ``writer`` class: :class:`berdiff.io.AtomicNibabelWriter` whose ``write`` runs on ``queue``
    (the data are converted and compressed in the background; the file still appears atomically). Without a queue:
    ``AtomicNibabelWriter`` itself.

    Args:
        queue: the :class:`WriteQueue`, or None.
    """
    if queue is None:
        return AtomicNibabelWriter

    class BackgroundNibabelWriter(AtomicNibabelWriter):
        write_queue = queue

        def write(self, filename: os.PathLike | str, verbose: bool = False, **obj_kwargs: Any) -> None:
            name = os.fspath(filename)
            self.write_queue.submit(name, lambda: AtomicNibabelWriter.write(self, name, verbose=verbose, **obj_kwargs))

    return BackgroundNibabelWriter


# ---------------------------------------------------------------------------------------------------- torchrun


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` (torchrun's variable, 0 when unset) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """
    Joins torchrun's process group (NCCL on CUDA, gloo on CPU; ``env://`` rendezvous: ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` set by torchrun) unless already initialised, and selects the CUDA device.
    Outside torchrun (no ``WORLD_SIZE``) nothing is initialised: a single process.

    Args:
        device: this process's device (default :func:`local_device`).

    Returns:
        ``(rank, world_size)``.
    """
    device = torch.device(device) if device is not None else local_device()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world_size()
    if rank != 0:  # console logs from rank 0 only
        logging.getLogger("berdiff").setLevel(logging.WARNING)
    return rank, world


def summary_filename(filename: str = "run_summary.json") -> str:
    """``run_summary.json`` in a single process, ``run_summary.rank<r>.json`` for rank r of several."""
    rank, world = rank_and_world_size()
    if world == 1:
        return filename
    stem, ext = os.path.splitext(filename)
    return f"{stem}.rank{rank}{ext}"


def _barrier() -> None:
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def merge_run_summaries(
    summaries: Sequence[Mapping[str, Any]], order: Sequence[str] | None = None
) -> dict[str, Any]:
    """
    One run summary from those of several processes: cases, skipped/done/failed lists and time splits joined
    (in ``order`` of case names when given), totals summed, ``wall_time_s`` from the earliest start to the latest
    finish (the processes run concurrently), peak memory the maximum; status ``failed`` if any process failed,
    ``completed_with_failures`` if any case failed, else ``completed``. ``processes`` keeps each process's device,
    wall time and number of cases.

    Args:
        summaries: the per-process summaries (as written by :class:`berdiff.handlers.RunSummaryHandler`).
        order: case names in datalist order.
    """
    if not summaries:
        raise ValueError("no run summaries to merge.")
    merged: dict[str, Any] = {k: v for k, v in summaries[0].items()}
    rank_of = {name: i for i, name in enumerate(order or [])}

    def sort(names: list) -> list:
        key = (lambda n: rank_of.get(n if isinstance(n, str) else n.get("case"), len(rank_of)))
        return sorted(names, key=key) if order else names

    merged["cases"] = sort([c for s in summaries for c in s.get("cases", [])])
    for key in ("skipped", "done", "failed"):
        merged[key] = sort([c for s in summaries for c in s.get(key, [])])
    for key in ("num_cases", "num_slices", "num_done", "num_skipped", "num_failed"):
        merged[key] = sum(int(s.get(key) or 0) for s in summaries)
    starts = [s.get("started_utc") for s in summaries if s.get("started_utc")]
    ends = [s.get("finished_utc") for s in summaries if s.get("finished_utc")]
    merged["started_utc"] = min(starts) if starts else None
    merged["finished_utc"] = max(ends) if ends and len(ends) == len(summaries) else None
    merged["wall_time_s"] = max(float(s.get("wall_time_s") or 0.0) for s in summaries)
    wall = merged["wall_time_s"]
    merged["cases_per_s"] = round(merged["num_done"] / wall, 4) if wall > 0 else None
    busy = sum(float(c.get("wall_time_s") or 0.0) for c in merged["cases"])
    merged["slices_per_s"] = round(merged["num_slices"] / busy, 3) if busy > 0 else None
    mems = [s.get("peak_memory_mb") for s in summaries if s.get("peak_memory_mb") is not None]
    merged["peak_memory_mb"] = max(mems) if mems else None
    if "time_split_s" in merged:
        parts = {k for s in summaries for k in (s.get("time_split_s") or {})}
        merged["time_split_s"] = {
            k: round(sum(float((s.get("time_split_s") or {}).get(k) or 0.0) for s in summaries), 4) for k in sorted(parts)
        }
    statuses = [s.get("status") for s in summaries]
    errors = [s.get("error") for s in summaries if s.get("error")]
    if "failed" in statuses:
        merged["status"] = "failed"
    elif merged["num_failed"]:
        merged["status"] = "completed_with_failures"
    elif all(st == "completed" for st in statuses):
        merged["status"] = "completed"
    else:
        merged["status"] = "running"
    merged["error"] = "; ".join(errors) if errors else None
    merged["processes"] = [
        {k: s.get(k) for k in ("rank", "device", "device_name", "wall_time_s", "num_cases", "peak_memory_mb", "status")}
        for s in summaries
    ]
    merged["num_processes"] = len(summaries)
    merged.pop("rank", None)
    return merged


def finish_distributed(output_dir: str, filename: str = "run_summary.json", order: Sequence[str] | None = None) -> str | None:
    """
    After the evaluator has run on every rank: waits for all ranks, and on rank 0 merges their
    ``run_summary.rank<r>.json`` into ``<output_dir>/<filename>`` (atomically) and removes the per-rank files. A
    no-op in a single process.

    Args:
        output_dir: the output folder.
        filename: the merged summary's name.
        order: case names in datalist order (the merged ``cases`` follow it).

    Returns:
        the merged summary's path on rank 0, None elsewhere.
    """
    import json

    rank, world = rank_and_world_size()
    if world == 1:
        return os.path.join(os.fspath(output_dir), filename)
    _barrier()
    path = None
    if rank == 0:
        stem, ext = os.path.splitext(filename)
        parts = [os.path.join(os.fspath(output_dir), f"{stem}.rank{r}{ext}") for r in range(world)]
        summaries = []
        for r, p in enumerate(parts):
            with open(p) as f:
                s = json.load(f)
            s["rank"] = r
            summaries.append(s)
        merged = merge_run_summaries(summaries, order)
        merged["settings"] = dict(merged.get("settings") or {}, world_size=world)
        path = atomic_write_json(merged, os.path.join(os.fspath(output_dir), filename))
        for p in parts:
            os.remove(p)
        logger.info(f"run summary of {world} processes merged: {path}")
    _barrier()
    return path
