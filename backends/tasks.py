"""Backends that time their I/O with ``asyncio.timeout`` need to run inside a task.

The protocols run each request eagerly (``mailroster.protocols.eager``): up to its first suspension in the
caller's stack, so that a cache hit is answered without a task. That first step runs either outside any task,
where ``asyncio.timeout()`` refuses to work, or inside the *caller's* task, where a timeout would cancel the
wrong task. A backend about to do I/O — which suspends anyway — first calls :func:`ensure_task`: during an eager
first step (marked by :data:`EAGER_STEP`) or outside a task it yields once, the eager runner hands the rest of the
request to its own task, and the backend goes on inside it. Inside that task it costs nothing.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Generator
from contextvars import ContextVar

#: True while ``run_eagerly`` drives a coroutine's first step in its caller's stack.
EAGER_STEP: ContextVar[bool] = ContextVar("mailroster_eager_step", default=False)


@types.coroutine
def _yield() -> Generator[None, None, None]:
    yield


async def ensure_task() -> None:
    """Make sure the caller runs inside an asyncio task (see the module docstring)."""
    if EAGER_STEP.get() or asyncio.current_task() is None:
        await _yield()
