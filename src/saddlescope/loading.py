"""Bring a user's own model, checkpoint, data and loss into an :class:`~saddlescope.Objective`.

What the command line's ``saddlescope analyze --model ... --checkpoint ... --data ...`` does, as
functions:

- :func:`import_object` resolves ``"pkg.module:name"`` or ``"path/to/file.py:name"``;
- :func:`load_checkpoint` loads weights into a model. Checkpoints are data, not code: ``.safetensors``
  files, or ``torch.load(..., weights_only=True)``, whose unpickler refuses every global outside
  PyTorch's allow-list *before* calling it, so a checkpoint that carries code is rejected and the code
  never runs;
- :func:`resolve_loss` turns a loss name (``auto``, ``cross_entropy``, ``mse``, ``lm``, ``model``,
  ``lightning``) or a callable into ``loss_fn(outputs, targets)``;
- :func:`model_objective` builds the objective, including for Lightning modules (the loss is the
  module's own ``training_step``) and Hugging Face models (dict inputs, outputs with ``.logits`` or
  ``.loss``).

Every failure raises a :mod:`saddlescope.errors` exception naming the problem and the fix.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saddlescope.errors import (
    CheckpointError,
    CheckpointMismatchError,
    InvalidInputError,
    MissingFileError,
    UnsafeCheckpointError,
    UserCodeError,
)
from saddlescope.objective import Objective

LOSSES = ("auto", "cross_entropy", "mse", "lm", "model", "lightning")

# Keys under which training scripts commonly nest the model's weights in a checkpoint dict.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "module", "net", "weights")


# ---------------------------------------------------------------------------------------- import
def import_object(spec: str, *, what: str = "object") -> Any:
    """The object named by ``"pkg.module:name"`` or ``"path/to/file.py:name"``.

    ``name`` may be dotted (``"pkg.mod:Class.factory"``). Importing runs the module's code: that is
    the user's own code, unlike a checkpoint, which is only ever read as data.

    Args:
        spec: where the object lives.
        what: how error messages call it (e.g. ``"--model"``).

    Raises:
        InvalidInputError: the spec is malformed.
        MissingFileError: a ``.py`` path does not exist.
        UserCodeError: the module cannot be imported, or has no such attribute.
    """
    if not isinstance(spec, str) or spec.count(":") < 1 or spec.endswith(":") or spec.startswith(":"):
        raise InvalidInputError(
            f"{what} must look like 'package.module:name' or 'path/to/file.py:name', got {spec!r}"
        )
    # rsplit: a Windows drive letter ("C:\\...") may add a colon before the file name.
    module_part, name = spec.rsplit(":", 1)
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        module = _import_file(Path(module_part), what)
    else:
        try:
            module = importlib.import_module(module_part)
        except ModuleNotFoundError as exc:
            raise UserCodeError(
                f"{what}: cannot import module {module_part!r} ({exc}); put its folder on PYTHONPATH, "
                f"run from the folder that contains it, or give a file path 'path/to/file.py:{name}'"
            ) from exc
        except Exception as exc:  # the user's module raised while importing
            raise UserCodeError(
                f"{what}: importing {module_part!r} raised {type(exc).__name__}: {_first_line(exc)}"
            ) from exc
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            known = sorted(n for n in dir(module) if not n.startswith("_"))[:10]
            raise UserCodeError(
                f"{what}: {module_part!r} has no attribute {name!r}; it defines {', '.join(known) or 'nothing'}"
            )
        obj = getattr(obj, part)
    return obj


def _import_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MissingFileError(f"{what}: file {str(path)!r} does not exist")
    name = f"_saddlescope_user_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UserCodeError(f"{what}: {str(path)!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own folder first, so it can import its neighbours, as `python file.py` would.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise UserCodeError(f"{what}: running {str(path)!r} raised {type(exc).__name__}: {_first_line(exc)}") from exc
    finally:
        sys.path.remove(str(path.resolve().parent))
    return module


def build_model(factory: Any, kwargs: Mapping[str, Any] | None = None, *, what: str = "--model") -> nn.Module:
    """Call ``factory(**kwargs)`` (a class or function) and check that it returned an ``nn.Module``.

    An ``nn.Module`` instance is accepted as it is (without kwargs).
    """
    kwargs = dict(kwargs or {})
    if isinstance(factory, nn.Module):
        if kwargs:
            raise InvalidInputError(f"{what} names a module instance; it takes no arguments, got {sorted(kwargs)}")
        return factory
    if not callable(factory):
        raise InvalidInputError(f"{what} must name a function or class returning an nn.Module, got "
                                f"{type(factory).__name__}")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UserCodeError(f"{what}: calling the factory with {kwargs or 'no arguments'} failed: "
                            f"{_first_line(exc)}; pass its arguments with --model-kwargs '{{...}}'") from exc
    except Exception as exc:
        raise UserCodeError(f"{what}: the factory raised {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"{what}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def build_data(source: Any, kwargs: Mapping[str, Any] | None = None, *, what: str = "--data") -> Any:
    """The data: ``source`` itself if it is data (a pair, a list, a DataLoader), else ``source(**kwargs)``."""
    if callable(source) and not isinstance(source, Iterable) and not isinstance(source, Tensor):
        try:
            return source(**dict(kwargs or {}))
        except Exception as exc:
            raise UserCodeError(f"{what}: the data function raised {type(exc).__name__}: "
                                f"{_first_line(exc)}") from exc
    if kwargs:
        raise InvalidInputError(f"{what} names data, not a function; it takes no arguments")
    return source


# ------------------------------------------------------------------------------------ checkpoint
@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` read.

    Attributes:
        path: the file; format: ``"safetensors"`` or ``"torch"``.
        nested_key: the key the weights were found under (``"state_dict"`` for Lightning), if any.
        stripped_prefix: a prefix removed from every key so they match the model (``"module."`` from
            DistributedDataParallel, ``"model."`` from a Lightning wrapper), if any.
        n_tensors: tensors loaded.
    """

    path: str
    format: str
    n_tensors: int
    nested_key: str | None = None
    stripped_prefix: str | None = None
    ignored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "n_tensors": self.n_tensors,
                "nested_key": self.nested_key, "stripped_prefix": self.stripped_prefix,
                "ignored": list(self.ignored)}


