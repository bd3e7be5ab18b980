"""Upload and download rate limits (volunteers share home connections).

A limiter is a token bucket shared by every stream of one direction of a peer: each read or write
of at most one slice (about 50 ms of the rate, 16 KiB to 1 MiB) takes its bytes from the bucket, and
waits while the bucket is in debt. Larger slices at higher rates keep the per-write cost down.
Reads are limited after they happen; TCP's and yamux's flow control then slow the sender down.
"""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

MIN_SLICE, MAX_SLICE = 16 * 1024, 1 << 20


class RateLimiter:
    """``bytes_per_second=None`` means unlimited. The bucket holds at most one slice."""

    def __init__(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = bytes_per_second
        self.slice = MAX_SLICE if self.rate is None else int(min(MAX_SLICE, max(MIN_SLICE, self.rate * 0.05)))
        self.burst = self.slice
        self._tokens = 0.0
        self._updated: float | None = None
        self.total = 0  # bytes that went through

    @classmethod
    def from_mbit(cls, mbit: float | None) -> "RateLimiter":
        return cls(None if mbit is None else mbit * 1e6 / 8)

    async def consume(self, n: int) -> None:
        self.total += n
        if self.rate is None:
            return
        now = trio.current_time()
        if self._updated is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now
        self._tokens -= n
        if self._tokens < 0:
            await trio.sleep(-self._tokens / self.rate)


class ThrottledStream:
    """A libp2p stream whose reads and writes go through the peer's limiters."""

    def __init__(self, stream: INetStream, upload: RateLimiter, download: RateLimiter) -> None:
        self.stream, self.upload, self.download = stream, upload, download
        self.last_read = trio.current_time()

    async def read(self, n: int = -1) -> bytes:
        cap = self.download.slice
        data = await self.stream.read(min(n, cap) if n and n > 0 else cap)
        self.last_read = trio.current_time()
        await self.download.consume(len(data))
        return data

    async def write(self, data: bytes) -> None:
        if self.upload.rate is None:  # large writes are cheaper (measured-facts.md)
            await self.upload.consume(len(data))
            await self.stream.write(data)
            return
        view, size = memoryview(data), self.upload.slice
        for start in range(0, len(view), size):
            piece = view[start:start + size]
            await self.upload.consume(len(piece))
            await self.stream.write(bytes(piece))

    async def close(self) -> None:
        await self.stream.close()

    async def reset(self) -> None:
        await self.stream.reset()
