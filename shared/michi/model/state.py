"""Streaming state as a flat list of tensors, for runtimes that pass state in and out explicitly
(ONNX, NVIDIA Triton). A module's state (`michi.model.streaming.StreamingState`) is a tree of
named children (dataclasses and `StateDict`s; lists too) whose leaves are tensors (and plain ints,
which are fixed by the module's shape and stay in the template). `state_names` gives each flattened
tensor its dotted path, in the same order."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from torch import Tensor


def state_tensors(state: Any) -> list[Tensor]:
    """The tensors of `state`, depth first, in a fixed order."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, list):
        return [t for child in state for t in state_tensors(child)]
    if isinstance(state, dict):
        return [t for child in state.values() for t in state_tensors(child)]
    if dataclasses.is_dataclass(state):
        return [t for f in dataclasses.fields(state) for t in state_tensors(getattr(state, f.name))]
    return []  # None (a stateless child) or a constant such as an int


def state_names(state: Any, prefix: str = "") -> list[str]:
    """The dotted path of each tensor of `state`, in `state_tensors` order."""
    if isinstance(state, Tensor):
        return [prefix]
    if isinstance(state, (list, dict)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
    elif dataclasses.is_dataclass(state):
        items = ((f.name, getattr(state, f.name)) for f in dataclasses.fields(state))
    else:
        return []
    return [n for k, child in items for n in state_names(child, f"{prefix}.{k}" if prefix else str(k))]


def load_state_tensors(state: Any, tensors: list[Tensor]) -> Any:
    """Put `tensors` (ordered as `state_tensors` lists them) into `state`, in place; returns it."""
    it = iter(tensors)
    state = _fill(state, it)
    if next(it, None) is not None:
        raise ValueError("more state tensors than the state holds")
    return state


def _fill(state: Any, it: Iterator[Tensor]) -> Any:
    if isinstance(state, Tensor):
        try:
            return next(it)
        except StopIteration:
            raise ValueError("fewer state tensors than the state holds") from None
    if isinstance(state, list):
        state[:] = [_fill(child, it) for child in state]
    elif isinstance(state, dict):
        for key in list(state):
            state[key] = _fill(state[key], it)
    elif dataclasses.is_dataclass(state):
        for f in dataclasses.fields(state):
            setattr(state, f.name, _fill(getattr(state, f.name), it))
    return state