def read_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], CheckpointInfo]:
    """Read a checkpoint file as a flat ``{name: tensor}`` dict, never running code from it.

    ``.safetensors`` files are read with :mod:`safetensors`; anything else with
    ``torch.load(weights_only=True)``. A dict that nests the weights (``{"state_dict": ...}`` as
    Lightning writes, ``{"model_state_dict": ...}``, ...) is unwrapped.

    Raises:
        MissingFileError: no such file.
        UnsafeCheckpointError: the file pickles code (a whole ``nn.Module``, a custom class); nothing
            in it was executed.
        CheckpointError: the file is not a checkpoint, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {str(path)!r} does not exist" +
                               (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: "
                                  f"{_first_line(exc)}") from exc
        fmt = "safetensors"
    else:
        try:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # weights_only's unpickler names the refused global; the refusal happens before any call.
            # Only the refused name is kept: torch's own advice (add_safe_globals, weights_only=False)
            # would have the user run the file's code.
            name = _refused_global(str(exc))
            what = f"pickled code ({name})" if name else "pickled code"
            raise UnsafeCheckpointError(
                f"checkpoint {str(path)!r} holds {what}, e.g. a whole model saved with torch.save(model), so it "
                "was refused and nothing in it was run; save the weights instead with "
                "torch.save(model.state_dict(), path) (or a .safetensors file) and load that file"
            ) from exc
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {str(path)!r} cannot be read by torch.load: {_first_line(exc)}; "
                                  "is it a PyTorch or safetensors checkpoint?") from exc
        fmt = "torch"
    state, nested = _unwrap(raw, str(path))
    return state, CheckpointInfo(path=str(path), format=fmt, n_tensors=len(state), nested_key=nested)


def _unwrap(raw: Any, path: str) -> tuple[dict[str, Tensor], str | None]:
    if isinstance(raw, Mapping) and raw and all(isinstance(v, Tensor) for v in raw.values()):
        return dict(raw), None
    if isinstance(raw, Mapping):
        for key in _NESTED_STATE_KEYS:
            inner = raw.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return dict(inner), key
        keys = ", ".join(map(repr, list(raw)[:8]))
        raise CheckpointError(f"checkpoint {path!r} is a dict without a state dict of tensors (keys: {keys}); "
                              "save model.state_dict()")
    raise CheckpointError(f"checkpoint {path!r} holds a {type(raw).__name__}, not a state dict; "
                          "save model.state_dict()")


def load_checkpoint(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> CheckpointInfo:
    """Load a checkpoint's weights into ``model`` (in place), refusing any checkpoint that carries code.

    Keys may carry one extra prefix (``"module."`` from DistributedDataParallel, ``"model."`` when the
    checkpoint is of a wrapper); it is removed when that makes every key match.

    Args:
        model: the model, built by the user's factory.
        path: a ``.safetensors`` file or a ``torch.save`` file of a state dict (plain or nested).
        strict: every parameter and buffer of the model must be in the checkpoint, and nothing else.

    Raises:
        CheckpointMismatchError: names, or shapes, differ; the message lists the first few.
        MissingFileError, UnsafeCheckpointError, CheckpointError: as :func:`read_state_dict`.
    """
    state, info = read_state_dict(path)
    expected = model.state_dict()
    state, prefix = _match_prefix(state, expected)
    info.stripped_prefix = prefix
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if wrong or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape ({_few(wrong)})")
        raise CheckpointMismatchError(
            f"checkpoint {str(path)!r} does not match the model ({type(model).__name__}): " + "; ".join(parts)
            + "; build the model the checkpoint was saved from (--model-kwargs) or pick the right checkpoint"
        )
    info.ignored = unexpected
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
    return info


def _match_prefix(state: dict[str, Tensor], expected: Mapping[str, Any]) -> tuple[dict[str, Tensor], str | None]:
    if set(state) == set(expected) or not state:
        return state, None
    first = next(iter(state))
    if "." in first:
        prefix = first.split(".", 1)[0] + "."
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            if set(stripped) == set(expected):
                return stripped, prefix
    return state, None


# ------------------------------------------------------------------------------------------ loss
def resolve_loss(loss: str | Callable[[Any, Any], Tensor], model: nn.Module | None = None,
                 sample: Any = None) -> tuple[Callable[[Any, Any], Tensor], str]:
    """``loss_fn(outputs, targets)`` for a loss name or a callable, and the name it resolved to.

    Names:
        ``cross_entropy``: classification; ``outputs`` may be logits ``(B, C)`` or ``(B, T, C)`` with
        targets ``(B,)`` / ``(B, T)``, or have a ``.logits`` field (Hugging Face).
        ``lm``: next-token cross-entropy, ``logits[:, :-1]`` against ``targets[:, 1:]``.
        ``mse``: mean squared error.
        ``model``: the model computes its own loss (``outputs.loss``, ``outputs["loss"]``, or a scalar
        output), e.g. a Hugging Face model given ``labels`` in its inputs.
        ``lightning``: a LightningModule's ``training_step`` (see :func:`model_objective`).
        ``auto``: ``lightning`` for a LightningModule; ``model`` for batches without targets; ``lm``
        when the targets are the inputs' ``input_ids``; else ``cross_entropy`` for integer targets and
        ``mse`` for floating ones (``sample`` is one raw batch, used to decide).

    Reduction: every named loss is a mean over its batch and says so (``loss_fn.reduction ==
    "mean"``), so :meth:`Objective.from_model` weights batch :math:`b` by its size :math:`n_b`; the
    full-data loss is then exact when each sample carries the same number of terms (tokens, outputs).
    A callable keeps its own ``reduction`` attribute, if any (``nn.MSELoss(reduction="sum")``, or a
    function with ``fn.reduction = "sum"``); without one it is taken as a mean.
    """
    if callable(loss) and not isinstance(loss, str):
        return loss, getattr(loss, "__name__", type(loss).__name__)
    if not isinstance(loss, str):
        raise InvalidInputError(f"loss must be a name or a callable, got {type(loss).__name__}")
    if loss not in LOSSES:
        if ":" in loss:
            return resolve_loss(import_object(loss, what="--loss"))
        raise InvalidInputError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)} or give "
                                "'package.module:function'")
    if loss == "auto":
        loss = _auto_loss(model, sample)
    return {"cross_entropy": _cross_entropy, "mse": _mse, "lm": _next_token, "model": _own_loss,
            "lightning": _own_loss}[loss], loss


def _auto_loss(model: nn.Module | None, sample: Any) -> str:
    if model is not None and _is_lightning(model):
        return "lightning"
    pair = isinstance(sample, (tuple, list)) and len(sample) == 2
    inputs, targets = (sample[0], sample[1]) if pair else (None, None)
    if targets is None:
        return "model"
    tokens = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
    if isinstance(tokens, Tensor) and isinstance(targets, Tensor) and torch.equal(tokens, targets):
        # Targets that are the inputs' own tokens: a language model, trained to predict the next one
        # (unshifted cross-entropy would score copying the current token).
        return "lm"
    if isinstance(targets, Tensor):
        return "mse" if targets.is_floating_point() else "cross_entropy"
    raise InvalidInputError("cannot choose a loss for these targets "
                            f"({type(targets).__name__}); pass --loss cross_entropy|mse|lm|model|pkg.mod:fn")


def _field(outputs: Any, name: str) -> Any:
    """``outputs.name`` or ``outputs[name]`` (Hugging Face outputs are both), else None."""
    value = getattr(outputs, name, None)
    if value is None and isinstance(outputs, Mapping):
        value = outputs.get(name)
    return value


def _logits(outputs: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    logits = _field(outputs, "logits")
    if not isinstance(logits, Tensor):
        raise InvalidInputError(f"the model returned {type(outputs).__name__} without logits; "
                                "pass a loss function with --loss pkg.module:function")
    return logits


def _mean_over_samples(loss_fn: Callable[[Any, Any], Tensor]) -> Callable[[Any, Any], Tensor]:
    """Declare a named loss a mean over its batch (``loss_fn.reduction = "mean"``), as ``torch.nn``
    losses declare theirs: :meth:`Objective.from_model` reads it and weights each batch by its size."""
    loss_fn.reduction = "mean"  # type: ignore[attr-defined]
    return loss_fn


@_mean_over_samples
def _cross_entropy(outputs: Any, targets: Tensor) -> Tensor:
    logits = _logits(outputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@_mean_over_samples
def _next_token(outputs: Any, targets: Tensor) -> Tensor:
    logits = _logits(outputs)
    if logits.dim() != 3 or targets.dim() != 2:
        raise InvalidInputError(f"--loss lm needs logits (batch, tokens, vocab) and token targets (batch, tokens); "
                                f"got {tuple(logits.shape)} and {tuple(targets.shape)}")
    shifted = logits[:, :-1]
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets[:, 1:].reshape(-1))


@_mean_over_samples
def _mse(outputs: Any, targets: Tensor) -> Tensor:
    prediction = _logits(outputs)
    if prediction.shape != targets.shape and prediction.numel() == targets.numel():
        prediction = prediction.reshape(targets.shape)
    return F.mse_loss(prediction, targets)


@_mean_over_samples
def _own_loss(outputs: Any, targets: Any) -> Tensor:
    if isinstance(outputs, Tensor):
        return outputs
    value = _field(outputs, "loss")
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"--loss model: the model's output ({type(outputs).__name__}) carries no loss; "
                                "give the model its labels in the inputs, or choose another --loss")
    return value


# ------------------------------------------------------------------------------------- Lightning
def _is_lightning(model: nn.Module) -> bool:
    return any(cls.__name__ == "LightningModule" and cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")
               for cls in type(model).__mro__)


class TrainingStep(nn.Module):
    """Wraps a LightningModule so that calling it runs ``training_step`` and returns the loss.

    :meth:`Objective.from_model` calls ``model(**inputs)`` functionally; the wrapper takes the raw
    batch's parts as keyword arguments ``part0, part1, ...`` (or the batch's own keys), rebuilds the
    batch and hands it to ``training_step(batch, 0)``. Parameter names gain the prefix ``module.``.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, **parts: Any) -> Tensor:
        if set(parts) == {f"part{i}" for i in range(len(parts))}:
            batch: Any = tuple(parts[f"part{i}"] for i in range(len(parts)))
        else:
            batch = dict(parts)
        with warnings.catch_warnings():
            # Outside a Trainer, self.log() warns on every call; the loss is all we need.
            warnings.filterwarnings("ignore", message=".*self.log.*")
            out = self.module.training_step(batch, 0)
        if isinstance(out, Mapping):
            out = out.get("loss")
        if not isinstance(out, Tensor):
            raise InvalidInputError("the LightningModule's training_step returned no loss tensor "
                                    "(return the loss, or a dict with 'loss')")
        return out


