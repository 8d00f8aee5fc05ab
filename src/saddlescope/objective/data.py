"""The data as the objective reads them: batches, passes over them, and what a pass must not change.

A pair, a list, a one-shot iterator or the first ``max_batches`` of a loader are read once and kept
(:class:`FixedBatches`); a re-iterable loader is read again on every pass, and every pass must hold the
first pass's batches (:class:`CheckedPasses`: a loader that reshuffles would make each pass another data
set). Each batch is moved to the compute device and dtype (:class:`Cast`) and weighted by its size.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saddlescope.errors import (
    BatchShapeError,
    DataChangedError,
    EmptyDataError,
    InvalidInputError,
)

__all__ = [
    "Batch", "Cast", "CheckedPasses", "FixedBatches", "data_passes", "describe_data", "input_elements",
]


@dataclass(frozen=True)
class Batch:
    """One batch of data with its weight in the full-data mean."""

    inputs: Any
    targets: Any
    size: int


@dataclass(frozen=True)
class Cast:
    """Moves data to the compute device, floating tensors also to the compute dtype (inside dicts too)."""

    device: torch.device
    dtype: torch.dtype

    def __call__(self, value: Any) -> Any:
        if isinstance(value, Tensor):
            value = value.to(self.device)
            return value.to(self.dtype) if value.is_floating_point() else value
        if isinstance(value, Mapping):
            return {k: self(v) for k, v in value.items()}
        return value


class FixedBatches:
    """Batches read once and kept: every pass yields the same tensors."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches

    def __call__(self) -> list[Batch]:
        return self.batches

    def describe_subset(self, max_batches: int) -> dict[str, Any]:
        return {"max_batches": max_batches, "batches": len(self.batches),
                "samples": sum(b.size for b in self.batches), "fingerprint": _fingerprint(self.batches)}


class CheckedPasses:
    """A re-iterable loader, read again on every pass; each complete pass must yield the first one's data.

    A pass's signature is the sorted list of its batches' sizes and digests (:func:`_batch_digest`).
    The order of the batches may change, since the loss is a sum over batches (only rounding
    differs); what is in a batch may not: a loader that reshuffles or draws random transforms gives
    another data set, or other batches for a loss that couples a batch's samples (batch statistics,
    in-batch negatives), on every pass, and each loss, gradient and product would be of a different
    function. The digest reads each byte once as the loader gave it (SHA-1, over 1 GB/s): about a tenth
    of a forward pass of a 64-32-10 MLP, less for anything larger, and a small part of reading the loader.
    """

    def __init__(self, data: Iterable[Any], cast: Cast) -> None:
        self.data, self.cast = data, cast
        self.reference: list[tuple[int, str]] | None = None
        self.completed = 0

    def __call__(self) -> Iterator[Batch]:
        signature = []
        for raw in self.data:
            batch = _make_batch(raw, self.cast)
            if batch.size == 0:
                continue
            signature.append((batch.size, _batch_digest(raw)))
            yield batch
        self._check(sorted(signature))

    def _check(self, signature: list[tuple[int, str]]) -> None:
        self.completed += 1
        if self.reference is None:
            self.reference = signature
            return
        if signature == self.reference:
            return
        first, now = self.reference, signature
        counts = [(sum(size for size, _ in s), len(s)) for s in (first, now)]
        if counts[0] != counts[1]:
            (first_samples, first_batches), (samples, batches) = counts
            detail = f"{samples} samples in {batches} batches, the first {first_samples} in {first_batches}"
        else:
            unmatched = len(now) - sum(min(now.count(b), first.count(b)) for b in set(now))
            detail = f"{unmatched} of {len(now)} batches hold other data than any batch of the first pass"
        raise DataChangedError(
            f"the data changed between passes (pass {self.completed}: {detail}): a DataLoader with "
            "shuffle=True or random transforms makes every pass another data set, and each loss, gradient "
            "and Hessian product would mix them; pass a loader with shuffle=False and deterministic "
            "transforms, or max_batches=N to read N batches once and keep them"
        )


