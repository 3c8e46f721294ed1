# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Output files written on a background thread while the next case runs (:class:`WriteQueue`,
:func:`background_writer`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from berdiff.io.writers import AtomicNibabelWriter
from berdiff.validation.errors import root_cause

__all__ = ["WriteQueue", "background_writer"]

logger = logging.getLogger(__name__)


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
