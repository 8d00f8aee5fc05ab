"""From a model to a function of ``theta``: how a loss reduces its batch (:func:`resolve_reduction`),
which named tensors ``theta`` holds (:class:`ParameterLayout`), and one call of the model on a batch
with them (:class:`ModelCall`): :meth:`~saddlescope.objective.Objective.from_model`'s pieces."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from saddlescope.errors import (
    BatchShapeError,
    InvalidInputError,
    NonScalarLossError,
    NoTrainableParametersError,
)
from saddlescope.objective.data import Cast, describe_data

__all__ = ["REDUCTIONS", "ModelCall", "ParameterLayout", "resolve_reduction", "usable_device"]


REDUCTIONS = ("mean", "sum")


def resolve_reduction(loss_fn: Callable[..., Any], reduction: str | None) -> str:
    """How ``loss_fn`` reduces a batch: ``"mean"`` (weighted by batch size) or ``"sum"`` (added).

    The rule: the loss's own declaration (its ``reduction`` attribute, as ``torch.nn`` losses and the
    named losses of :mod:`saddlescope.loading` have, or the ``reduction`` keyword of a
    ``functools.partial``) and the ``reduction`` argument must agree where both are given; either one
    alone decides; with neither, ``"mean"``. ``"batchmean"`` (``nn.KLDivLoss``: a sum over each
    sample, a mean over samples) is a mean over samples. ``"none"`` is refused: per-sample losses are
    not one number per batch.
    """
    declared = getattr(loss_fn, "reduction", None)
    if declared is None and isinstance(loss_fn, functools.partial):
        declared = loss_fn.keywords.get("reduction")
    if not isinstance(declared, str):  # an attribute that happens to share the name
        declared = None
    if declared == "batchmean":
        declared = "mean"
    for value, whose in ((reduction, "reduction"), (declared, "loss_fn has reduction")):
        if value is not None and value not in REDUCTIONS:
            raise (NonScalarLossError if value == "none" else InvalidInputError)(
                f"{whose}={value!r}, but the objective needs one number per batch: "
                + ("with 'none' the loss returns one per sample, not a scalar; " if value == "none" else "")
                + "use reduction='mean' (the loss is then the mean over all samples) or 'sum' (their sum)"
            )
    if reduction is not None and declared is not None and reduction != declared:
        raise InvalidInputError(
            f"loss_fn has reduction={declared!r} but reduction={reduction!r} was passed; leave out the "
            "argument (the loss's own reduction is used) or make them agree"
        )
    return reduction or declared or "mean"


@dataclass(frozen=True)
class ParameterLayout:
    """The map between ``theta`` and a model's named tensors.

    ``theta`` is the concatenation of the flattened trainable tensors, in ``names`` order; ``fixed``
    holds the rest of the model's state (frozen parameters, buffers), passed unchanged to every call.
    """

    names: list[str]
    shapes: list[torch.Size]
    values: list[Tensor]  # the trainable tensors at the starting point
    fixed: dict[str, Tensor]

    @classmethod
    def of(cls, model: Any, params: Iterable[str] | Mapping[str, Tensor] | None) -> ParameterLayout:
        if isinstance(model, nn.Module):
            return cls._of_module(model, params)
        if isinstance(model, type):
            name = model.__name__
            raise InvalidInputError(f"model is the class {name}; pass an instance, {name}(...)")
        if callable(model):
            return cls._of_function(params)
        raise InvalidInputError(
            f"model must be an nn.Module or a function f(params, inputs), got {type(model).__name__}"
        )

    @classmethod
    def _of_module(cls, model: nn.Module, params: Any) -> ParameterLayout:
        if isinstance(params, Mapping):
            raise InvalidInputError(
                "for an nn.Module, params names the parameters to differentiate (a list of names); to "
                "start from other values, load them into the module (model.load_state_dict)"
            )
        named = dict(model.named_parameters())
        if params is None:
            trainable = [n for n, p in named.items() if p.requires_grad]
        else:
            trainable = list(params)
            unknown = [n for n in trainable if n not in named]
            if unknown:
                raise InvalidInputError(
                    f"params names {unknown} are not parameters of the model; "
                    f"known: {list(named)[:8]}{'...' if len(named) > 8 else ''}"
                )
        if not trainable:
            raise NoTrainableParametersError(
                "the model has no parameter with requires_grad=True to differentiate; "
                "unfreeze some (p.requires_grad_(True)) or name them with params=[...]"
            )
        chosen = set(trainable)
        fixed = {n: p.detach() for n, p in named.items() if n not in chosen}
        fixed.update({n: b.detach() for n, b in model.named_buffers()})
        values = [named[n].detach() for n in trainable]
        return cls(trainable, [v.shape for v in values], values, fixed)

    @classmethod
    def _of_function(cls, params: Any) -> ParameterLayout:
        if not isinstance(params, Mapping) or not params:
            raise InvalidInputError(
                "a function model f(params, inputs) needs its starting point: pass params={name: tensor}, "
                "e.g. {n: p.detach() for n, p in module.named_parameters()}"
            )
        bad = [n for n, t in params.items()
               if not (isinstance(n, str) and isinstance(t, Tensor) and t.is_floating_point())]
        if bad:
            raise InvalidInputError(f"params must map names (str) to floating tensors; {bad[:4]} do not")
        values = [t.detach() for t in params.values()]
        return cls(list(params), [v.shape for v in values], values, {})

    def compute_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        dtype = dtype or self.values[0].dtype
        if not dtype.is_floating_point:
            raise InvalidInputError(f"dtype must be a floating dtype, got {dtype}")
        return dtype

    def compute_device(self, device: torch.device | str | None) -> torch.device:
        return usable_device(device) if device is not None else self.values[0].device

    def cast(self, cast: Cast) -> ParameterLayout:
        return dataclasses.replace(self, values=[cast(v) for v in self.values],
                                   fixed={n: cast(t) for n, t in self.fixed.items()})

    @property
    def theta0(self) -> Tensor:
        return torch.cat([v.reshape(-1) for v in self.values])

    def state(self, theta: Tensor, fresh_fixed: bool = False) -> dict[str, Tensor]:
        """Every named tensor of the model at ``theta``; ``fresh_fixed`` copies the fixed ones (a
        BatchNorm in training mode updates its buffers in place: keep ours pristine)."""
        state = {n: t.clone() for n, t in self.fixed.items()} if fresh_fixed else dict(self.fixed)
        sizes = [s.numel() for s in self.shapes]
        state.update(zip(self.names, (t.view(s) for t, s in zip(torch.split(theta, sizes), self.shapes))))
        return state


class ModelCall:
    """One call of the model on a batch's inputs, with the named tensors given.

    A module runs through ``functional_call`` in the requested mode (its own mode is restored); a
    function runs as ``f(state, inputs)``. A tensor input is the one argument. A dict input is spread
    as keyword arguments when every key names a parameter of the callee (``forward`` after ``self``,
    ``f`` after ``params``) or the callee takes ``**kwargs``; it is the one argument when the callee
    has exactly one required positional parameter (or, with none required, one positional parameter)
    and its name is not a key. Anything else is refused, naming both.
    """

    def __init__(self, model: Any, train_mode: bool) -> None:
        self.model = model
        self.is_module = isinstance(model, nn.Module)
        if train_mode and not self.is_module:
            raise InvalidInputError("train_mode applies to an nn.Module; a function has no training mode")
        self.train_mode = train_mode
        kind = type(model).__name__
        self.name = kind if self.is_module else getattr(model, "__name__", kind)
        self.parameters = _callee_parameters(model)
        self._spread: dict[frozenset[Any], bool] = {}

    def __call__(self, state: dict[str, Tensor], inputs: Any) -> Any:
        args, kwargs = self._arguments(inputs)
        try:
            if not self.is_module:
                return self.model(state, *args, **kwargs)
            was_training = self.model.training
            self.model.train(self.train_mode)
            try:
                return functional_call(self.model, state, args, kwargs)
            finally:
                self.model.train(was_training)
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
            raise BatchShapeError(
                f"the model failed on a batch with inputs {describe_data(inputs)}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                "check that the data match the model"
            ) from exc

    def _arguments(self, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if not isinstance(inputs, Mapping):
            return (inputs,), {}
        keys = frozenset(inputs)
        if keys not in self._spread:
            self._spread[keys] = self._spreads(keys)
        return ((), dict(inputs)) if self._spread[keys] else ((dict(inputs),), {})

    def _spreads(self, keys: frozenset[Any]) -> bool:
        if self.parameters is None:  # no signature to read (a builtin): keywords, as before
            return True
        kinds = inspect.Parameter
        if any(p.kind is kinds.VAR_KEYWORD for p in self.parameters):
            return True
        named = {p.name for p in self.parameters
                 if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
        if keys <= named:
            return True
        positional = [p for p in self.parameters
                      if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        candidates = required or positional
        if len(candidates) == 1 and candidates[0].name not in keys:
            return False
        callee = f"{self.name}.forward" if self.is_module else self.name
        raise BatchShapeError(
            f"the inputs are a dict with keys {sorted(map(str, keys))}, but {callee}"
            f"({', '.join(p.name for p in self.parameters)}) takes them neither as keyword arguments nor as "
            "one argument; name the keys after its parameters, or give it one parameter for the whole dict"
        )


def usable_device(device: torch.device | str) -> torch.device:
    """``device`` as a :class:`torch.device` this process can compute on, or an
    :class:`~saddlescope.errors.InvalidInputError` that says why not (PyTorch's own errors here are an
    ``AssertionError`` "Torch not compiled with CUDA enabled", or a list of twenty device types)."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"device {device!r} is not a device PyTorch knows; use e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from exc
    if where.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise InvalidInputError(
                f"device {str(where)!r}: no CUDA device is available to this process (torch {torch.__version__}, "
                f"{build}); use device='cpu', or install a CUDA build of torch on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if where.index is not None and where.index >= count:
            raise InvalidInputError(
                f"device {str(where)!r}: this process sees {count} CUDA device(s), numbered 0 to {count - 1} "
                "(CUDA_VISIBLE_DEVICES renumbers them)"
            )
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"device {str(where)!r}: the MPS backend is not available here; use device='cpu'")
    elif where.type == "meta":
        raise InvalidInputError("device 'meta' holds no values to compute with; use 'cpu' or a GPU")
    return where


def _callee_parameters(model: Any) -> list[inspect.Parameter] | None:
    """The parameters a batch's inputs bind to: ``forward``'s (without ``self``) for a module, ``f``'s
    after ``params`` for a function; None when Python cannot tell."""
    try:
        signature = inspect.signature(model.forward if isinstance(model, nn.Module) else model)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())
    if isinstance(model, nn.Module) or not parameters or parameters[0].kind is parameters[0].VAR_POSITIONAL:
        return parameters
    return parameters[1:]
