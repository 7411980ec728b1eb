"""``/mcp`` on the agentbus app, started on first use.

Why lazily: the MCP SDK costs ~0.4 s of imports and its session manager a task group, paid
by every bus process at start although most never see an MCP client. :class:`LazyMcp` is
what the app routes ``/mcp`` to; the first request imports and starts the real
:class:`~agentbus.mcp.server.McpMount` in a task that lives until the app's lifespan ends
(the SDK's session manager must be entered and exited in one task).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.types import Receive, Scope, Send

from agentbus.settings import Settings

if TYPE_CHECKING:
    from agentbus.mcp.server import McpMount


class LazyMcp:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.mount: McpMount | None = None
        self._app: Any = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def run(self, app: Any) -> AsyncIterator[None]:
        """Entered by the app's lifespan: stops the MCP endpoint (if it started) at shutdown."""
        self._app = app
        try:
            yield
        finally:
            self._stop.set()
            if self._task is not None:
                await self._task

    async def _start(self) -> McpMount:
        async with self._lock:
            if self._task is None:
                from agentbus.mcp.server import McpMount

                self.mount = McpMount(self.settings)
                self._task = asyncio.create_task(self._serve(self.mount), name="agentbus-mcp")
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            self._task.result()  # it failed to start: raise why
        assert self.mount is not None
        return self.mount

    async def _serve(self, mount: McpMount) -> None:
        async with mount.run(self._app):
            self._ready.set()
            await self._stop.wait()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        mount = self.mount if self._ready.is_set() else await self._start()
        await mount(scope, receive, send)
