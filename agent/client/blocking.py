"""`BlockingClient`, the whole API for blocking code (the socket-level `Client`: dealer.py).

`BlockingClient` is a thin wrapper over `AsyncClient` (agent/client/aio.py): the same
methods, each run to its end on an event loop in a thread of its own, so there is one
implementation of matching, subscribing and waiting, and blocking code gets all of it.
"""

from __future__ import annotations

import asyncio
import threading


class BlockingClient:
    """The AsyncClient's API for blocking code: the same methods, same errors, same waits.

    Each call runs the AsyncClient's coroutine on an event loop in a thread of this client's
    own and blocks until it ends; Ctrl-C (KeyboardInterrupt) while blocked cancels that
    coroutine and is raised again. `on_progress` callbacks run in that thread.

        with BlockingClient("tcp://127.0.0.1:5670") as agent:
            agent.copy_image(src, dst)          # returns once dst is LEGAL, or raises
    """

    def __init__(self, endpoint: str, events_endpoint: str | None = None, *,
                 timeout: float = 10.0, client_key: str | None = None,
                 server_key: str | None = None):
        from agent.client.aio import AsyncClient

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="hostagent-client")
        self._thread.start()

        async def make():
            return AsyncClient(endpoint, events_endpoint, timeout=timeout,
                               client_key=client_key, server_key=server_key)
        try:
            self.aio = self._run(make())
        except BaseException:
            self._stop()
            raise
        self.endpoint, self.events_endpoint = endpoint, self.aio.events_endpoint
        self.timeout = timeout

    def _run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except BaseException:
            if not fut.done():  # interrupted (Ctrl-C): stop the coroutine, let it clean up
                self._loop.call_soon_threadsafe(fut.cancel)
                try:
                    fut.result(5)
                except BaseException:
                    pass
            raise

    def new_id(self) -> str:
        return self.aio.new_id()

    def call(self, method: str, params=None, task_id=None, timeout: float | None = None):
        return self._run(self.aio.call(method, params, task_id, timeout))

    def notify(self, method: str, params=None, timeout: float | None = None) -> None:
        return self._run(self.aio.notify(method, params, timeout))

    def subscribe(self, topics=None, *, boot_id: str | None = None, rcvhwm: int | None = None):
        """A BlockingSubscription: iterate it, or `next(timeout)`; close it when done."""
        async def make():
            return self.aio.subscribe(topics, boot_id=boot_id, rcvhwm=rcvhwm)
        return BlockingSubscription(self, self._run(make()))

    def wait_task(self, task_id, **options):
        return self._run(self.aio.wait_task(task_id, **options))

    def copy_image(self, src: dict, dst: dict, wait: bool = True, **options):
        return self._run(self.aio.copy_image(src, dst, wait, **options))

    def continue_copy(self, dst: dict, src: dict | None = None, wait: bool = True, **options):
        return self._run(self.aio.continue_copy(dst, src, wait, **options))

    def merge_image(self, base: dict, top_volume_id: str, wait: bool = True, **options):
        return self._run(self.aio.merge_image(base, top_volume_id, wait, **options))

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self.aio.close())
            finally:
                self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class BlockingSubscription:
    def __init__(self, client: BlockingClient, sub):
        self._client, self.sub = client, sub

    def next(self, timeout: float | None = None):
        """The next matching Event, or None if none arrives within `timeout` seconds."""
        return self._client._run(self.sub.next(timeout))

    def __iter__(self):
        return self

    def __next__(self):
        return self.next()

    def close(self) -> None:
        async def close():
            self.sub.close()
        if self._client._thread.is_alive():
            self._client._run(close())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
