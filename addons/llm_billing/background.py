"""Background loops of the addons: started in ``running``, stopped in ``done``."""

from __future__ import annotations

import asyncio
import contextlib


async def pause(stopping: asyncio.Event, seconds: float) -> bool:
    """Sleep ``seconds`` between two rounds of a loop; True (at once) once it is stopping."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)
    return stopping.is_set()


async def stop(task: asyncio.Task | None, stopping: asyncio.Event | None = None,
               grace: float = 0.0) -> None:
    """Stop a background loop and wait until it has ended (None: never started).

    A loop that pauses with ``pause(stopping, …)`` is first asked to stop and given
    ``grace`` seconds to finish its round — work half done outside the process (an
    alert delivered but not yet marked sent) would otherwise be done twice after a
    restart. Whatever still runs then is cancelled."""
    if task is None:
        return
    if stopping is not None:
        stopping.set()
        await asyncio.wait({task}, timeout=grace)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
