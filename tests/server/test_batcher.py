"""The batcher's scheduling, with a small real numpy runtime (no model needed).

The runtime computes each frame from its own row's pose, texture and params, so a frame
routed to the wrong caller, or rows mixed inside a batch, changes the pixels the test
checks. The end-to-end tests (test_stream.py, test_api.py) use the real ONNX bundle.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.batcher import FrameBatcher, choose_batch_size, pick_batch_size
from server.metrics import Metrics
from server.runtime.base import FrameBatch, FrameRuntime, RuntimeFailure

SIZE = 8
PARAMS = 5


class NumpyRuntime:
    """frame = clip(128 + 50 * pose[0] + 10 * texture[0] + params[0]), per row."""

    name = "numpy-test"
    precision = "fp32"
    image_size = SIZE
    param_count = PARAMS

    def __init__(self, max_batch: int = 8, delay_s: float = 0.0, fail_on: float | None = None):
        self.max_batch = max_batch
        self.delay_s = delay_s
        self.fail_on = fail_on
        self.calls: list[int] = []
        self.threads: set[str] = set()

    def render(self, poses: np.ndarray, textures: np.ndarray, params: np.ndarray) -> FrameBatch:
        self.calls.append(len(poses))
        self.threads.add(threading.current_thread().name)
        if self.fail_on is not None and np.any(poses[:, 0] == self.fail_on):
            raise RuntimeFailure("numpy-test: asked to fail")
        time.sleep(self.delay_s)
        value = 128 + 50 * poses[:, :1, None] + 10 * textures[:, 0] + params[:, :1, None]
        frames = np.repeat(np.clip(value, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        return FrameBatch(frames=frames, masks=frames[..., 0].copy())

    def close(self) -> None:
        pass


def expected_frame(index: int) -> np.ndarray:
    """The frame of input `index` rendered alone, batch 1."""
    pose, texture, params = inputs(index)
    return NumpyRuntime().render(pose[None], texture[None], params[None]).frames[0]


def inputs(index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pose = np.full(136, index / 100.0, np.float32)
    texture = np.full((3, SIZE, SIZE), (index % 7) / 10.0, np.float32)
    params = np.full(PARAMS, float(index % 5), np.float32)
    return pose, texture, params


def test_numpy_runtime_fits_the_interface() -> None:
    assert isinstance(NumpyRuntime(), FrameRuntime)


async def _render_many(batcher: FrameBatcher, count: int) -> list:
    return await asyncio.gather(*(batcher.render(*inputs(i)) for i in range(count)))


def test_concurrent_frames_share_batches_and_return_to_their_callers() -> None:
    async def main() -> tuple[list, NumpyRuntime, Metrics]:
        runtime = NumpyRuntime(max_batch=8, delay_s=0.01)
        metrics = Metrics()
        batcher = FrameBatcher(runtime, max_batch=4, metrics=metrics)
        batcher.start()
        results = await _render_many(batcher, 10)
        await batcher.close()
        return results, runtime, metrics

    results, runtime, metrics = asyncio.run(main())
    assert len({int(r.frame[0, 0, 0]) for r in results}) > 5  # the frames differ
    for index, result in enumerate(results):
        assert result.frame.shape == (SIZE, SIZE, 3)
        np.testing.assert_array_equal(result.frame, expected_frame(index), err_msg=str(index))
        assert result.batch in (1, 2, 3, 4)
    assert max(runtime.calls) == 4 and sum(runtime.calls) == 10
    assert len(runtime.calls) < 10  # batching happened
    assert runtime.threads == {next(iter(runtime.threads))}  # one worker thread
    assert runtime.threads.pop().startswith("render")
    assert metrics.registry.get_sample_value("avatar_frames_rendered_total") == 10


def test_batch_of_one_never_waits() -> None:
    async def main() -> tuple[float, NumpyRuntime]:
        runtime = NumpyRuntime(max_batch=8)
        batcher = FrameBatcher(runtime, max_batch=1, wait_ms=200)
        batcher.start()
        for _ in range(3):
            batcher.attach()
        started = time.perf_counter()
        for index in range(5):
            await batcher.render(*inputs(index))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return elapsed, runtime

    elapsed, runtime = asyncio.run(main())
    assert runtime.calls == [1] * 5
    assert elapsed < 0.5  # 5 x 200 ms would be 1 s


def test_wait_window_gathers_attached_streams() -> None:
    async def main() -> tuple[list[int], list[int]]:
        runtime = NumpyRuntime(max_batch=8)
        batcher = FrameBatcher(runtime, max_batch=4, wait_ms=1000)
        batcher.start()

        # one stream: never waits
        batcher.attach()
        await batcher.render(*inputs(0))
        single = list(runtime.calls)

        # three streams whose poses arrive 10 ms apart: one batch of three, no full wait
        batcher.attach()
        batcher.attach()

        async def late(index: int):
            await asyncio.sleep(0.01 * index)
            return await batcher.render(*inputs(index))

        started = time.perf_counter()
        await asyncio.gather(*(late(i) for i in range(3)))
        elapsed = time.perf_counter() - started
        await batcher.close()
        return single, runtime.calls[1:], elapsed

    single, three, elapsed = asyncio.run(main())
    assert single == [1]
    assert three == [3]
    assert elapsed < 0.8  # the window closed when the third stream's pose came


def test_failures_reach_every_caller_and_the_batcher_goes_on() -> None:
    async def main():
        runtime = NumpyRuntime(max_batch=4, fail_on=0.03)
        batcher = FrameBatcher(runtime, max_batch=4)
        batcher.start()
        outcomes = await asyncio.gather(
            *(batcher.render(*inputs(i)) for i in range(5)), return_exceptions=True
        )
        after = await batcher.render(*inputs(7))
        await batcher.close()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    failed = [o for o in outcomes if isinstance(o, RuntimeFailure)]
    assert failed and "asked to fail" in str(failed[0])
    np.testing.assert_array_equal(after.frame, expected_frame(7))


def test_cancelled_callers_are_skipped_and_close_drains() -> None:
    async def main():
        runtime = NumpyRuntime(max_batch=8, delay_s=0.02)
        batcher = FrameBatcher(runtime, max_batch=2)
        batcher.start()
        first = batcher.submit(*inputs(1))
        gone = batcher.submit(*inputs(2))
        queued = [batcher.submit(*inputs(i)) for i in range(3, 6)]
        gone.cancel()
        await asyncio.sleep(0)
        await batcher.close()  # finishes what was queued
        with pytest.raises(RuntimeFailure, match="shutting down"):
            batcher.submit(*inputs(9))
        return [first.result()] + [f.result() for f in queued], runtime.calls

    results, calls = asyncio.run(main())
    assert len(results) == 4 and sum(calls) == 4


def test_batch_size_limits() -> None:
    with pytest.raises(ValueError, match="expected 1..4"):
        FrameBatcher(NumpyRuntime(max_batch=4), max_batch=8)


def test_pick_batch_size_prefers_small_batches_within_tolerance() -> None:
    # per-frame time flat (as on CPUs): batch 1 is kept
    assert pick_batch_size({1: 10.0, 2: 9.8, 4: 9.5, 8: 9.9}) == 1
    # larger batches clearly faster per frame (as on GPUs): the smallest near the best
    assert pick_batch_size({1: 10.0, 2: 6.0, 4: 3.1, 8: 3.0}) == 4
    assert pick_batch_size({1: 10.0, 2: 6.0, 4: 3.1, 8: 3.0}, tolerance=0.0) == 8


def test_choose_batch_size_measures_each_power_of_two() -> None:
    runtime = NumpyRuntime(max_batch=8, delay_s=0.002)
    chosen, table = choose_batch_size(runtime, limit=6, repeats=2)
    assert sorted(table) == [1, 2, 4]
    assert chosen in table and all(ms > 0 for ms in table.values())
    # a warm-up call and `repeats` timed calls per size
    assert runtime.calls == [1, 1, 1, 2, 2, 2, 4, 4, 4]
