# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Cases loaded in worker processes, with a failed case recorded instead of stopping the run (:class:`CaseDataset`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import Dataset
from monai.transforms import Compose, LoadImage, LoadImaged

from berdiff.utils import case_name
from berdiff.validation.errors import root_cause

__all__ = ["CASE_ERROR_KEY", "CaseDataset"]

#: key of the item :class:`CaseDataset` returns for a case that failed to load (its value: the error message)
CASE_ERROR_KEY = "case_error"


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
