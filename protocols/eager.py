"""Run a coroutine eagerly: up to its first real suspension, in the caller's stack.

A cache hit completes without ever suspending, so it is answered inside ``data_received`` with no task
created and no extra trip through the event loop. Only a coroutine that really waits (a cache miss that goes to
a backend) is handed on to a task, which resumes it exactly where it stopped. Python 3.12's eager task factory
does the same; this works on 3.11 and under uvloop.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

from mailroster.backends.tasks import EAGER_STEP

T = TypeVar("T")

log = logging.getLogger(__name__)


def run_eagerly(coro: Coroutine[Any, Any, T]) -> T | asyncio.Task[T]:
    """Return the coroutine's result if it completes without suspending, else a task that finishes it.

    An exception raised before the first suspension propagates to the caller. Callers tell the two results
    apart with ``isinstance(result, asyncio.Task)``; ``T`` must therefore not itself be a task.
    """
    token = EAGER_STEP.set(True)
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        EAGER_STEP.reset(token)
    started: list[bool] = []
    task = asyncio.get_running_loop().create_task(_resume(coro, yielded, started))
    task.add_done_callback(lambda t: _cancel_unstarted(t, coro, yielded, started))
    return task


def _cancel_unstarted(
    task: asyncio.Task[Any], coro: Coroutine[Any, Any, Any], yielded: Any, started: list[bool]
) -> None:
    """A task cancelled before its first step never ran ``_resume``: pass the cancellation on from here."""
    if started or not task.cancelled():
        return
    if isinstance(yielded, asyncio.Future):
        yielded.cancel()
    try:
        coro.throw(asyncio.CancelledError())
    except (StopIteration, asyncio.CancelledError):
        return
    except Exception:
        log.exception("coroutine failed while being cancelled")
        return
    coro.close()  # it awaited again while cleaning up: nothing is left to drive it


@types.coroutine
def _bare_yield() -> Generator[None, None, None]:
    yield


async def _resume(coro: Coroutine[Any, Any, T], yielded: Any, started: list[bool]) -> T:
    """Drive ``coro`` on from a suspension at ``yielded`` (a future it awaits, or ``None`` for a bare yield)."""
    started.append(True)
    while True:
        throw: BaseException | None = None
        if yielded is None:
            try:
                await _bare_yield()
            except asyncio.CancelledError as exc:
                throw = exc
        else:
            # The inner coroutine marked the future as blocking for the task that would receive it. Take it over
            # as a task does, then await it here: this task waits for it and, when cancelled, cancels it, exactly
            # as if the task had driven the inner coroutine itself.
            yielded._asyncio_future_blocking = False
            try:
                await yielded
            except asyncio.CancelledError as exc:
                if not yielded.cancelled():
                    throw = exc
            except BaseException:  # noqa: BLE001,S110 - the inner coroutine reads the outcome via result()
                pass
        try:
            yielded = coro.send(None) if throw is None else coro.throw(throw)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
