"""run_eagerly: a coroutine that never suspends answers in the caller's stack; one that does becomes a task.

Every test runs under the default asyncio loop and under uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import uvloop

from mailroster.backends.tasks import ensure_task
from mailroster.protocols.eager import run_eagerly

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Iterator[Run]:
    loop_factory = uvloop.new_event_loop if request.param == "uvloop" else asyncio.new_event_loop
    expected = uvloop.Loop if request.param == "uvloop" else asyncio.BaseEventLoop

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=loop_factory) as r:
            assert isinstance(r.get_loop(), expected)
            return r.run(coro)

    yield runner


class Boom(Exception):
    pass


async def no_suspension(value: object) -> object:
    return value


async def tick() -> None:
    """Let the loop run every callback that is ready now (a task's first step, a future's wakeup)."""
    for _ in range(3):
        await asyncio.sleep(0)


# Completing without suspension.


def test_result_returned_directly_without_a_task(run: Run) -> None:
    async def main() -> None:
        before = len(asyncio.all_tasks())
        result = run_eagerly(no_suspension(42))
        assert result == 42
        assert not isinstance(result, asyncio.Task)
        assert len(asyncio.all_tasks()) == before

    run(main())


def test_nested_awaits_that_never_suspend(run: Run) -> None:
    async def inner() -> list[int]:
        return [await no_suspension(1), await no_suspension(2)]  # type: ignore[list-item]

    async def main() -> None:
        before = len(asyncio.all_tasks())
        assert run_eagerly(inner()) == [1, 2]
        assert len(asyncio.all_tasks()) == before

    run(main())


def test_none_result_returned_directly(run: Run) -> None:
    async def main() -> None:
        assert run_eagerly(no_suspension(None)) is None

    run(main())


def test_runs_from_a_plain_callback(run: Run) -> None:
    # The way a protocol uses it: inside data_received, where no task is running.
    async def main() -> None:
        loop = asyncio.get_running_loop()
        answers: asyncio.Future[Any] = loop.create_future()

        def callback() -> None:
            assert asyncio.current_task() is None
            answers.set_result(run_eagerly(no_suspension("hit")))

        loop.call_soon(callback)
        assert await answers == "hit"

    run(main())


def test_exception_before_first_suspension_propagates_to_the_caller(run: Run) -> None:
    async def failing() -> None:
        raise Boom("early")

    async def main() -> None:
        before = len(asyncio.all_tasks())
        with pytest.raises(Boom, match="early"):
            run_eagerly(failing())
        assert len(asyncio.all_tasks()) == before

    run(main())


# Suspending: handed on to a task.


def test_suspending_coroutine_returns_a_task_with_the_result(run: Run) -> None:
    steps: list[str] = []

    async def inner(fut: asyncio.Future[int]) -> int:
        steps.append("before")
        value = await fut
        steps.append("after")
        return value * 2

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        before = len(asyncio.all_tasks())
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        assert steps == ["before"]  # ran up to the suspension in the caller's stack
        assert len(asyncio.all_tasks()) == before + 1
        await tick()
        assert not task.done()
        assert steps == ["before"]
        fut.set_result(21)
        assert await task == 42
        assert steps == ["before", "after"]

    run(main())


def test_resumed_part_runs_inside_the_returned_task(run: Run) -> None:
    async def inner() -> asyncio.Task[Any] | None:
        await asyncio.sleep(0)
        return asyncio.current_task()

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        assert await task is task

    run(main())


def test_bare_yield_sleep_zero(run: Run) -> None:
    steps: list[str] = []

    async def inner() -> str:
        steps.append("a")
        await asyncio.sleep(0)
        steps.append("b")
        await asyncio.sleep(0)
        steps.append("c")
        return "done"

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        assert steps == ["a"]
        assert await task == "done"
        assert steps == ["a", "b", "c"]

    run(main())


def test_several_suspensions_mixing_futures_timers_and_bare_yields(run: Run) -> None:
    async def inner(fut: asyncio.Future[str]) -> list[str]:
        got = [await fut]
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        got.append(await asyncio.get_running_loop().run_in_executor(None, str.upper, "thread"))
        return got

    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.001, fut.set_result, "future")
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        assert await task == ["future", "THREAD"]

    run(main())


def test_exception_after_suspension_is_the_tasks(run: Run) -> None:
    async def inner() -> None:
        await asyncio.sleep(0)
        raise Boom("late")

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        with pytest.raises(Boom, match="late"):
            await task
        assert isinstance(task.exception(), Boom)

    run(main())


def test_failed_future_raises_inside_the_inner_coroutine(run: Run) -> None:
    async def inner(fut: asyncio.Future[None]) -> str:
        try:
            await fut
        except Boom as exc:
            return f"handled {exc}"
        return "not raised"

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        await tick()
        fut.set_exception(Boom("backend"))
        assert await task == "handled backend"

    run(main())


def test_inner_coroutine_awaiting_a_child_task(run: Run) -> None:
    async def child() -> int:
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return 7

    async def inner() -> int:
        return await asyncio.create_task(child()) + 1

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        assert await task == 8

    run(main())


def test_inner_coroutine_awaiting_a_failing_child_task(run: Run) -> None:
    async def child() -> None:
        await asyncio.sleep(0)
        raise Boom("child")

    async def inner() -> None:
        await asyncio.create_task(child())

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        with pytest.raises(Boom, match="child"):
            await task

    run(main())


# Cancellation of the returned task.


def test_cancel_cancels_the_awaited_future(run: Run) -> None:
    seen: list[str] = []

    async def inner(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        await tick()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert fut.cancelled()
        assert seen == ["cancelled"]

    run(main())


def test_cancel_interrupts_an_inner_sleep(run: Run) -> None:
    seen: list[str] = []

    async def inner() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            seen.append("finally")

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        await tick()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert task.cancelled()
        assert seen == ["finally"]

    run(main())


def test_cancel_during_a_bare_yield(run: Run) -> None:
    seen: list[str] = []

    async def inner() -> None:
        try:
            while True:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        await tick()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()
        assert seen == ["cancelled"]

    run(main())


def test_coroutine_that_catches_cancellation_returns_its_value(run: Run) -> None:
    async def inner(fut: asyncio.Future[None]) -> str:
        try:
            await fut
        except asyncio.CancelledError:
            return "cleaned up"
        return "not cancelled"

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        await tick()
        task.cancel()
        assert await task == "cleaned up"
        assert not task.cancelled()
        assert fut.cancelled()

    run(main())


def test_cancel_propagates_to_an_awaited_child_task(run: Run) -> None:
    async def child() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        children: list[asyncio.Task[None]] = []

        async def inner() -> None:
            children.append(asyncio.create_task(child()))
            await children[0]

        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        await tick()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert children[0].cancelled()

    run(main())


def test_cancel_after_the_awaited_future_completed_reaches_the_await(run: Run) -> None:
    # The awaited future finished, but the task has not resumed yet when it is cancelled: the cancellation is
    # delivered to the inner coroutine at its await, as a task would deliver it.
    async def inner(fut: asyncio.Future[int]) -> str:
        try:
            await fut
        except asyncio.CancelledError:
            return "cancelled at the await"
        return "resumed normally"

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        await tick()
        fut.set_result(1)
        task.cancel()
        assert await task == "cancelled at the await"
        assert fut.result() == 1

    run(main())


def test_cancel_right_away_cancels_the_awaited_future(run: Run) -> None:
    seen: list[str] = []

    async def inner(fut: asyncio.Future[None]) -> str:
        try:
            await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "not cancelled"

    async def main() -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        task = run_eagerly(inner(fut))
        assert isinstance(task, asyncio.Task)
        task.cancel()  # before the loop ran the task's first step
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fut.cancelled()
        assert seen == ["cancelled"]

    run(main())


def test_cancel_right_away_reaches_a_bare_yield(run: Run) -> None:
    seen: list[str] = []

    async def inner() -> None:
        try:
            await asyncio.sleep(0)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = run_eagerly(inner())
        assert isinstance(task, asyncio.Task)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled"]

    run(main())


def test_a_backend_that_needs_a_task_gets_one(run: Run) -> None:
    """asyncio.timeout() refuses to run outside a task; ensure_task() hands the request to one first."""

    async def backend_call() -> str:
        await ensure_task()
        async with asyncio.timeout(5):
            await asyncio.sleep(0)
            return "answered"

    async def main() -> None:
        # Called from inside a task (this one), as a per-connection task would: the timeout must still bind to
        # the task that finishes the request, never to the caller's.
        caller = asyncio.current_task()
        task = run_eagerly(backend_call())
        assert isinstance(task, asyncio.Task)
        assert task is not caller
        assert await task == "answered"

    run(main())
    # And from outside any task, as data_received is.
    loop = asyncio.new_event_loop()
    try:
        result: list[object] = []
        loop.call_soon(lambda: result.append(run_eagerly(backend_call())))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert isinstance(result[0], asyncio.Task)
        assert loop.run_until_complete(result[0]) == "answered"
    finally:
        loop.close()
