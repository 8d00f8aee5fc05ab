"""Writing results: JSON written atomically (:mod:`saddlescope.atomic`), never half a file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from saddlescope.atomic import atomic_write_text


def to_jsonable(value: Any) -> Any:
    """Convert tensors, dataclasses with ``to_dict`` and non-finite floats to JSON values."""
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the information readable
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def write_json(path: str | os.PathLike[str], payload: Any) -> Path:
    """Write ``payload`` (anything :func:`to_jsonable` takes) as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(to_jsonable(payload), indent=2) + "\n")