def _as_step_batches(data: Iterable[Any]) -> Iterator[tuple[dict[str, Any], None]]:
    for raw in data:
        if isinstance(raw, Mapping):
            yield dict(raw), None
        elif isinstance(raw, (tuple, list)):
            yield {f"part{i}": part for i, part in enumerate(raw)}, None
        else:
            yield {"part0": raw}, None


class _StepData:
    """A re-iterable view of a loader whose batches become TrainingStep inputs."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[tuple[dict[str, Any], None]]:
        return _as_step_batches(self.data)


# ------------------------------------------------------------------------------------- objective
def first_batch(data: Any) -> Any:
    """The first raw batch of ``data`` (a pair is its own first batch); None if there is none."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, Mapping)):
        return data
    if isinstance(data, (tuple, list)):
        return data[0] if data else None
    if isinstance(data, Iterable) and iter(data) is not data:
        return next(iter(data), None)
    return None


def model_objective(
    model: nn.Module,
    data: Any,
    loss: str | Callable[[Any, Any], Tensor] = "auto",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    reduction: str | None = None,
) -> Objective:
    """An objective for a user's model, with the loss chosen by name (see :func:`resolve_loss`).

    Lightning modules are differentiated through their own ``training_step`` (the loss they train
    on); the model is evaluated in eval mode, so Dropout is off and BatchNorm uses its running
    statistics, which makes the loss a deterministic function of the weights.

    The chosen loss is recorded in ``objective.description["loss"]``, its reduction (``reduction``,
    else the loss's own, else ``"mean"``: see :meth:`Objective.from_model`) in ``description["reduction"]``.
    """
    if isinstance(data, Iterator):  # a one-shot iterator (a generator): read it once, keep the batches
        data = list(data)
    sample = first_batch(data)
    loss_fn, name = resolve_loss(loss, model, sample)
    if name == "lightning":
        if not _is_lightning(model):
            raise InvalidInputError("--loss lightning needs a LightningModule; this model is a "
                                    f"{type(model).__name__}")
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (Tensor, Mapping)):
            data = [data]
        data = list(_as_step_batches(data)) if isinstance(data, (tuple, list)) else _StepData(data)
        obj = Objective.from_model(TrainingStep(model), loss_fn, data, dtype=dtype, device=device,
                                   max_batches=max_batches, reduction=reduction)
    else:
        obj = Objective.from_model(model, loss_fn, data, dtype=dtype, device=device, max_batches=max_batches,
                                   reduction=reduction)
    obj.description["loss"] = name
    obj.description["model"] = type(model).__name__
    return obj


# ------------------------------------------------------------------------------------------ misc
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _few(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f", ... {len(items) - n} more" if len(items) > n else "")


def _refused_global(message: str) -> str:
    """The dotted name of the global that ``torch.load(weights_only=True)`` refused, or ``""``."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    return found.group(1).rstrip(".") if found else ""
