"""The chunk protocol: a peer serves the chunks and manifests it holds over libp2p streams.

One stream carries many requests, pipelined: the client writes requests without waiting and the
server answers them in order, each answer one checksummed frame (``averaging.wire``):

    {"t": "get", "id": ID}          -> {"t": "chunk", "id": ID} + stored bytes | {"t": "missing", "id": ID}
    {"t": "cancel", "id": ID}       -> (nothing; a queued "get" of ID is answered {"t": "cancelled"})
    {"t": "have"} + ids (32 bytes each) -> {"t": "have"} + a bitfield of the ids held
    {"t": "manifest", "id": ID}     -> {"t": "manifest"} + signed envelope | {"t": "none"}
    {"t": "latest", "run": RUN}     -> the newest complete manifest of RUN the server holds, the same way

The server holds at most ``MAX_QUEUE`` unanswered requests per stream and closes streams idle for
``idle_timeout`` seconds. Malformed requests end the stream; nothing escapes the handler.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Awaitable, Callable

import numpy as np
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from averaging.lanes import Lanes
from averaging.wire import FrameError, PerPeerLimit, abort_connection, read_frame, stream_peer, write_frame
from bootstrap.chunk_store import ChunkStore
from bootstrap.manifest import ID_BYTES, MAX_CHUNK_SIZE, MAX_ENVELOPE, SignedManifest, max_stored_size, open_envelope
from bootstrap.rate_limit import RateLimiter, ThrottledStream

log = logging.getLogger(__name__)

PROTOCOL = "/legion/chunks/1.0.0"
MAX_QUEUE = 32
MAX_STREAMS_PER_PEER = 8  # chunk streams one peer may have served at once (a downloader uses one)
MAX_CANCELLED = 2 * MAX_QUEUE  # cancels held per stream: more than could match queued requests
MAX_HAVE_IDS = 1 << 16
MAX_STORED = max_stored_size(MAX_CHUNK_SIZE)
LEASE_SECONDS = 600.0  # a version whose manifest a peer fetched here stays that long for its download

# run id -> the newest manifest of that run to offer (e.g. made on demand from a trainer's state)
LatestSource = Callable[[str], Awaitable["SignedManifest | None"]]


class ProtocolError(Exception):
    """A peer answered something other than what the protocol allows."""


class ChunkServer:
    """Serves ``store``; ``latest`` overrides which manifest answers a "latest" request."""

    def __init__(self, store: ChunkStore, upload: RateLimiter, download: RateLimiter, *,
                 latest: LatestSource | None = None, idle_timeout: float = 60.0) -> None:
        self.store, self.upload, self.download = store, upload, download
        self.latest, self.idle_timeout = latest, idle_timeout
        self.streams = PerPeerLimit(MAX_STREAMS_PER_PEER)

    async def handle(self, raw: INetStream) -> None:
        with self.streams.slot(stream_peer(raw)) as admitted:
            if admitted:
                await self._serve(raw)
            else:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await raw.reset()

    async def _serve(self, raw: INetStream) -> None:
        stream = ThrottledStream(raw, self.upload, self.download)
        peer = stream_peer(raw).to_base58()
        send, receive = trio.open_memory_channel(MAX_QUEUE)
        cancelled: set[bytes] = set()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_requests, stream, send, cancelled)
                try:  # caught here, inside the nursery, so that it is not wrapped in an ExceptionGroup
                    async with receive:
                        async for request, payload in receive:
                            with trio.fail_after(self.idle_timeout):  # a client that stops reading
                                await self._answer(stream, request, payload, cancelled)
                except (FrameError, ProtocolError) as exc:
                    log.info("chunk stream with %s ended: %s", peer, exc)
                    nursery.cancel_scope.cancel()
                except trio.TooSlowError:
                    log.info("chunk stream with %s ended: answer not taken in time", peer)
                    abort_connection(raw)  # later writes to it would block too
                    nursery.cancel_scope.cancel()
        except Exception:  # an escaping exception would tear down the host
            log.exception("chunk stream with %s failed", peer)
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await raw.close()

    async def _read_requests(self, stream: ThrottledStream, send, cancelled: set[bytes]) -> None:
        async with send:
            while True:
                with trio.move_on_after(self.idle_timeout):
                    try:
                        request, payload = await read_frame(stream, MAX_HAVE_IDS * ID_BYTES)
                    except FrameError:  # the client closed the stream, or broke it off
                        return
                    if request.get("t") == "cancel" and isinstance(request.get("id"), bytes):
                        if len(cancelled) < MAX_CANCELLED:  # only queued requests can be cancelled
                            cancelled.add(request["id"])
                        continue
                    await send.send((request, payload))
                    continue
                return  # idle

    async def _answer(self, stream: ThrottledStream, request: dict, payload: bytes, cancelled: set[bytes]) -> None:
        kind = request.get("t")
        if kind == "get":
            cid = request.get("id")
            if not isinstance(cid, bytes) or len(cid) != ID_BYTES:
                raise ProtocolError("malformed get request")
            if cid in cancelled:
                cancelled.discard(cid)
                await write_frame(stream, {"t": "cancelled", "id": cid})
                return
            data = self.store.read_stored(cid, MAX_STORED)
            if data is None:
                await write_frame(stream, {"t": "missing", "id": cid})
                return
            await write_frame(stream, {"t": "chunk", "id": cid}, data)
        elif kind == "have":
            if len(payload) % ID_BYTES:
                raise ProtocolError("have request is not a list of 32-byte ids")
            ids = [payload[i:i + ID_BYTES] for i in range(0, len(payload), ID_BYTES)]
            bits = np.packbits(np.array(self.store.held(ids), dtype=bool)).tobytes()
            await write_frame(stream, {"t": "have", "n": len(ids)}, bits)
        elif kind in ("manifest", "latest"):
            signed = await self._manifest(request)
            if signed is None:
                await write_frame(stream, {"t": "none"})
            else:
                self.store.lease(signed.id, LEASE_SECONDS)
                await write_frame(stream, {"t": "manifest"}, signed.envelope)
        else:
            raise ProtocolError(f"unknown request {kind!r:.40}")

    async def _manifest(self, request: dict) -> SignedManifest | None:
        if request["t"] == "manifest":
            mid = request.get("id")
            return self.store.manifest(mid) if isinstance(mid, bytes) and len(mid) == ID_BYTES else None
        run_id = request.get("run")
        if not isinstance(run_id, str):
            return None
        if self.latest is not None:
            return await self.latest(run_id)
        complete = self.store.complete(run_id)
        return complete[0] if complete else None


# ----- the client side
async def open_chunk_stream(lanes: Lanes, peer: str, upload: RateLimiter, download: RateLimiter) -> ThrottledStream:
    """A stream (a lane where it can) to ``peer``'s chunk server; raises ``ProtocolError`` if it
    cannot be opened."""
    try:
        raw = await lanes.open_stream(ID.from_base58(peer), PROTOCOL)
    except Exception as exc:  # dial failures, resets, negotiation: libp2p raises many kinds
        raise ProtocolError(f"cannot open a chunk stream to {peer}: {type(exc).__name__}: {exc}") from exc
    return ThrottledStream(raw, upload, download)


async def ask_manifest(stream: ThrottledStream, *, max_bytes: int, run_id: str | None = None,
                       manifest_id: bytes | None = None) -> SignedManifest | None:
    """The peer's manifest with ``manifest_id``, or its newest of ``run_id``; None if it has none.
    A forged or malformed manifest raises ``ManifestError``."""
    if manifest_id is not None:
        await write_frame(stream, {"t": "manifest", "id": manifest_id})
    else:
        await write_frame(stream, {"t": "latest", "run": run_id})
    reply, payload = await read_frame(stream, MAX_ENVELOPE)
    if reply.get("t") == "none":
        return None
    if reply.get("t") != "manifest":
        raise ProtocolError(f"expected a manifest, got {reply.get('t')!r:.40}")
    signed = open_envelope(payload, max_bytes=max_bytes, expected_id=manifest_id)
    if run_id is not None and signed.manifest.run_id != run_id:
        raise ProtocolError(f"asked for run {run_id}, got a manifest of run {signed.manifest.run_id}")
    return signed


async def send_have(stream: ThrottledStream, ids: list[bytes]) -> None:
    """Ask which of ``ids`` (at most ``MAX_HAVE_IDS``) the peer holds; ``parse_have`` reads the answer."""
    if len(ids) > MAX_HAVE_IDS:
        raise ValueError(f"at most {MAX_HAVE_IDS} ids per have request")
    await write_frame(stream, {"t": "have"}, b"".join(ids))


def parse_have(reply: dict, bits: bytes, count: int) -> list[bool]:
    """The answer to a have request of ``count`` ids; raises ``ProtocolError`` if malformed."""
    if reply.get("t") != "have" or reply.get("n") != count or len(bits) != (count + 7) // 8:
        raise ProtocolError("malformed have reply")
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8))[:count].astype(bool).tolist()


async def ask_have(stream: ThrottledStream, ids: list[bytes]) -> list[bool]:
    """Which of ``ids`` the peer holds."""
    held: list[bool] = []
    for start in range(0, len(ids), MAX_HAVE_IDS):
        batch = ids[start:start + MAX_HAVE_IDS]
        await send_have(stream, batch)
        held += parse_have(*await read_frame(stream, MAX_HAVE_IDS // 8), len(batch))
    return held
