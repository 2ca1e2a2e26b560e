"""numpy tensors by name <-> Flower's ArrayRecord (the only wire format both sides use)."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}
