r"""Data-parallel curvature over ``torch.distributed``: each rank holds a shard of the data.

Rank :math:`r` holds :math:`N_r` samples with mean loss :math:`L_r`. The full-data objective is the
sample-weighted mean over ranks,

.. math::

    L = \frac{\sum_r N_r L_r}{\sum_r N_r}, \qquad
    g = \frac{\sum_r N_r g_r}{\sum_r N_r}, \qquad
    H v = \frac{\sum_r N_r H_r v}{\sum_r N_r},

and all three are linear in the per-sample losses. So :class:`~saddlescope.objective.Objective`
exchanges the counts once, at construction, divides its local sum by the global count
:math:`N = \sum_r N_r` instead of :math:`N_r`, and one SUM all-reduce per loss, gradient or batch
of products then gives every rank the full-data value (:func:`all_reduce_sum`).

Lockstep: the Krylov methods draw their random vectors from seeded CPU generators and are
deterministic given the products, and a SUM all-reduce hands every rank the same bits (gloo and
NCCL reduce in one fixed order per call), so every rank runs the same iteration and reaches the
same eigenpairs and verdict. The one thing that can break it is the user's: ranks that start from
different parameters (models initialised with different seeds). :func:`check_same` compares a hash
of ``theta`` across ranks; the objective calls it at construction and for every new point it builds
a gradient graph at.

Failure: a rank that raises stops calling collectives, and its peers would wait for it forever. The
group is initialised with a finite timeout (:func:`init_from_env`), and every collective here turns
a peer's death (connection closed) or the timeout into :class:`~saddlescope.errors.DistributedError`
naming this rank, so the survivors exit with one readable line instead of hanging.

Nothing here imports or costs anything when no process group is initialised.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from saddlescope.errors import DistributedError, InvalidInputError

# Long enough for a slow rank to finish an exact Hessian chunk or a checkpoint load, short enough
# that a failed job does not hold its GPUs for torch's default 30 minutes.
DEFAULT_TIMEOUT_S = 300.0


def _dist():
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised in this process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group (0 when not distributed)."""
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    return _dist().get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and when not distributed): the process that writes reports and prints."""
    return rank() == 0


def backend() -> str | None:
    """The default group's backend (``"gloo"``, ``"nccl"``, ...), or None when not distributed."""
    return str(_dist().get_backend()) if is_distributed() else None


