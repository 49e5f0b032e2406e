"""Helpers for the balancers' ``state_dict`` / ``load_state_dict`` (checkpoint and resume).

A state is a nest of dicts, lists, strings, numbers, None and tensors, so that ``torch.save`` writes it
and ``torch.load(..., weights_only=True)`` reads it back. Every check here raises ValueError naming what
is wrong, before anything is restored: a refused state leaves the balancer as it was.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping, Optional, Sequence, overload

import torch
from torch import Tensor

#: Version of the layout :meth:`Balancer.state_dict` returns; bumped when a key changes meaning.
STATE_FORMAT = 1


def plain(value: Any) -> Any:
    """``value`` as the plain Python types that ``weights_only`` loading accepts and ``==`` compares.

    Tuples become lists, numpy and tensor scalars become Python numbers, mapping keys strings, so that a
    configuration compares equal to itself after a round trip through ``torch.save``/``torch.load``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Tensor):
        return plain(value.tolist())
    if isinstance(value, Mapping):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "tolist"):  # numpy arrays and numpy booleans
        return plain(value.tolist())
    return str(value)


def saved(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A detached copy, so that the state does not change with the balancer after it is taken."""
    return None if tensor is None else tensor.detach().clone()


@overload
def restored(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor: ...
@overload
def restored(tensor: Optional[Tensor], device: torch.device, dtype: torch.dtype) -> Optional[Tensor]: ...
def restored(tensor: Optional[Tensor], device: torch.device, dtype: torch.dtype) -> Optional[Tensor]:
    """A copy on the balancer's device; floating tensors in its dtype (as ``torch.optim`` casts its state)."""
    if tensor is None:
        return None
    if tensor.dtype.is_floating_point:
        return tensor.to(device=device, dtype=dtype, copy=True)
    return tensor.to(device=device, copy=True)


def expect_mapping(value: Any, where: str, keys: Sequence[str]) -> Mapping[str, Any]:
    """``value`` is a mapping with exactly ``keys``."""
    if not isinstance(value, Mapping):
        raise ValueError(f"balancer state: {where} must be a dict, got {type(value).__name__}")
    missing = [key for key in keys if key not in value]
    unknown = sorted(str(key) for key in value if key not in keys)
    if missing or unknown:
        raise ValueError(f"balancer state: {where} has missing keys {missing}, unknown keys {unknown}")
    return value


def expect_tensor(value: Any, where: str, shape: tuple[int, ...], optional: bool = False, floating: bool = True) -> Optional[Tensor]:
    """``value`` is a tensor of ``shape`` (floating point unless ``floating=False``), or None if ``optional``."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        raise ValueError(f"balancer state: {where} must be a tensor of shape {shape}, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"balancer state: {where} has shape {tuple(value.shape)}, expected {shape} (one value per task)")
    if floating and not value.dtype.is_floating_point:
        raise ValueError(f"balancer state: {where} must be a floating-point tensor, got {value.dtype}")
    return value


def expect_count(value: Any, where: str, low: int, high: Optional[int] = None) -> int:
    """``value`` is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"balancer state: {where} must be an int {bounds}, got {value!r}")
    return value


def config_differences(saved_config: Mapping[str, Any], current: Mapping[str, Any], ignored: Sequence[str]) -> list[str]:
    """Each configuration key whose value differs, as ``"key: <saved> in the state vs <current> here"``."""
    differences = []
    for key in list(saved_config) + [key for key in current if key not in saved_config]:
        if key in ignored:
            continue
        if key not in current:
            differences.append(f"{key}: {saved_config[key]!r} in the state, not set here")
        elif key not in saved_config:
            differences.append(f"{key}: not in the state, {current[key]!r} here")
        elif saved_config[key] != current[key]:
            differences.append(f"{key}: {saved_config[key]!r} in the state vs {current[key]!r} here")
    return differences


def cloned(value: Any) -> Any:
    """A copy of a state nest whose tensors are copies, so a state kept for later is not aliased."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, Mapping):
        return {key: cloned(item) for key, item in value.items()}
    if isinstance(value, list):
        return [cloned(item) for item in value]
    return value
