"""Task layer: a torch module's ``state_dict`` <-> fednode params (ordered name -> numpy array).

For task authors. torch is imported inside the functions, never when this module is imported.
Every tensor of the ``state_dict`` travels, buffers included (BatchNorm running statistics and
its int64 ``num_batches_tracked``), in the ``state_dict``'s order. bfloat16 maps to
``ml_dtypes.bfloat16`` bit for bit. Loading is strict: names, shapes and dtypes must all match
the module, and a mismatch is a :class:`~fednode.errors.ConfigError` naming the tensor. Read-only
arrays (as decoded from the wire) load fine: their values are copied into the module's tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fednode.errors import ConfigError, WireError
from fednode.wire.arrays import BFLOAT16, dtype_name
from fednode.wire.schema import Model

if TYPE_CHECKING:
    import torch


def state_dict_to_params(source: torch.nn.Module | Mapping[str, torch.Tensor]) -> Model:
    """The module's (or ``state_dict``'s) tensors as detached, contiguous numpy copies, in order."""
    import torch

    state = source.state_dict() if isinstance(source, torch.nn.Module) else source
    return Model({name: tensor_to_array(name, tensor) for name, tensor in state.items()})


def tensor_to_array(name: str, tensor: torch.Tensor) -> np.ndarray[Any, Any]:
    """One tensor as a numpy array that owns its (C-contiguous) memory."""
    import torch

    numpy_dtype_of(name, tensor.dtype)  # fail early, naming the tensor, on dtypes that can't travel
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: move the 16-bit patterns
        return tensor.view(torch.int16).numpy().view(BFLOAT16).copy()
    return tensor.numpy().copy()


def load_params(module: torch.nn.Module, params: Mapping[str, np.ndarray[Any, Any]]) -> None:
    """Copy ``params`` into ``module``'s parameters and buffers, in place.

    Raises:
        ConfigError: a name is missing or unexpected, or a shape or dtype differs; nothing is
            copied then.
    """
    import torch

    state = module.state_dict()  # detached tensors sharing storage with the module's
    _check_layout(state, params)
    with torch.no_grad():
        for name, target in state.items():
            _copy_into(target, params[name])


def params_to_state_dict(
    params: Mapping[str, np.ndarray[Any, Any]], module: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """``params`` as new tensors laid out like ``module``'s ``state_dict`` (same checks as
    :func:`load_params`); the result suits ``module.load_state_dict``."""
    state = module.state_dict()
    _check_layout(state, params)
    converted: dict[str, torch.Tensor] = {}
    for name, like in state.items():
        target = like.new_empty(like.shape)
        _copy_into(target, params[name])
        converted[name] = target
    return converted


def numpy_dtype_of(name: str, dtype: torch.dtype) -> np.dtype[Any]:
    """The numpy dtype for a torch dtype, or :class:`ConfigError` if fednode cannot send it."""
    import torch

    if dtype == torch.bfloat16:
        return BFLOAT16
    try:
        converted = torch.empty(0, dtype=dtype).numpy().dtype
        dtype_name(converted)
    except (TypeError, RuntimeError, WireError) as exc:
        raise ConfigError(f"tensor {name}: dtype {dtype} cannot travel in a fednode model") from exc
    return converted


def _check_layout(state: Mapping[str, torch.Tensor], params: Mapping[str, Any]) -> None:
    missing = [name for name in state if name not in params]
    if missing:
        raise ConfigError(f"params lack tensor {missing[0]} (missing {len(missing)} in all)")
    unexpected = [name for name in params if name not in state]
    if unexpected:
        raise ConfigError(f"params have tensor {unexpected[0]}, which the module does not")
    for name, tensor in state.items():
        array = params[name]
        if not isinstance(array, np.ndarray):
            raise ConfigError(f"tensor {name}: expected a numpy array, got {type(array).__name__}")
        if array.shape != tuple(tensor.shape):
            raise ConfigError(
                f"tensor {name}: shape {list(array.shape)} does not match the module's"
                f" {list(tensor.shape)}"
            )
        expected = numpy_dtype_of(name, tensor.dtype)
        if array.dtype.newbyteorder("=") != expected:
            raise ConfigError(
                f"tensor {name}: dtype {array.dtype} does not match the module's {expected}"
            )


def _copy_into(target: torch.Tensor, array: np.ndarray[Any, Any]) -> None:
    """Copy ``array`` into ``target`` with one copy, whether or not ``array`` is writeable."""
    import torch

    bfloat16 = target.dtype == torch.bfloat16
    if target.device.type == "cpu" and target.is_contiguous():
        view = target.view(torch.int16).numpy() if bfloat16 else target.numpy()
        source = array.view(np.int16) if bfloat16 else array
        np.copyto(view, source, casting="equiv")
        return
    # A tensor outside host memory: torch needs a writeable host array to copy from.
    host = np.array(array.view(np.int16) if bfloat16 else array, order="C", copy=True)
    tensor = torch.from_numpy(host)
    target.copy_(tensor.view(torch.bfloat16) if bfloat16 else tensor)
