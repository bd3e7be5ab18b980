"""Downloading a version's chunks from many peers at once, the way BitTorrent moves files.

Each source peer gets one pipelined stream with a sender and a receiver task. The sender keeps
``depth`` requests in flight (more for faster peers) and picks chunks **rarest first** among
those the peer holds; since faster peers come back for work sooner, work shifts to them. In the
**endgame** (every missing chunk requested) an idle peer takes over a chunk queued at a peer that
would deliver it later, and the other request is cancelled (free while still queued there).

A chunk is verified against its id before it is stored; one that fails is fetched elsewhere and
its sender gets a strike (two and it is dropped). At most ``MAX_SOURCES`` sources serve at once, the
first of those named (holders list the most complete first, random among equals, so joiners spread
over them); an idle source is asked again what it holds after 1 s, then twice as long after each
answer that brought nothing new, up to 8 s. A source that breaks off, or sends nothing for
``stall_timeout`` seconds with requests outstanding, is dropped: it costs only its requests in
flight, which go back to the pool. Verified chunks are on disk at once, so they are served to
others and survive a restart (the next download skips them).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from averaging.lanes import Lanes
from averaging.wire import FrameError, read_frame, write_frame
from bootstrap.chunk_protocol import MAX_HAVE_IDS, MAX_STORED, ProtocolError, ask_have, open_chunk_stream, \
    parse_have, send_have
from bootstrap.chunk_store import ChunkError, ChunkStore
from bootstrap.manifest import ChunkRef, SignedManifest
from bootstrap.rate_limit import RateLimiter, ThrottledStream

log = logging.getLogger(__name__)

MAX_STRIKES = 2
MAX_SOURCES = 16  # sources used at once: beyond, more only add connections and `have` traffic
REASK_SECONDS = 1.0  # how soon an idle source is asked again what it holds (it may be downloading too) ...
MAX_REASK_SECONDS = 8.0  # ... twice as long after each answer that brought nothing new, up to this

# (stored bytes done, stored bytes to fetch, sources active)
ProgressCallback = Callable[[int, int, int], None]


class DownloadError(Exception):
    """The sources ran out (or the deadline passed) with chunks still missing."""


@dataclass
class DownloadStats:
    size_bytes: int  # stored bytes of the version
    reused_bytes: int = 0  # already held before the download
    bytes_received: int = 0  # chunk payloads received, duplicates and bad ones included
    duplicate_bytes: int = 0
    bad_chunks: int = 0
    per_peer: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class _Source:
    def __init__(self, peer: str, stream: ThrottledStream) -> None:
        self.peer, self.stream = peer, stream
        self.has: set[bytes] = set()
        self.inflight: OrderedDict[bytes, float] = OrderedDict()  # chunk -> time requested, in reply order
        self.expect: list[tuple[str, object]] = []  # replies due, in order: ("get", id) | ("have", ids)
        self.cancels: list[bytes] = []
        self.bytes = 0
        self.started = time.monotonic()
        self.head_since = self.started  # when the chunk at the head of its queue began to come
        self.strikes = 0
        self.last_ask = 0.0
        self.ask_every = REASK_SECONDS
        self.error: str | None = None

    @property
    def rate(self) -> float | None:
        elapsed = time.monotonic() - self.started
        return self.bytes / elapsed if self.bytes and elapsed > 0 else None


class SwarmDownload:
    """Fetch the chunks of ``signed`` that ``store`` lacks. Use ``await run(sources)``."""

    def __init__(self, lanes: Lanes, store: ChunkStore, signed: SignedManifest, *, upload: RateLimiter,
                 download: RateLimiter, depth: int = 4, max_depth: int = 16, stall_timeout: float = 10.0,
                 on_progress: ProgressCallback | None = None, max_sources: int = MAX_SOURCES) -> None:
        self.lanes, self.host, self.store, self.signed = lanes, lanes.host, store, signed
        self.upload, self.download = upload, download
        self.depth, self.max_depth, self.stall_timeout = depth, max_depth, stall_timeout
        self.max_sources = max_sources
        self.on_progress = on_progress
        chunks = signed.manifest.unique_chunks()
        self.refs: dict[bytes, ChunkRef] = {cid: ref for cid, ref in chunks.items() if not store.has(cid)}
        self.pending = set(self.refs)
        self.unrequested = set(self.refs)
        self.requested: dict[bytes, set[str]] = {cid: set() for cid in self.refs}
        self.holders: dict[bytes, int] = {cid: 0 for cid in self.refs}
        self.sources: dict[str, _Source] = {}
        self.tried: set[str] = set()
        self._running = 0  # source tasks alive
        total = sum(ref.stored for ref in chunks.values())
        self.stats = DownloadStats(total, reused_bytes=total - sum(ref.stored for ref in self.refs.values()))
        self.done_bytes = 0
        self.finished = trio.Event()
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, sources: list[str], *, find_sources: Callable[[], Awaitable[list[str]]] | None = None,
                  rediscover_every: float = 3.0, timeout: float = 3600.0) -> DownloadStats:
        """Download from ``sources`` (and from peers ``find_sources`` names later) until complete;
        gives up when no source is left for twice the stall timeout, or when for that long plus a
        re-ask none of the sources holds a missing chunk (``_a_source_holds_a_missing_chunk``)."""
        began = time.monotonic()
        self.store.add_manifest(self.signed)  # from now on this peer serves what it has of it
        if not self.pending:
            self.finished.set()
        give_up, held_at = None, trio.current_time()
        try:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as nursery:
                    self._start_some(nursery, sources)
                    idle_since = None
                    while not self.finished.is_set():
                        now = trio.current_time()
                        if not self._running:
                            # every source failed or left, and the DHT names no new one: give up
                            idle_since = now if idle_since is None else idle_since
                            if find_sources is None or now - idle_since > 2 * self.stall_timeout:
                                break
                        else:
                            idle_since = None
                        if self._a_source_holds_a_missing_chunk():
                            held_at = now
                        elif now - held_at > 2 * self.stall_timeout + MAX_REASK_SECONDS:
                            give_up = "none of the sources holds them (a version's chunks besides its weights " \
                                      "may be its signer's alone)"
                            break
                        with trio.move_on_after(rediscover_every):
                            while self._running and not self.finished.is_set():
                                await self._changed.wait()
                        if find_sources is not None and not self.finished.is_set():
                            if not self._running:
                                await trio.sleep(0.5)
                            with trio.move_on_after(rediscover_every):
                                self._start_some(nursery, await find_sources())
                    nursery.cancel_scope.cancel()
        except trio.TooSlowError:
            pass
        self.stats.seconds = time.monotonic() - began
        if self.pending:
            raise DownloadError(f"{len(self.pending)} of {len(self.refs)} chunks still missing after "
                                f"{self.stats.seconds:.1f}s; tried {len(self.tried)} sources"
                                + (f"; {give_up}" if give_up else ""))
        return self.stats

    def _a_source_holds_a_missing_chunk(self) -> bool:
        """Whether a source holds a missing chunk as far as its answers tell, or is sending one. A
        version's chunks other than the weights (the signer's own optimizer state) are often held
        by its signer alone: where it left, the others, asked again every few seconds, never gain
        them (a restarted peer waited out an 80 s deadline for 7 of 15 chunks while the swarm
        finished, ``tests/test_chaos.py`` in CI)."""
        return any(source.has & self.pending or source.inflight for source in self.sources.values())

    def _start_some(self, nursery: trio.Nursery, peers: list[str]) -> None:
        """Start the first of ``peers`` not tried yet, up to ``max_sources`` running at once (the
        others may serve once one is dropped: the DHT names them again)."""
        me = self.host.get_id().to_base58()
        for peer in peers:
            if self._running >= self.max_sources:
                return
            if peer not in self.tried and peer != me:
                self.tried.add(peer)
                self._running += 1  # counted from now, so the loop in run() never sees it missing
                nursery.start_soon(self._use_source, peer)

    # ----- one source
    async def _use_source(self, peer: str) -> None:
        try:
            await self._download_from(peer)
        finally:
            self._running -= 1
            self._notify()

    async def _download_from(self, peer: str) -> None:
        try:
            with trio.fail_after(self.stall_timeout):
                stream = await open_chunk_stream(self.lanes, peer, self.upload, self.download)
        except (ProtocolError, trio.TooSlowError) as exc:
            log.info("source %s unusable: %s", peer, exc)
            return
        source = self.sources[peer] = _Source(peer, stream)
        try:
            with trio.fail_after(self.stall_timeout):
                ids = list(self.pending)
                self._learn(source, ids, await ask_have(stream, ids))
                source.last_ask = time.monotonic()
            self._notify()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guard, source, self._send_requests, nursery.cancel_scope)
                nursery.start_soon(self._guard, source, self._receive_replies, nursery.cancel_scope)
                nursery.start_soon(self._guard, source, self._watch_stall, nursery.cancel_scope)
        except (FrameError, ProtocolError, trio.TooSlowError) as exc:
            source.error = source.error or str(exc)
        finally:
            self._drop(source)
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()
        if source.error and not self.finished.is_set():
            log.info("source %s dropped: %s", peer, source.error)

    async def _guard(self, source: _Source, task, scope: trio.CancelScope) -> None:
        """Run one of a source's tasks; when it ends (done, or the source failed) end them all."""
        try:
            await task(source)
        except (FrameError, ProtocolError) as exc:
            source.error = source.error or str(exc)
        finally:
            scope.cancel()

    def _learn(self, source: _Source, ids: list[bytes], held: list[bool]) -> int:
        """Record which of ``ids`` ``source`` holds; returns how many it newly holds."""
        new = 0
        for cid, has in zip(ids, held):
            if has and cid in self.pending and cid not in source.has:
                source.has.add(cid)
                self.holders[cid] += 1
                new += 1
        return new

    def _drop(self, source: _Source) -> None:
        """A source is gone: its requests go back to the pool."""
        self.sources.pop(source.peer, None)
        for cid in source.has:
            if cid in self.holders:
                self.holders[cid] -= 1
        for cid in source.inflight:
            self._unrequest(cid, source.peer)
        source.inflight.clear()
        self._notify()

    def _unrequest(self, cid: bytes, peer: str) -> None:
        if cid in self.requested:
            self.requested[cid].discard(peer)
            if cid in self.pending and not self.requested[cid]:
                self.unrequested.add(cid)

    async def _send_requests(self, source: _Source) -> None:
        stream = source.stream
        while not self.finished.is_set():
            changed = self._changed
            while source.cancels:
                await write_frame(stream, {"t": "cancel", "id": source.cancels.pop()})
            while len(source.inflight) < self._depth(source):
                cid = self._pick(source)
                if cid is None:
                    break
                if not source.inflight:
                    source.head_since = time.monotonic()
                source.inflight[cid] = time.monotonic()
                source.expect.append(("get", cid))
                self.requested[cid].add(source.peer)
                self.unrequested.discard(cid)
                await write_frame(stream, {"t": "get", "id": cid})
            now = time.monotonic()
            if not source.expect and now - source.last_ask >= source.ask_every and self.pending - source.has:
                # Idle here: ask again what it holds (a peer that is downloading too gains chunks).
                ids = list(self.pending - source.has)[:MAX_HAVE_IDS]
                source.last_ask = now
                source.expect.append(("have", ids))
                await send_have(stream, ids)
            with trio.move_on_after(REASK_SECONDS):
                await changed.wait()

    def _depth(self, source: _Source) -> int:
        """Enough requests in flight to cover about half a second of the source's rate."""
        rate = source.rate
        if rate is None:
            return self.depth
        return max(2, min(self.max_depth, int(rate * 0.5 / self.signed.manifest.chunk_size) + 2))

    def _pick(self, source: _Source) -> bytes | None:
        candidates = source.has & self.unrequested
        if candidates:
            rarest = min(self.holders[cid] for cid in candidates)
            return random.choice([cid for cid in candidates if self.holders[cid] == rarest])
        if source.inflight or self.unrequested:
            return None
        return self._steal(source)

    def _steal(self, source: _Source) -> bytes | None:
        """Endgame: a chunk queued at another source that this idle one would deliver sooner."""
        best, best_gain = None, 0.0
        for cid in source.has & self.pending:
            owners = [self.sources[p] for p in self.requested[cid] if p in self.sources]
            if len(owners) != 1 or source.peer in self.requested[cid]:
                continue
            owner = owners[0]
            mine = self.refs[cid].stored / (source.rate or owner.rate or 1e6)
            gain = self._eta(owner, cid) - 2 * mine  # margin: duplicate bytes only when worth it
            if gain > best_gain:
                best, best_gain = cid, gain
        if best is not None:
            for peer in self.requested[best]:
                if peer in self.sources:
                    self.sources[peer].cancels.append(best)
        return best

    def _eta(self, owner: _Source, cid: bytes) -> float:
        """Seconds until ``owner`` delivers ``cid``: the bytes queued ahead of it, at its rate."""
        ahead = 0
        for queued in owner.inflight:
            ahead += self.refs[queued].stored
            if queued == cid:
                break
        rate = owner.rate or 1e6
        return max(0.0, ahead / rate - (time.monotonic() - owner.head_since))

    async def _receive_replies(self, source: _Source) -> None:
        while True:
            reply, payload = await read_frame(source.stream, MAX_STORED)
            if not source.expect:
                raise ProtocolError("reply to nothing asked")
            kind, asked = source.expect.pop(0)
            if kind == "have":
                new = self._learn(source, asked, parse_have(reply, payload, len(asked)))
                source.ask_every = REASK_SECONDS if new else min(MAX_REASK_SECONDS, 2 * source.ask_every)
                self._notify()
                continue
            if reply.get("id") != asked:
                raise ProtocolError("reply out of order")
            source.inflight.pop(asked, None)
            source.head_since = time.monotonic()
            self.requested.get(asked, set()).discard(source.peer)
            if reply.get("t") == "chunk":
                await self._accept(source, asked, payload)
            elif reply.get("t") in ("missing", "cancelled"):
                if reply["t"] == "missing" and asked in source.has:
                    source.has.discard(asked)
                    self.holders[asked] -= 1
                self._unrequest(asked, source.peer)
            else:
                raise ProtocolError(f"unexpected reply {reply.get('t')!r:.40}")
            self._notify()

    async def _accept(self, source: _Source, cid: bytes, payload: bytes) -> None:
        self.stats.bytes_received += len(payload)
        self.stats.per_peer[source.peer] = self.stats.per_peer.get(source.peer, 0) + len(payload)
        source.bytes += len(payload)
        if cid not in self.pending:
            self.stats.duplicate_bytes += len(payload)
            return
        try:
            await trio.to_thread.run_sync(self.store.put_stored, self.refs[cid], payload)
        except ChunkError as exc:
            self.stats.bad_chunks += 1
            source.strikes += 1
            source.has.discard(cid)
            self.holders[cid] -= 1
            self._unrequest(cid, source.peer)
            log.warning("bad chunk from %s: %s", source.peer, exc)
            if source.strikes >= MAX_STRIKES:
                raise ProtocolError(f"{source.strikes} chunks failed their hash") from exc
            return
        if cid not in self.pending:  # a duplicate finished first while this one was verified
            self.stats.duplicate_bytes += len(payload)
            return
        self.pending.discard(cid)
        self.unrequested.discard(cid)
        for peer in self.requested.pop(cid, set()):
            if peer in self.sources:
                self.sources[peer].cancels.append(cid)
        self.done_bytes += self.refs[cid].stored
        if self.on_progress:
            self.on_progress(self.done_bytes, self.stats.size_bytes - self.stats.reused_bytes, len(self.sources))
        if not self.pending:
            self.finished.set()

    async def _watch_stall(self, source: _Source) -> None:
        while True:
            await trio.sleep(min(1.0, self.stall_timeout / 4))
            now = trio.current_time()
            if source.expect and now - source.stream.last_read > self.stall_timeout:
                raise ProtocolError(f"sent nothing for {self.stall_timeout:g}s")
