"""A request body as it arrives, read with flow control: the connection stops reading past ``high`` bytes
waiting for the handler, and resumes when it has taken them."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final, Protocol

HIGH_WATER: Final = 256 * 1024


class BodyError(ConnectionResetError):
    """The client's body did not arrive whole: the connection closed or went silent past its deadline."""


class Sink(Protocol):
    """Where a body's bytes go instead of the buffer while it is set (the callback exchange sends them
    upstream as they arrive)."""

    def piece(self, data: bytes) -> None: ...
    def failed(self, exc: BaseException) -> None: ...


class Body:
    """The subset of aiohttp's ``StreamReader`` the data path reads: ``read(n)``, ``readany()``,
    ``iter_chunked(n)``, ``at_eof()``.

    ``on_first_read`` runs once before the handler first waits for bytes (it sends ``100 Continue``);
    ``pause``/``resume`` stop and restart the transport's reading. While ``sink`` is set, each piece goes to
    it as it arrives (nothing is buffered; the sink does its own flow control) and so does the body's error.
    """

    # Made for every request: the state every body starts in is the class's (no ``__slots__``, for that).
    _size = 0
    _eof = False
    _exc: BaseException | None = None
    _waiter: asyncio.Future[None] | None = None
    _paused = False
    _high = HIGH_WATER
    on_first_read: Callable[[], None] | None = None
    received = 0
    discard = False  # the answer is out: drop what still arrives
    sink: Sink | None = None

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None], high: int = HIGH_WATER):
        self._chunks: deque[bytes] = deque()
        self._pause, self._resume = pause, resume
        if high != HIGH_WATER:
            self._high = high

    # ---- the connection's side --------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self._eof:  # (each request has its own body: bytes past its end belong to no one)
            raise RuntimeError("request body bytes after the end of the body")
        self.received += len(data)
        if self.discard:
            return
        if self.sink is not None:
            self.sink.piece(data)
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._high and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        if self._waiter is not None:  # (_wake's test: most bodies end before anyone waits for them)
            self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._wake()
            if self.sink is not None:
                self.sink.failed(exc)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # ---- the handler's side -----------------------------------------------------------------------

    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def is_eof(self) -> bool:
        return self._eof

    def exception(self) -> BaseException | None:
        return self._exc

    async def _wait(self) -> None:
        if self.on_first_read is not None:
            cb, self.on_first_read = self.on_first_read, None
            cb()
        if self._chunks or self._eof:
            return
        if self._exc is not None:
            raise self._exc
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _take(self, n: int) -> bytes:
        chunk = self._chunks.popleft()
        if 0 < n < len(chunk):
            self._chunks.appendleft(chunk[n:])
            chunk = chunk[:n]
        self._size -= len(chunk)
        if self._paused and self._size <= self._high // 2:
            self._paused = False
            self._resume()
        return chunk

    async def _arrived(self) -> bool:
        """Wait until bytes are buffered; False at the end of the body (the body's error is raised)."""
        while not self._chunks:
            if self._eof:
                return False
            if self._exc is not None:
                raise self._exc
            await self._wait()
        return True

    async def readany(self) -> bytes:
        """The next bytes that arrived (``b""`` at the end)."""
        return self._take(-1) if await self._arrived() else b""

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of the body for ``n < 0``); ``b""`` at the end."""
        if n < 0:
            parts = []
            while chunk := await self.readany():
                parts.append(chunk)
            return b"".join(parts)
        if n == 0:
            return b""
        return self._take(n) if await self._arrived() else b""

    async def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        while chunk := await self.read(n):
            yield chunk