def _batch_digest(raw: Any) -> str:
    """SHA-1 of a batch as the loader yielded it: each tensor's place, dtype, shape and bytes."""
    digest = hashlib.sha1()

    def feed(path: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key in sorted(value, key=str):
                feed(f"{path}.{key}", value[key])
        elif isinstance(value, Tensor):
            digest.update(f"{path}:{value.dtype}:{tuple(value.shape)};".encode())
            digest.update(_tensor_bytes(value))
        else:
            digest.update(f"{path}:{_plain(value)};".encode())

    feed("inputs", raw[0])
    feed("targets", raw[1])
    return digest.hexdigest()


def _tensor_bytes(tensor: Tensor) -> Any:
    """A tensor's bytes as a buffer on the host (any dtype, bfloat16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _plain(value: Any) -> str:
    """A non-tensor leaf as text: its value when that is a plain one, else its type (a repr may hold an
    address that differs on every pass)."""
    return repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__


def data_passes(data: Any, cast: Cast, max_batches: int | None) -> FixedBatches | CheckedPasses:
    """The data as passes over batches: kept when :func:`_materialise` reads them once (a pair, a
    list, a one-shot iterator, the first ``max_batches``), else a loader re-read and checked every pass."""
    batches = _materialise(data, cast, max_batches)
    return CheckedPasses(data, cast) if batches is None else FixedBatches(batches)


def _materialise(data: Any, cast: Callable[[Any], Any], max_batches: int | None = None) -> list[Batch] | None:
    """Batches as a list when the data are a pair, a list, a one-shot iterator, or limited to
    ``max_batches``; else None (a re-iterable loader, read lazily on every pass)."""
    if data is None:
        raise EmptyDataError("data is None; pass an (inputs, targets) pair or an iterable of them")
    if _is_pair(data):
        batches = [_make_batch(data, cast)]
    elif isinstance(data, (tuple, list)):
        batches = [_make_batch(b, cast) for b in data[:max_batches]]
    elif isinstance(data, Iterable):
        if not isinstance(data, Iterator) and max_batches is None:  # re-iterable (no iter() spent on asking)
            return None
        batches = [_make_batch(b, cast) for b in itertools.islice(data, max_batches)]
    else:
        raise InvalidInputError(
            f"data must be an (inputs, targets) pair or an iterable of them, got {type(data).__name__}"
        )
    batches = [b for b in batches if b.size > 0]
    if not batches:
        raise EmptyDataError("the data yielded no non-empty batch; pass at least one sample")
    return batches


def _make_batch(raw: Any, cast: Callable[[Any], Any]) -> Batch:
    if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
        raise BatchShapeError(
            f"each batch must be an (inputs, targets) pair, got {type(raw).__name__}"
            + (f" of length {len(raw)}" if isinstance(raw, (tuple, list)) else "")
        )
    inputs, targets = cast(raw[0]), cast(raw[1])
    n_in, n_out = _first_dim(inputs), _first_dim(targets)
    if n_in is None:
        raise BatchShapeError(
            f"batch inputs must be a tensor or dict of tensors, got {describe_data(inputs)}"
        )
    if n_out is not None and n_out != n_in:
        raise BatchShapeError(
            f"batch has {n_in} inputs but {n_out} targets ({describe_data(inputs)} vs "
            f"{describe_data(targets)}); inputs and targets must share their first dimension"
        )
    return Batch(inputs=inputs, targets=targets, size=n_in)


def _is_pair(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, Mapping))
        and not isinstance(data[0], (tuple, list))
    )


def _first_dim(x: Any) -> int | None:
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() > 0 else None
    if isinstance(x, Mapping):
        for v in x.values():
            if isinstance(v, Tensor) and v.dim() > 0:
                return v.shape[0]
    return None


def describe_data(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} {x.dtype}"
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k}: {describe_data(v)}" for k, v in x.items()) + "}"
    return type(x).__name__


def input_elements(x: Any) -> int:
    """The number of elements of a batch's input tensors (inside dicts, lists and tuples too)."""
    if isinstance(x, Tensor):
        return x.numel()
    if isinstance(x, Mapping):
        return sum(input_elements(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(input_elements(v) for v in x)
    return 0


def _fingerprint(batches: list[Batch]) -> str:
    """A short hash of the data, so a report can say which subset it was computed on."""
    digest = hashlib.sha1()

    def feed(x: Any) -> None:
        if isinstance(x, Tensor):
            digest.update(_tensor_bytes(x))
        elif isinstance(x, Mapping):
            for key in sorted(x):
                digest.update(str(key).encode())
                feed(x[key])

    for batch in batches:
        feed(batch.inputs)
        feed(batch.targets)
    return digest.hexdigest()[:16]
