"""The hand-off between front-end processes and the model process (app.handoff): the slab
allocator, and a real model-process server and front-end client over a real Unix socket and a
real shared-memory slab (two mappings of one memfd), with real batchers computing plain Python
functions (no torch)."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.batching import (
    Batcher,
    BatcherClosed,
    BatchFailed,
    DeadlineExceeded,
    QueueFull,
)
from app.config import Settings
from app.handoff import (
    HandoffClient,
    HandoffServer,
    RemoteArrival,
    SlabAllocator,
    create_slab,
    map_slab,
    merge_expositions,
)
from app.preprocessing import BadImage, DecodePool, ImageTransform
from app.state import ServedModel, Serving
from app.values import EncodedImage, Item, ModelFacts, PreprocessingFacts, TopK

# Bounds a wait for something the other side does; never reached when the code works.
PATIENCE_S = 10.0


# --- the allocator ---------------------------------------------------------------------------


def test_the_allocator_hands_out_disjoint_aligned_regions_until_full() -> None:
    slab = SlabAllocator(1024)
    first, second = slab.allocate(100), slab.allocate(200)
    assert first == 0
    assert second == 128  # 100 rounded up to the 64-byte alignment
    assert slab.used == 128 + 256
    assert slab.allocate(1024) is None  # does not fit in what is left
    rest = slab.allocate(1024 - 384)
    assert rest == 384
    assert slab.allocate(1) is None


def test_freed_regions_are_reused_and_merge_with_their_neighbours() -> None:
    slab = SlabAllocator(64 * 4)
    regions = [slab.allocate(64) for _ in range(4)]
    assert regions == [0, 64, 128, 192]
    assert slab.allocate(64) is None
    slab.free(64)
    assert slab.allocate(64) == 64  # the freed hole is reused
    slab.free(64)
    slab.free(128)  # merges with the free 64
    assert slab.allocate(128) == 64
    for offset in (0, 64, 192):
        slab.free(offset)
    assert slab.used == 0
    assert slab.allocate(64 * 4) == 0  # everything merged back into one extent


def test_freeing_a_region_twice_is_an_error() -> None:
    slab = SlabAllocator(256)
    offset = slab.allocate(10)
    assert offset is not None
    slab.free(offset)
    with pytest.raises(KeyError):
        slab.free(offset)


# --- a model process and a front-end, in one process -----------------------------------------


@dataclass
class Model:
    """A plain compute function that records what it was given, optionally held at a gate."""

    gate: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    seen: list[Any] = field(default_factory=list)
    fail: bool = False

    def __post_init__(self) -> None:
        self.gate.set()

    def compute(self, items: list[Item]) -> Sequence[TopK | Exception]:
        self.entered.set()
        assert self.gate.wait(PATIENCE_S), "the test never opened the gate"
        if self.fail:
            raise RuntimeError("the forward pass failed")
        answers: list[TopK | Exception] = []
        for item in items:
            payload = item.array
            if isinstance(payload, EncodedImage):
                self.seen.append(payload)
                if payload.data.startswith(b"bad"):
                    answers.append(BadImage(payload.name, "cannot decode it on the device"))
                else:
                    answers.append(TopK([float(len(payload.data))], [item.top_k]))
            else:
                self.seen.append(payload.copy())
                answers.append(TopK([float(payload.astype(np.float64).sum())], [item.top_k]))
        return answers


def facts(name: str) -> ModelFacts:
    return ModelFacts(
        name=name,
        version="1",
        source="test",
        architecture=None,
        labels=tuple(str(i) for i in range(10)),
        input_size=(3, 4, 4),
        device="cpu",
        dtype="float32",
        compiled_batch_sizes=(),
        folded_batchnorms=0,
        preprocessing=PreprocessingFacts(None, 4, "bilinear", "RGB", (0.0,) * 3, (1.0,) * 3),
    )


class RunnerStub:
    """The ``Runner`` face ServedModel wants; the batcher computes ``Model.compute``."""

    def __init__(self, name: str) -> None:
        self._facts = facts(name)
        self.executor = ThreadPoolExecutor(1)

    def predict(self, items: list[Item]) -> Any:
        raise AssertionError(f"the batcher computes, not this ({len(items)} items)")

    def submit(self, items: list[Item]) -> Any:
        raise AssertionError(f"the batcher computes, not this ({len(items)} items)")

    def describe(self) -> ModelFacts:
        return self._facts

    def close(self) -> None:
        self.executor.shutdown()


@dataclass
class Pair:
    server: HandoffServer
    client: HandoffClient
    serving: Serving
    models: dict[str, Model]

    def batcher(self, name: str) -> Batcher[Item, TopK]:
        return self.serving.models[name].batcher


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE_S
    while not condition():
        assert loop.time() < deadline, f"never happened: {what}"
        await asyncio.sleep(0.005)


@asynccontextmanager
async def handoff(
    slab_bytes: int = 1 << 20, max_queue_size: int = 16, max_batch_size: int = 4
) -> AsyncIterator[Pair]:
    """A model process's hand-off server with models ``a`` and ``b``, and a front-end client
    connected to it over a Unix socket, sharing a memfd slab mapped twice."""
    models = {"a": Model(), "b": Model()}
    served = {}
    for name, model in models.items():
        runner = RunnerStub(name)
        batcher: Batcher[Item, TopK] = Batcher(
            model.compute,
            runner.executor,
            max_batch_size=max_batch_size,
            max_delay_s=0.0,
            max_queue_size=max_queue_size,
            name=name,
        )
        batcher.start()
        transform = ImageTransform(None, 4, "RGB", Image.Resampling.BILINEAR)
        served[name] = ServedModel(runner, batcher, transform, facts(name))
    serving = Serving(Settings(), served, DecodePool(1), ready=True)
    fd, owner_slab = create_slab(slab_bytes)
    front_slab = map_slab(fd, slab_bytes)
    server = HandoffServer(serving, {0: owner_slab}, lambda: b"")
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "handoff.sock")
        await server.start(path)
        client = HandoffClient(front_slab)
        await client.connect(path, 0)
        try:
            yield Pair(server, client, serving, models)
        finally:
            for compute in models.values():
                compute.gate.set()
            await client.close()
            await server.close()
            for served_model in served.values():
                await served_model.batcher.stop()
                served_model.classifier.close()
            serving.decode_pool.shutdown()


def test_arrays_and_encoded_images_arrive_byte_for_byte() -> None:
    rng = np.random.default_rng(7)
    uint8 = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    # Odd sizes, and a float32 array that is not contiguous in the caller's hands.
    odd = rng.integers(0, 256, size=(5, 3, 1), dtype=np.uint8)
    float32 = rng.standard_normal((4, 4, 3)).astype(np.float32).transpose(2, 0, 1)
    jpeg = EncodedImage("cat.jpg", bytes(rng.integers(0, 256, 1001, dtype=np.uint8)), 6, (9, 7))

    async def main() -> None:
        async with handoff() as pair:
            batcher = pair.client.batchers["a"]
            items = [Item(uint8, 1), Item(jpeg, 2), Item(odd, 3), Item(float32, 4)]
            answers = await batcher.submit(items, timeout=PATIENCE_S)
            seen = pair.models["a"].seen
            assert len(seen) == 4
            sent_arrays: list[np.ndarray] = [uint8, odd, float32]
            arrays: list[np.ndarray] = [seen[0], seen[2], seen[3]]
            for sent, got in zip(sent_arrays, arrays, strict=True):
                assert got.dtype == sent.dtype
                assert got.shape == sent.shape
                assert got.tobytes() == np.ascontiguousarray(sent).tobytes()
            assert seen[1] == jpeg  # name, bytes, orientation and size
            # The answers come back in order, as computed in the model process.
            assert [a.indices for a in answers] == [[1], [2], [3], [4]]
            assert answers[0].scores == [float(uint8.astype(np.float64).sum())]
            assert answers[1].scores == [1001.0]
            await until(lambda: pair.client.allocator.used == 0, "the region is released")

    asyncio.run(main())


def test_the_model_process_reads_the_slab_without_copying() -> None:
    """The batcher's arrays are views of the shared slab: bytes the front-end writes there
    are the bytes the model reads."""

    async def main() -> None:
        async with handoff() as pair:
            kept: list[np.ndarray] = []

            def keep(items: list[Item]) -> list[TopK]:
                kept.extend(item.array for item in items)  # type: ignore[misc]
                return [TopK([0.0], [0]) for _ in items]

            pair.batcher("a")._compute = keep  # the compute function, swapped for this test
            image = np.zeros((4, 4, 3), np.uint8)
            await pair.client.batchers["a"].submit([Item(image, 1)], timeout=PATIENCE_S)
            view = kept[0]
            assert not view.flags.owndata
            pair.client._view[0] = 200  # written by the front-end, after the hand-off
            assert view[0, 0, 0] == 200

    asyncio.run(main())


@pytest.mark.parametrize(
    ("arrange", "error"),
    [("fail", BatchFailed), ("timeout", DeadlineExceeded), ("closed", BatcherClosed)],
)
def test_the_batchers_errors_come_back_as_the_same_exceptions(
    arrange: str, error: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest keeps the records the batcher logs, and a failed batch's record holds its images
    # (through the traceback's frames): their region would never be released.
    monkeypatch.setattr(logging.getLogger("evalserve.batching"), "propagate", False)

    async def main() -> None:
        async with handoff() as pair:
            model = pair.models["a"]
            timeout = PATIENCE_S
            if arrange == "fail":
                model.fail = True
            elif arrange == "timeout":
                model.gate.clear()
                timeout = 0.05
            else:
                await pair.batcher("a").stop()
            with pytest.raises(error):
                await pair.client.batchers["a"].submit(
                    [Item(np.zeros((4, 4, 3), np.uint8), 1)], timeout=timeout
                )
            model.gate.set()
            model.fail = False
            if arrange != "closed":
                # The batcher holds its latest batch until the next one: send one.
                await pair.client.batchers["a"].submit(
                    [Item(np.zeros((4, 4, 3), np.uint8), 1)], timeout=PATIENCE_S
                )
            await until(lambda: pair.client.allocator.used == 0, "the region is released")

    asyncio.run(main())


def test_an_image_the_device_cannot_decode_comes_back_as_bad_image() -> None:
    async def main() -> None:
        async with handoff() as pair:
            bad = EncodedImage("broken.jpg", b"bad jpeg", 1, (4, 4))
            with pytest.raises(BadImage) as raised:
                await pair.client.batchers["a"].submit([Item(bad, 1)], timeout=PATIENCE_S)
            assert raised.value.name == "broken.jpg"
            assert "cannot decode it on the device" in str(raised.value)

    asyncio.run(main())


def test_a_full_queue_in_the_model_process_is_queue_full_in_the_front_end() -> None:
    async def main() -> None:
        async with handoff(max_queue_size=2, max_batch_size=1) as pair:
            model = pair.models["a"]
            model.gate.clear()
            batcher = pair.client.batchers["a"]
            image = np.zeros((4, 4, 3), np.uint8)
            # One image computing (held at the gate), two filling the queue.
            first = asyncio.ensure_future(batcher.submit([Item(image, 1)], PATIENCE_S))
            await until(model.entered.is_set, "the first image is computing")
            queued = asyncio.ensure_future(batcher.submit([Item(image, 1)] * 2, PATIENCE_S))
            await until(lambda: pair.batcher("a").depth == 2, "two images are queued")
            with pytest.raises(QueueFull):
                await batcher.submit([Item(image, 1)], PATIENCE_S)
            model.gate.set()
            assert len(await first) == 1
            assert len(await queued) == 2

    asyncio.run(main())


def test_a_full_slab_is_refused_at_once_and_its_space_comes_back() -> None:
    async def main() -> None:
        # Room for the 4000 bytes (4032 with alignment) and 64 more: not 8x8x3.
        async with handoff(slab_bytes=4096) as pair:
            model = pair.models["a"]
            model.gate.clear()
            batcher = pair.client.batchers["a"]
            big = np.zeros((4000,), np.uint8)
            held = asyncio.ensure_future(batcher.submit([Item(big, 1)], PATIENCE_S))
            await until(model.entered.is_set, "the first request is computing")
            with pytest.raises(QueueFull, match="hand-off memory is full"):
                await batcher.submit([Item(np.zeros((8, 8, 3), np.uint8), 1)], PATIENCE_S)
            model.gate.set()
            await held
            await until(lambda: pair.client.allocator.used == 0, "the region is released")
            await batcher.submit([Item(big, 1)], PATIENCE_S)  # the whole slab is usable again

    asyncio.run(main())


def test_a_cancelled_request_leaks_no_slab_space_and_its_queued_images_are_never_computed() -> None:
    async def main() -> None:
        async with handoff(max_batch_size=1) as pair:
            model = pair.models["a"]
            model.gate.clear()
            batcher = pair.client.batchers["a"]
            plug = asyncio.ensure_future(
                batcher.submit([Item(np.full((4, 4, 3), 1, np.uint8), 1)], PATIENCE_S)
            )
            await until(model.entered.is_set, "the plug is computing")
            queued = asyncio.ensure_future(
                batcher.submit([Item(np.full((4, 4, 3), 2, np.uint8), 1)], PATIENCE_S)
            )
            await until(lambda: pair.batcher("a").depth == 1, "the second image is queued")
            # Both clients leave: one while its image computes, one while it waits.
            queued.cancel()
            plug.cancel()
            await asyncio.gather(plug, queued, return_exceptions=True)
            # Round trip through the model process: it has seen the cancellations by now.
            await pair.client.batchers["b"].submit(
                [Item(np.zeros((4, 4, 3), np.uint8), 1)], PATIENCE_S
            )
            # Neither region is reused yet: the forward pass may still read the plug's, and the
            # batcher drops the cancelled image only when it reaches it.
            assert pair.client.allocator.regions == 2
            model.gate.set()
            # The batcher holds its latest batch until the next one: send one.
            await batcher.submit([Item(np.full((4, 4, 3), 3, np.uint8), 1)], PATIENCE_S)
            await until(lambda: pair.client.allocator.used == 0, "every region is released")
            # The cancelled queued image was never computed.
            assert [int(seen[0, 0, 0]) for seen in model.seen] == [1, 3]

    asyncio.run(main())


def test_announced_images_count_in_the_model_process_until_settled() -> None:
    async def main() -> None:
        async with handoff() as pair:
            remote = pair.client.batchers["a"]
            owner = pair.batcher("a")
            arrival = remote.announce(3)
            assert isinstance(arrival, RemoteArrival)
            await until(lambda: owner.announced == 3, "the announcement reaches the batcher")
            await until(lambda: remote.announced == 3, "the status reports it back")
            arrival.cancel()
            await until(lambda: owner.announced == 0, "the cancellation settles it")
            second = remote.announce(1)
            await remote.submit([Item(np.zeros((4, 4, 3), np.uint8), 1)], PATIENCE_S, second)
            await until(lambda: owner.announced == 0, "the submit settles it")
            second.cancel()  # already settled: nothing more
            await pair.client.batchers["b"].submit(
                [Item(np.zeros((4, 4, 3), np.uint8), 1)], PATIENCE_S
            )
            assert owner.announced == 0

    asyncio.run(main())


def test_when_the_model_process_goes_away_requests_fail_and_the_batchers_are_dead() -> None:
    async def main() -> None:
        async with handoff() as pair:
            lost: list[str] = []
            pair.client._on_lost = lost.append
            model = pair.models["a"]
            model.gate.clear()
            batcher = pair.client.batchers["a"]
            waiting = asyncio.ensure_future(
                batcher.submit([Item(np.zeros((4, 4, 3), np.uint8), 1)], PATIENCE_S)
            )
            await until(model.entered.is_set, "the request is computing")
            await pair.server.close()
            with pytest.raises(Exception, match="the model process is gone"):
                await waiting
            assert lost
            assert not batcher.alive
            assert pair.client.allocator.used == 0

    asyncio.run(main())


def test_merged_expositions_sum_shared_samples() -> None:
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from support import metric

    texts = []
    for count in (2, 3):
        registry = CollectorRegistry()
        Counter("hits", "Hits.", ["model"], registry=registry).labels("a").inc(count)
        texts.append(generate_latest(registry))
    merged = merge_expositions(*texts).decode()
    assert metric(merged, "hits_total", model="a") == 5.0
