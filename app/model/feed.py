"""How a batch gets onto the model's device and its answers off it, overlapped with the model.

A batch runs in two steps (``Classifier.stage`` and ``Classifier.compute``). Staging gathers
the uint8 pixels into a host buffer reused batch after batch (``StagingBuffers``: pinned on CUDA,
so that the copy really is asynchronous), starts their one copy to the device, and decodes the
batch's JPEGs on the device (``DeviceDecoder``); on CUDA all of it is issued on a side stream,
so that, with the batcher staging the next batch while this one computes, the copy and decode
of batch N+1 overlap batch N's forward pass. Computing waits for that stream's event, runs the
model, and brings the top-k scores and classes back in one device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch

from app.preprocessing import ImageError
from app.values import Item


class Fence(Protocol):
    """Something that finishes later: a CUDA event recorded after a copy."""

    def synchronize(self) -> None: ...


class StagingBuffers:
    """``count`` host buffers, each as large as the largest batch, handed out in turn.

    A buffer is handed out again only once the copy out of it has finished: ``acquire`` waits
    for the fence its last user left (``release``). Nothing is allocated per batch: the
    buffers are made once, pinned on CUDA (pinning is a slow system call, and a pageable
    source makes ``non_blocking`` copies synchronous)."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        count: int,
        pinned: bool,
        allocate: Callable[..., torch.Tensor] = torch.empty,
    ) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self._allocate = partial(allocate, dtype=dtype, pin_memory=pinned)
        self.buffers = [self._allocate(shape) for _ in range(count)]
        self._fences: list[Fence | None] = [None] * count
        self._next = 0

    def acquire(self, rows: int) -> tuple[int, torch.Tensor]:
        """The next buffer in turn (its first ``rows`` rows), once its last copy has finished;
        and its number, for ``release``. A batch larger than the buffers (a tool's, beyond the
        server's batch size) gets a buffer of its own, used once (number -1)."""
        if rows > self.buffers[0].shape[0]:
            return -1, self._allocate((rows, *self.buffers[0].shape[1:]))
        index = self._next
        self._next = (index + 1) % len(self.buffers)
        fence = self._fences[index]
        if fence is not None:
            fence.synchronize()
            self._fences[index] = None
        return index, self.buffers[index][:rows]

    def release(self, index: int, fence: Fence | None) -> None:
        """Buffer ``index`` may be reused once ``fence`` has finished (at once if None)."""
        if index >= 0:
            self._fences[index] = fence


@dataclass(slots=True)
class Staged:
    """A batch on its way to the model: its input on the device (uint8 (B, C, H, W) pixels, or
    float32 when it holds client-normalised tensors), the event that says it is there, and
    the images that failed to decode (their rows hold zeros; they get their error)."""

    items: Sequence[Item]
    batch: torch.Tensor
    ready: torch.cuda.Event | None = None
    failures: dict[int, ImageError] = field(default_factory=dict)
