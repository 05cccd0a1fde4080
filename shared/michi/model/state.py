"""Streaming state as a flat list of tensors, for runtimes that pass state in and out explicitly
(ONNX, NVIDIA Triton). A module's state is a tree of lists and dataclasses whose leaves are
tensors (and plain ints, which are fixed by the module's shape and stay in the template)."""
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
    if dataclasses.is_dataclass(state):
        return [t for f in dataclasses.fields(state) for t in state_tensors(getattr(state, f.name))]
    return []  # None (a stateless child) or a constant such as an int


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
    elif dataclasses.is_dataclass(state):
        for f in dataclasses.fields(state):
            setattr(state, f.name, _fill(getattr(state, f.name), it))
    return state
