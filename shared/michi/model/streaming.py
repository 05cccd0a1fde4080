"""One streaming protocol for every stateful module (conv, listen encoder and text head, vocoders,
backbone).

A `StreamingModule` has `init_state(batch_size, device=None, dtype=float32) -> StreamingState` and
`step(x, state, exec_mask=None) -> (y, state)`; chunked `step` output equals the whole-input output.
A `StreamingState` holds a batch of independent streams: its own tensors (every fresh stream is all
zeros / False unless the state says otherwise) and its child states BY NAME (dataclass fields, or
the keys of a `StateDict`). `state.reset(mask)` puts the rows where mask [B] is True back to a fresh
stream, recursing into the children. `exec_mask` [B] bool: rows where it is False do not advance
(their state tensors are unchanged by the step; their outputs are unspecified).

Subclasses implement `_step(x, state)` (every row advances); `step` adds the exec mask on top by
keeping the old state tensors of the frozen rows, which needs a step that keeps the state's shapes
(whole frames for strided encoders). A module with its own masked path (the backbone's KV cache)
overrides `step` instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor


def rows_mask(mask: Tensor, like: Tensor) -> Tensor:
    """The per-row mask [B] shaped to broadcast against a batch-first tensor."""
    return mask.to(like.device).view(-1, *([1] * (like.dim() - 1)))


class StreamingState:
    """Base of every streaming state; see the module doc."""

    def children(self) -> dict[str, "StreamingState"]:
        """Child states by name (default: the dataclass fields that are states)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: v for f in dataclasses.fields(self)
                if isinstance(v := getattr(self, f.name), StreamingState)}

    def own_tensors(self) -> dict[str, Tensor]:
        """This state's own tensors by name (default: the dataclass fields that are tensors)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), Tensor)}

    def check_reset(self) -> None:
        """Raise if the rows cannot restart now; `reset` checks the whole tree before changing any."""
        for child in self.children().values():
            child.check_reset()

    def reset_own(self, mask: Tensor) -> None:
        """Reset this state's own tensors in the masked rows (default: to zeros / False)."""
        for name, t in self.own_tensors().items():
            setattr(self, name, t.masked_fill(rows_mask(mask, t), 0))

    def reset(self, mask: Tensor) -> None:
        """Restart the rows where `mask` [B] is True as fresh streams; the other rows are untouched."""
        self.check_reset()
        self._reset(mask)

    def _reset(self, mask: Tensor) -> None:
        self.reset_own(mask)
        for child in self.children().values():
            child._reset(mask)


class StateDict(dict, StreamingState):
    """Child states of a composite module, by name (insertion order is the flattening order)."""

    def children(self) -> dict[str, StreamingState]:
        return {k: v for k, v in self.items() if isinstance(v, StreamingState)}

    def own_tensors(self) -> dict[str, Tensor]:
        return {}

    def reset_own(self, mask: Tensor) -> None:
        for k, v in self.items():
            if isinstance(v, Tensor):
                self[k] = v.masked_fill(rows_mask(mask, v), 0)


def freeze_rows(new: Any, old: list[Tensor], exec_mask: Tensor) -> Any:
    """Put back the `old` tensors (`state_tensors` order) of the rows where `exec_mask` is False."""
    from .state import load_state_tensors, state_tensors

    merged = []
    for n, o in zip(state_tensors(new), old, strict=True):
        if n.shape != o.shape:
            raise ValueError(f"a step with an exec mask must keep the state's shapes ({tuple(o.shape)} -> "
                             f"{tuple(n.shape)}): step whole frames")
        merged.append(torch.where(rows_mask(exec_mask, n), n, o))
    return load_state_tensors(new, merged)


class StreamingModule:
    """Mixin of every streaming module (put it before the nn.Module base); see the module doc."""

    def init_state(self, batch_size: int, device: Any = None,
                   dtype: torch.dtype = torch.float32) -> StreamingState:
        raise NotImplementedError

    def _step(self, x: Any, state: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def step(self, x: Any, state: Any, exec_mask: Tensor | None = None) -> tuple[Any, Any]:
        return masked_step(self._step, x, state, exec_mask)


def masked_step(fn: Callable[[Any, Any], tuple[Any, Any]], x: Any, state: Any,
                exec_mask: Tensor | None) -> tuple[Any, Any]:
    """`fn(x, state)` (a step of every row) with the rows where `exec_mask` is False frozen."""
    if exec_mask is None:
        return fn(x, state)
    from .state import state_tensors

    old = state_tensors(state)
    y, state = fn(x, state)
    return y, freeze_rows(state, old, exec_mask)


def is_streaming(module: Any) -> bool:
    return isinstance(module, StreamingModule)
