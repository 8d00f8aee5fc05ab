"""From "my model stopped learning" to a verdict and a report: :func:`analyze_model`.

The Python form of ``saddlescope analyze --model ... --checkpoint ... --data ...``: build the user's
model, load its checkpoint (data only, never code), build the objective with the chosen loss,
classify the point, optionally measure every layer's curvature, and write the report.
This is the interface layer: it may use everything below it, including :mod:`saddlescope.report`.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from saddlescope.critical import CriticalPoint
from saddlescope.critical import analyze as analyze_point
from saddlescope.curvature.blocks import BlockReport, per_block
from saddlescope.distributed import init_from_env, is_main_process, rank, world_size
from saddlescope.errors import InvalidInputError, TooLargeError
from saddlescope.loading import (
    CheckpointInfo,
    build_data,
    build_model,
    import_object,
    load_checkpoint,
    model_objective,
)
from saddlescope.memory import parse_bytes
from saddlescope.objective import Objective
from saddlescope.objective.model_call import usable_device

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
METHODS = {"auto": None, "exact": True, "lanczos": False}


class RankShard:
    """Every ``world_size``-th batch of ``data``, starting at ``rank``: this process's shard.

    Whole batches go to ranks, so the objective's sample weighting (and its all-reduce) gives exactly
    the full-data loss whatever the batch sizes. Re-iterable when ``data`` is (a list, a DataLoader).
    """

    def __init__(self, data: Iterable[Any], rank: int, world_size: int) -> None:
        if _is_single_pair(data):
            data = [data]
        elif isinstance(data, Iterator):  # one-shot: keep the batches, every pass must see them
            data = list(data)
        self.data, self.rank, self.world_size = data, rank, world_size

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.data), self.rank, None, self.world_size)


def _is_single_pair(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (Tensor, Mapping))


@dataclass
class ModelAnalysis:
    """The verdict on a user's model and where its report went.

    Attributes:
        point: the :class:`CriticalPoint`.
        objective: the objective it was computed on (``objective.description`` says which loss,
            model, data subset).
        blocks: per-layer curvature when asked for (``by=``).
        checkpoint: what was loaded, if a checkpoint was given.
        files: report files written (``{"html": ..., "json": ..., ...}``).
    """

    point: CriticalPoint
    objective: Objective
    blocks: BlockReport | None = None
    checkpoint: CheckpointInfo | None = None
    files: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = self.point.to_dict()
        out["objective"] = dict(self.objective.description)
        out["settings"] = dict(self.settings)
        if self.checkpoint is not None:
            out["checkpoint"] = self.checkpoint.to_dict()
        if self.blocks is not None:
            out["blocks"] = self.blocks.to_dict()
        if self.files:
            out["files"] = dict(self.files)
        return out

    def summary(self) -> str:
        lines = [self.point.summary()]
        if self.blocks is not None:
            lines.append(self.blocks.table())
        for name, path in self.files.items():
            lines.append(f"{name}: {path}")
        return "\n".join(lines)


def analyze_model(
    model: nn.Module | Callable[..., nn.Module] | str,
    data: Any,
    *,
    loss: str | Callable[[Any, Any], Tensor] = "auto",
    checkpoint: str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    data_kwargs: Mapping[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    method: str = "auto",
    k: int = 10,
    index_probes: int = 5,
    index_rtol: float | None = None,
    index_hvps: int | None = None,
    memory_budget: int | str | None = None,
    by: str | None = None,
    grad_tol: float | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    shard: bool = True,
    out: str | os.PathLike[str] | None = None,
    command: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelAnalysis:
    """Load, classify and report on a user's model: what ``saddlescope analyze --model`` runs.

    Args:
        model: an ``nn.Module``, a factory (class or function) called with ``model_kwargs``, or its
            ``"pkg.module:name"`` / ``"file.py:name"`` spec.
        data: batches (an ``(inputs, targets)`` pair, a list, a DataLoader), a function returning
            them (called with ``data_kwargs``), or its spec. Inputs may be dicts (Hugging Face).
        loss: a name from :data:`saddlescope.loading.LOSSES`, a ``"pkg.module:fn"`` spec, or a
            callable ``loss_fn(outputs, targets)``; ``"auto"`` picks from the model and targets.
        checkpoint: weights to load first (``.safetensors`` or a ``torch.save`` state dict; code
            is refused).
        dtype: compute dtype (``torch.float64`` or ``"float64"``, ...); default the model's own.
        device: where to compute (``"cuda"``, ``"cuda:1"``, ``"cpu"``, a :class:`torch.device`); default where
            the model's parameters are. The parameters and the data are moved there; checked before the
            model is built, with an error that says why a device cannot be used.
        max_batches: analyse only the first batches (a fixed subset, recorded).
        method: ``"auto"`` | ``"exact"`` | ``"lanczos"``.
        k: eigenpairs at each end on the iterative path.
        index_probes: iterative path: at most this many probes for the index estimate; 0 skips it (the
            verdict alone, which needs none: see :func:`saddlescope.analyze`).
        index_rtol, index_hvps: iterative path: the index's resolution stated in advance (a fraction of
            max|lambda|) and its product budget (:func:`saddlescope.analyze`).
        memory_budget: iterative path: bytes each eigensolver run and each index probe may hold, a count
            or a text such as ``"8GiB"`` (default: half of what is free where the model lives); the plan it
            chose is in the report (:mod:`saddlescope.curvature.basis_plan`).
        by: also per-block curvature: ``"module"`` or ``"parameter"``.
        grad_tol, rtol, atol: tolerances (default by dtype).
        seed: for every random choice; recorded.
        shard: under ``torchrun`` (``WORLD_SIZE`` > 1), give rank ``r`` of ``W`` the batches
            ``r, r + W, r + 2W, ...`` (:class:`RankShard`); the all-reduced objective then equals the
            one-process objective on all the data. ``False`` when ``data`` already is this rank's
            shard (e.g. a DataLoader with a ``DistributedSampler``).
        out: folder for the report (HTML, JSON, PNGs); None writes nothing.
        command: the command line, recorded in the report.
        progress: ``progress(stage, done, total)`` during long stages.

    Raises:
        saddlescope.errors.SaddlescopeError: with a message naming the problem and the fix.
    """
    if method not in METHODS:
        raise InvalidInputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if by is not None and by not in ("module", "parameter"):
        raise InvalidInputError(f"by must be 'module' or 'parameter', got {by!r}")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidInputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    memory_budget = memory_budget_bytes(memory_budget)
    if device is not None:
        device = usable_device(device)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InvalidInputError(f"out {str(out)!r} is a file; give a folder for the report")

    if isinstance(model, str):
        model = import_object(model, what="--model")
    module = build_model(model, model_kwargs)
    if isinstance(data, str):
        data = import_object(data, what="--data")
    batches = build_data(data, data_kwargs)
    if init_from_env() and shard:
        batches = RankShard(batches, rank(), world_size())
    info = load_checkpoint(module, checkpoint) if checkpoint is not None else None

    objective = model_objective(module, batches, loss, dtype=dtype, device=device, max_batches=max_batches)
    stage = (lambda name: (lambda done, total: progress(name, done, total))) if progress else (lambda name: None)
    try:
        point = analyze_point(objective, k=k, exact=METHODS[method], grad_tol=grad_tol, rtol=rtol, atol=atol,
                              seed=seed, index_probes=index_probes, index_rtol=index_rtol, index_hvps=index_hvps,
                              memory_budget=memory_budget,
                              progress=stage("hessian products"))
    except TooLargeError as exc:
        raise TooLargeError(f"{exc} (on the command line: --method lanczos)") from exc
    blocks = per_block(objective, by=by, rtol=rtol, seed=seed) if by is not None else None
    settings = {"method": method, "k": k, "index_probes": index_probes, "index_rtol": index_rtol,
                "index_hvps": index_hvps, "memory_budget": memory_budget, "by": by,
                "seed": seed, "dtype": str(objective.dtype),
                "max_batches": max_batches, "loss": objective.description.get("loss")}
    if command is not None:
        settings["command"] = command
    result = ModelAnalysis(point=point, objective=objective, blocks=blocks, checkpoint=info, settings=settings)
    if out is not None:
        result.files = write_model_report(result, out, command=command, progress=stage("report"))
    return result


def memory_budget_bytes(memory_budget: int | str | None) -> int | None:
    """``memory_budget`` as bytes (a count or a text such as ``"8GiB"``), or a clear error."""
    if memory_budget is None:
        return None
    try:
        return parse_bytes(memory_budget)
    except ValueError as exc:
        raise InvalidInputError(f"memory_budget: {exc}") from None


def write_model_report(result: ModelAnalysis, out: str | os.PathLike[str], *, command: str | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write ``result``'s report into ``out``: the HTML page with its JSON and PNGs
    (:func:`saddlescope.report.write_report`), and ``analysis.json`` (the verdict with the checkpoint,
    objective and settings). Returns the files by name."""
    from saddlescope.report.html import write_report
    from saddlescope.report.io import write_json

    files = write_report(result.point, result.objective, out=out, blocks=result.blocks, command=command,
                         seed=result.point.seed, progress=progress)
    named = {"html": str(files.html), "report_json": str(files.json)}
    named.update({f"png_{name}": str(path) for name, path in files.pngs.items()})
    named["json"] = str(Path(out) / "analysis.json")
    result.files = named
    if is_main_process():  # under torch.distributed, rank 0 alone writes
        write_json(named["json"], result.to_dict())
    return named
