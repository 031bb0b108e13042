"""Buffer slots for GPU batches in flight, handed out in turn.

A slot (pinned buffers, a stream, an execution context) holds one batch from submit() until its
result() has read the outputs. Handing out a slot that is still busy would let the next batch's
copy-out overwrite outputs nobody has read yet, so that is refused rather than waited for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Protocol, TypeVar

import numpy as np

from worker.runners.base import RunnerError


class _HasBusy(Protocol):
    busy: bool


SlotT = TypeVar("SlotT", bound=_HasBusy)


class SlotRing(Generic[SlotT]):
    """The runner's slots in round-robin order; take() returns the next one, which must be free."""

    def __init__(self, backend: str, slots: list[SlotT]) -> None:
        self.backend = backend
        self.slots = slots
        self._next = 0

    def take(self) -> SlotT:
        slot = self.slots[self._next]
        if slot.busy:
            raise RunnerError(
                f"all {len(self.slots)} {self.backend} slots hold uncollected batches; "
                "call result() on one before submitting more"
            )
        self._next = (self._next + 1) % len(self.slots)
        return slot

    def peek(self) -> SlotT | None:
        """The slot take() would return, or None when it is still busy."""
        if not self.slots:
            return None
        slot = self.slots[self._next]
        return None if slot.busy else slot

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[SlotT]:
        return iter(self.slots)


def copy_into_slot(crops: np.ndarray, buffer: np.ndarray) -> None:
    """Write a batch into the start of a slot's input buffer, unless it was stacked there already
    (Runner.staging): then it is the same memory and there is nothing to copy."""
    count = len(crops)
    if crops.dtype == buffer.dtype and crops.ctypes.data == buffer.ctypes.data:
        return
    buffer[:count] = crops if buffer.dtype == crops.dtype else crops.astype(buffer.dtype)
