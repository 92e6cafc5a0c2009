"""state_dict <-> params: lossless in both directions, strict about layout, fine with read-only."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from fednode.errors import ConfigError
from fednode.task.torch_params import load_params, params_to_state_dict, state_dict_to_params
from fednode.wire.messages import ModelBlob
from fednode.wire.schema import Model, decode, encode


class Mixed(nn.Module):
    """Parameters and buffers of every dtype a model commonly holds."""

    def __init__(self) -> None:
        super().__init__()
        self.w_f16 = nn.Parameter(torch.zeros(3, 4, dtype=torch.float16))
        self.w_f32 = nn.Parameter(torch.zeros(5, dtype=torch.float32))
        self.w_f64 = nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
        self.w_bf16 = nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16))
        self.register_buffer("steps", torch.zeros(6, dtype=torch.int64))
        self.norm = nn.BatchNorm1d(3)  # running_mean, running_var, num_batches_tracked (0-d int64)


def _randomised(seed: int) -> Mixed:
    generator = torch.Generator().manual_seed(seed)
    module = Mixed()
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
            else:
                tensor.copy_(torch.randint(-(2**40), 2**40, tensor.shape, generator=generator))
    return module


def _bits(tensor: torch.Tensor) -> bytes:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return bytes(tensor.contiguous().numpy().tobytes())


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert _bits(sa[name]) == _bits(sb[name]), name


def test_round_trip_is_lossless_for_every_dtype_and_buffers() -> None:
    # Prepare
    source, target = _randomised(1), _randomised(2)
    # Execute
    params = state_dict_to_params(source)
    load_params(target, params)
    # Assert
    _assert_same_state(source, target)
    assert list(params) == list(source.state_dict())
    assert "norm.num_batches_tracked" in params and "steps" in params
    dtypes = {name: array.dtype for name, array in params.items()}
    assert dtypes["w_f16"] == np.float16 and dtypes["w_f32"] == np.float32
    assert dtypes["w_f64"] == np.float64 and dtypes["steps"] == np.int64
    assert dtypes["w_bf16"] == np.dtype(ml_dtypes.bfloat16)
    assert params["norm.num_batches_tracked"].shape == ()


def test_params_are_detached_contiguous_copies() -> None:
    # Prepare
    module = _randomised(3)
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).T
    # Execute
    params = state_dict_to_params(module)
    loose = state_dict_to_params({"t": transposed})
    with torch.no_grad():
        module.w_f32.add_(1.0)
    # Assert
    assert not np.array_equal(params["w_f32"], module.w_f32.detach().numpy())
    assert all(array.flags.c_contiguous and array.flags.owndata for array in params.values())
    assert loose["t"].flags.c_contiguous
    np.testing.assert_array_equal(loose["t"], transposed.numpy())


def test_read_only_params_decoded_from_the_wire_load() -> None:
    # Prepare
    source, target = _randomised(4), _randomised(5)
    blob = encode(ModelBlob(tensors=state_dict_to_params(source)))
    decoded = decode(blob, ModelBlob).tensors
    assert not any(array.flags.writeable for array in decoded.values())
    # Execute
    load_params(target, decoded)
    # Assert
    _assert_same_state(source, target)


def test_big_endian_arrays_load() -> None:
    # Prepare
    module = nn.Linear(2, 2)
    params = {
        name: array.astype(array.dtype.newbyteorder(">"))
        for name, array in state_dict_to_params(nn.Linear(2, 2)).items()
    }
    # Execute
    load_params(module, params)
    # Assert
    for name, array in params.items():
        np.testing.assert_array_equal(module.state_dict()[name].numpy(), array)


def test_params_to_state_dict_feeds_load_state_dict() -> None:
    # Prepare
    source, target = _randomised(6), _randomised(7)
    params = state_dict_to_params(source)
    # Execute
    state = params_to_state_dict(params, target)
    target.load_state_dict(state)
    # Assert
    _assert_same_state(source, target)
    assert not np.shares_memory(state["w_f32"].numpy(), params["w_f32"])


def _mismatched(kind: str) -> dict[str, Any]:
    params: dict[str, Any] = dict(state_dict_to_params(_randomised(8)))
    if kind == "missing":
        del params["w_f64"]
    elif kind == "unexpected":
        params["extra.weight"] = np.zeros(1, np.float32)
    elif kind == "shape":
        params["w_f64"] = np.zeros((4,), np.float64)
    elif kind == "dtype":
        params["w_f64"] = params["w_f64"].astype(np.float32)
    elif kind == "type":
        params["w_f64"] = torch.zeros(2, 2, dtype=torch.float64)
    return params


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "dtype", "type"])
def test_load_rejects_a_layout_mismatch_naming_the_tensor(kind: str) -> None:
    # Prepare
    module = _randomised(9)
    before = state_dict_to_params(module)
    params = _mismatched(kind)
    # Execute
    with pytest.raises(ConfigError) as raised:
        load_params(module, params)
    with pytest.raises(ConfigError):
        params_to_state_dict(params, module)
    # Assert
    name = "extra.weight" if kind == "unexpected" else "w_f64"
    assert name in str(raised.value)
    after = state_dict_to_params(module)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing half-loaded


def test_a_dtype_that_cannot_travel_is_named() -> None:
    # Prepare
    module = nn.Module()
    module.register_buffer("mask", torch.ones(3, dtype=torch.bool))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"tensor mask: dtype torch\.bool"):
        state_dict_to_params(module)
    with pytest.raises(ConfigError, match="mask"):
        load_params(module, Model({"mask": np.ones(3, dtype=np.bool_)}))


def test_module_and_state_dict_sources_agree() -> None:
    # Prepare
    module = _randomised(10)
    # Execute
    from_module = state_dict_to_params(module)
    from_state = state_dict_to_params(OrderedDict(module.state_dict()))
    # Assert
    assert list(from_module) == list(from_state)
    assert all(from_module[k].tobytes() == from_state[k].tobytes() for k in from_module)
