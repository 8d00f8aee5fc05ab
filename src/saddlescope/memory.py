"""Memory, planned rather than discovered: how much is free, and how much an autograd graph holds.

Two measurements, both cheap enough to take at the start of every analysis:

- :func:`available_memory`: the bytes free where a device's tensors live. On the host, the kernel's
  ``MemAvailable`` (``/proc/meminfo``: free memory plus the page cache it can drop), capped by the
  process's cgroup limit when a container sets one (``MemAvailable`` is the whole machine's), or
  ``psutil`` where there is no ``/proc``; on a GPU, ``torch.cuda.mem_get_info`` plus what PyTorch's
  caching allocator holds but does not use (it hands that out before asking the driver).
- :class:`SavedTensorBytes`: the bytes an autograd graph keeps alive, as the sum of the distinct
  storages its nodes save for backward (seen through ``torch.autograd.graph.saved_tensors_hooks``, which
  every saving operation calls: built-in ones, custom ``autograd.Function``\\ s, and the backward nodes a
  ``create_graph=True`` gradient records). Each storage counts once and whole (a view keeps its whole
  storage alive); storages that live on regardless of the graph (the data, fixed buffers) are left
  out. Unlike the growth of the resident set, it does not depend on what the C allocator recycles.

And one remedy, :func:`return_freed_memory`, for what the C allocator does not recycle. On glibc hosts a
freed block larger than the ``mmap`` threshold raises that threshold (up to 32 MiB), so the next
products' temporaries of the same size come from the heap, where freed space stays in the resident set:
a loop of Hessian-vector products on a 5M-parameter MLP (float32, 20 MB a vector) grew the resident set
by 295-345 MB while it held 40 MB (``/tmp/mem/loop.py``, 16 products). ``malloc_trim(0)`` after each
product hands the freed pages back (madvise) without changing the allocator's policy for the rest of
the process; the next product faults them in again, about 5% of a product's time there, but at 124M
parameters (GPT-2 on one CPU thread, its gradients in blocks of 2-9 MB under the raised threshold) a
product right after it took 3.2-6.1 s against 2.1-2.8 s. So a two-pass eigensolver run at the default
budget hands memory back only while free memory is short
(:class:`~saddlescope.curvature.lanczos.CountedProduct`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any, Self

import torch
from torch import Tensor

__all__ = ["SavedTensorBytes", "available_memory", "describe_bytes", "parse_bytes", "return_freed_memory",
           "storage_keys"]

_MEMINFO = "/proc/meminfo"
# cgroup v2, then v1: (limit, usage) files; "max" or a huge number means no limit.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)
_NO_LIMIT = 2**60


def available_memory(device: torch.device | str) -> tuple[int | None, str]:
    """Bytes free for new tensors on ``device``, and where the figure came from.

    Returns:
        ``(bytes, source)``; ``bytes`` is None (source ``"unknown"``) where nothing can be read:
        a device other than the CPU or a CUDA GPU, or a host with neither ``/proc/meminfo`` nor psutil.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0)), "torch.cuda.mem_get_info"
    if device.type != "cpu":
        return None, "unknown"
    host, source = _host_available()
    limit = _cgroup_room()
    if limit is not None and (host is None or limit < host):
        return limit, "cgroup memory limit"
    return host, source


def _host_available() -> tuple[int | None, str]:
    try:
        with open(_MEMINFO) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None, "unknown"
    return int(psutil.virtual_memory().available), "psutil"


def _cgroup_room() -> int | None:
    """The cgroup's limit minus its usage, or None when no limit is set (or none can be read)."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit_text = f.read().strip()
            if limit_text == "max":
                return None
            limit = int(limit_text)
            if limit >= _NO_LIMIT:
                return None
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        return max(limit - usage, 0)
    return None


def storage_keys(values: Iterable[Any]) -> set[int]:
    """The storages (by address) of the tensors in ``values``, looking inside dicts, lists and tuples."""
    keys: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            keys.add(value.untyped_storage().data_ptr())
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for value in values:
        visit(value)
    return keys


class SavedTensorBytes:
    """Counts the bytes the autograd graph recorded inside this context saves for backward.

    Use as ``with SavedTensorBytes(exclude=...) as saved: <build the graph>``; then
    ``saved.total(extra=...)`` is the sum of the distinct saved storages' sizes plus the storages of
    ``extra`` (tensors the graph's owner holds besides, e.g. the gradient itself) not already counted.
    Storages of ``exclude`` (tensors alive anyway) are not counted.

    The pack hook returns a detached alias (same storage, so no extra memory, and no reference cycle
    between a node and its own output); autograd re-attaches the history when it unpacks, so second
    derivatives through the graph are unchanged. The unpack hook costs one Python call per saved tensor
    per backward pass (~2% of a product on a small transformer), so measure one graph, not all of them.
    """

    def __init__(self, exclude: Iterable[Any] = ()) -> None:
        self._exclude = storage_keys(exclude)
        self._sizes: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._exclude:
            self._sizes[key] = storage.nbytes()
        return tensor.detach()

    def __enter__(self) -> Self:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def total(self, extra: Iterable[Tensor] = ()) -> int:
        sizes = dict(self._sizes)
        for tensor in extra:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._exclude:
                sizes.setdefault(storage.data_ptr(), storage.nbytes())
        return sum(sizes.values())


def _unpack(tensor: Tensor) -> Tensor:
    return tensor


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int) -> int:
    """A number of bytes from a person: ``"8GiB"``, ``"500 MB"``, ``"1.5G"`` (decimal units, KiB/MiB/GiB
    binary) or a plain count. Raises ``ValueError`` with what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if found is None or found.group(2).lower() not in _UNITS:
            raise ValueError(f"not a number of bytes: {text!r} (e.g. 8GiB, 500MB, 1.5G, 2000000000)")
        value, unit = float(found.group(1)), found.group(2).lower()
    count = value * _UNITS[unit]
    if not (count >= 0 and count < 2**63):
        raise ValueError(f"not a number of bytes: {text!r}")
    return int(count)


def describe_bytes(count: int | None) -> str:
    """``count`` bytes for a person, in binary units: ``"12.1 MiB"``, ``"2.0 GiB"``."""
    if count is None:
        return "unknown"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"  # pragma: no cover - the loop always returns


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def return_freed_memory() -> bool:
    """Hand the host memory the C allocator holds free back to the system (glibc's ``malloc_trim(0)``;
    module docstring). Returns False where there is no such call; it never frees anything in use."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
