"""Noticing an HTTP client that went away while its non-streamed request runs.

Starlette cancels a streamed response when the client disconnects, but a plain handler runs to its
end: the gateway would keep the request running (and the decode worker generating) for nobody.
`until_disconnect` runs the handler's work beside a watch on the ASGI receive channel: once the body
has been read, the next message the server delivers is `http.disconnect`, sent when the client
closes the connection. Then the work is cancelled, which closes the request's pipelines and with
them the prefill and decode calls (the workers free the sequence's blocks).
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready; the work was cancelled."""


async def _disconnected(receive: Receive) -> None:
    """Returns when the server reports the client's disconnect (only after the body was read: the
    body's own messages must not be taken from the handler)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """`work`'s result; ClientDisconnected (with `work` cancelled and awaited) when the client goes
    first. Call only once the request body has been read."""
    task = asyncio.ensure_future(work)
    watch = asyncio.create_task(_disconnected(receive), name="http-disconnect-watch")
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this handler itself is cancelled: nothing outlives it
        if not task.done():
            task.cancel()
        watch.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected("the client closed the connection")
    return task.result()