def init_from_env(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Initialise the default process group from ``torchrun``'s environment, if it asks for one.

    ``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT`` and ``LOCAL_RANK`` in each process it starts. With
    ``WORLD_SIZE`` > 1 and no group yet, this initialises one (``env://``) with a finite timeout,
    so that a rank that fails makes the others fail within ``timeout_s`` instead of hanging; with
    NCCL it also selects the GPU ``LOCAL_RANK``. A plain ``python`` run (no ``WORLD_SIZE``, or 1)
    is left alone.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ...; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective waits for the other ranks before failing.

    Returns:
        Whether a process group is initialised now (by this call or before it).

    Raises:
        DistributedError: ``WORLD_SIZE`` > 1 but a variable is missing or malformed, or the ranks
            could not meet (wrong address or port, a rank that never started) within the timeout.
    """
    if is_distributed():
        return True
    raw_size = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw_size)
    except ValueError:
        raise DistributedError(f"WORLD_SIZE must be an integer, got {raw_size!r}") from None
    if size <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={size} but {', '.join(missing)} not set; launch with torchrun "
            "(python -m torch.distributed.run --nproc_per_node=N ...), which sets them"
        )
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
        raise InvalidInputError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("this PyTorch build has no torch.distributed; install one that has")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        # One GPU per process: without this every rank would share cuda:0.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    where = f"rank {os.environ['RANK']} of {size}, rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        dist.init_process_group(
            backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=float(timeout_s))
        )
    except (RuntimeError, ValueError) as exc:
        raise DistributedError(
            f"could not initialise the {backend} process group ({where}): {_first_line(exc)}; "
            "check that every rank was launched with the same address, port and WORLD_SIZE"
        ) from exc
    return True


# ---------------------------------------------------------------------- collectives
def all_reduce_sum(tensor: Tensor, *, what: str = "a sum") -> Tensor:
    """The elementwise sum of ``tensor`` over all ranks, as a new tensor (the argument is kept).

    16-bit tensors are summed in float32 and rounded back once, so the reduction adds no rounding
    beyond the final cast. With NCCL a CPU tensor travels through the current GPU.

    Args:
        tensor: this rank's part; same shape and dtype on every rank.
        what: names the quantity in the error message (e.g. ``"the gradient"``).

    Raises:
        DistributedError: another rank failed, stopped, or did not reach this sum in time.
    """
    work = tensor.detach()
    if work.is_floating_point() and work.element_size() < 4:
        work = work.float()
    work = work.to(_comm_device(work)).contiguous()
    if work.data_ptr() == tensor.data_ptr():
        work = work.clone()  # reduce into a copy: the caller's local value stays intact
    with _collective(what):
        _dist().all_reduce(work, op=_dist().ReduceOp.SUM)
    return work.to(tensor.device, tensor.dtype)


def weighted_mean(value: Tensor, count: int, *, what: str = "a mean") -> Tensor:
    r"""The sample-weighted mean :math:`\sum_r N_r x_r / \sum_r N_r` of a per-rank mean ``value``.

    For quantities the objective does not reduce itself (a custom metric computed on each rank's
    shard). A rank with ``count`` 0 contributes nothing; if every count is 0 the result is NaN.

    Args:
        value: this rank's mean over its ``count`` samples (any shape, same on every rank).
        count: this rank's number of samples :math:`N_r`.
    """
    if not (isinstance(count, int) and count >= 0):
        raise InvalidInputError(f"count must be an integer >= 0, got {count!r}")
    flat = value.detach().reshape(-1).to(torch.float64)
    share = flat * count if count else torch.zeros_like(flat)  # an empty rank's NaN must not leak in
    packed = torch.cat([share, flat.new_tensor([float(count)])])
    total = all_reduce_sum(packed, what=what)
    return (total[:-1] / total[-1]).reshape(value.shape).to(value.dtype)


def all_gather_ints(values: Sequence[int], *, what: str = "integers") -> list[list[int]]:
    """Every rank's ``values`` (same length everywhere), as a list indexed by rank."""
    dist = _dist()
    mine = torch.tensor(list(values), dtype=torch.int64)
    mine = mine.to(_comm_device(mine))
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    with _collective(what):
        dist.all_gather(parts, mine)
    return [[int(x) for x in part.cpu()] for part in parts]


def checksum(tensor: Tensor) -> int:
    """A 64-bit hash of ``tensor``'s bytes (as a signed int, to travel in an int64 tensor).

    Bytes, not a floating sum: equal parameters must hash equal on every rank whatever the
    device's summation order, and differing ones differ with near certainty.
    """
    raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little", signed=True)


def check_same(tensor: Tensor, *, what: str = "theta") -> None:
    """Raise :class:`DistributedError` unless ``tensor`` is bit-identical on every rank.

    The ranks run the same Krylov iteration only if they evaluate the Hessian at the same point; a
    rank at another point would silently mix two Hessians. One small all-gather of hashes.
    """
    hashes = [row[0] for row in all_gather_ints([checksum(tensor)], what=f"comparing {what}")]
    differ = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differ:
        raise DistributedError(
            f"rank {rank()} of {world_size()}: {what} differs across ranks (rank(s) {differ} differ from "
            "rank 0); every rank must hold the same parameters: seed the initialisation identically "
            "or load the same checkpoint on every rank"
        )


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a collective's failure into one clear error naming this rank.

    A peer that exited closes its connections, and a peer that stopped calling collectives makes
    this one time out; gloo and NCCL report either as a RuntimeError (``DistBackendError``,
    ``DistNetworkError``) from deep inside the backend. The default group is destroyed on the way
    out: after a failed collective the ranks no longer agree on what comes next.
    """
    try:
        yield
    except RuntimeError as exc:
        message = (
            f"rank {rank()} of {world_size()}: {what} across ranks failed: another rank failed or "
            f"stopped (or did not get here within the timeout); see its log [{_first_line(exc)}]"
        )
        # The group is unusable now, and a gloo group left with a timed-out operation aborts the
        # interpreter at exit ("terminate called without an active exception"): tear it down so
        # the error below is how this process ends.
        with contextlib.suppress(Exception):
            _dist().destroy_process_group()
        raise DistributedError(message) from exc


def _comm_device(tensor: Tensor) -> torch.device:
    if backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
