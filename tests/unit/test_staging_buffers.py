"""The host buffers batches are staged in (app/model/feed.py): made once, reused in turn, and
never handed out again while a copy out of them may still be running."""

from __future__ import annotations

from typing import Any

import torch

from app.model.feed import StagingBuffers


class Allocations:
    """torch.empty, counted."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.count += 1
        return torch.empty(*args, **kwargs)


class Fence:
    """A copy still running until someone waits for it."""

    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def synchronize(self) -> None:
        self.log.append(self.name)


def test_buffers_are_made_once_and_reused_in_turn_batch_after_batch() -> None:
    allocate = Allocations()
    buffers = StagingBuffers((16, 4, 4, 3), torch.uint8, 3, pinned=False, allocate=allocate)
    storages = {buffer.data_ptr() for buffer in buffers.buffers}
    assert allocate.count == 3
    assert len(storages) == 3
    seen = []
    for size in [16, 1, 7, 16, 3, 9, 16, 2, 5] * 10:
        index, rows = buffers.acquire(size)
        assert rows.shape == (size, 4, 4, 3)
        seen.append(rows.data_ptr())
        buffers.release(index, None)
    assert allocate.count == 3  # nothing allocated per batch
    assert set(seen) == storages
    assert seen[:6] == seen[:3] * 2  # in turn


def test_a_buffer_is_handed_out_again_only_after_its_copy_has_finished() -> None:
    waited: list[str] = []
    buffers = StagingBuffers((4, 2), torch.uint8, 2, pinned=False)
    first, _ = buffers.acquire(4)
    buffers.release(first, Fence(waited, "copy from buffer 0"))
    second, _ = buffers.acquire(4)
    assert waited == []  # the other buffer: nothing to wait for
    buffers.release(second, Fence(waited, "copy from buffer 1"))
    again, _ = buffers.acquire(4)
    assert again == first
    assert waited == ["copy from buffer 0"]
    buffers.release(again, None)
    buffers.acquire(4)
    assert waited == ["copy from buffer 0", "copy from buffer 1"]
    buffers.acquire(4)  # buffer 0 again: released without a fence, and its fence was spent
    assert len(waited) == 2


def test_a_batch_larger_than_the_buffers_gets_one_of_its_own() -> None:
    allocate = Allocations()
    buffers = StagingBuffers((4, 2), torch.uint8, 2, pinned=False, allocate=allocate)
    index, rows = buffers.acquire(9)
    assert index == -1
    assert rows.shape == (9, 2)
    assert all(rows.data_ptr() != buffer.data_ptr() for buffer in buffers.buffers)
    buffers.release(index, None)
    assert buffers.acquire(4)[0] == 0  # the turn did not move
