"""Lanes: direct TCP connections for bulk data, keyed and authenticated through libp2p.

py-libp2p's Noise and yamux run in Python: ~190 MB/s between two processes here, ~5 core-seconds
per GB. AES-GCM over a plain trio socket in 1 MiB frames moves ~1.1 GB/s at a fifth of the CPU
(`bench/lanes.py`). So the all-reduce and the chunk protocol move their bytes over lanes, and
everything else (the DHT, matchmaking, control) stays on libp2p.

A lane is set up over an ordinary libp2p stream, so the peer at the other end is the one Noise
authenticated (and a private network's key still applies): the dialer sends 32 random bytes and
the protocol it wants; the listener answers with 32 random bytes of its own, a one-time lane id and
the port of its lane listener. The dialer connects to that port at the address its libp2p
connection uses and presents the id. Both directions are then AES-256-GCM, each with its own key
derived from both random strings and a counter nonce, so a lane is confidential, tamper-evident
and in order; a frame that fails to decrypt ends it. Where a lane cannot be had (NAT, firewall, a
peer without lanes) ``open_stream`` falls back to a libp2p stream and remembers that for a while.

A ``Lane`` reads and writes like a libp2p stream (``read``, ``write``, ``close``, ``reset``), so
the framed protocols run over either unchanged, with one difference: ``close`` ends the stream both
ways (what the other side still sends is dropped), where a libp2p stream's closes our side only.
A lane carries one stream at a time; one that ended cleanly on both sides carries the dialer's
next stream to that peer (see ``Lane``), so rounds after the first start on warm connections.
Every frame's header (its kind and size) is authenticated with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import select
import struct
from typing import Awaitable, Callable

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from averaging.wire import FrameError, read_frame, stream_peer, write_frame

log = logging.getLogger(__name__)

PROTOCOL = "/legion/lane/1.2.0"  # 1.2: frames on a lane carry no crc32 (``averaging.wire``)
MAX_PLAIN = 1 << 20  # plaintext bytes per encrypted frame
_SEND_PIECE = 1 << 18  # bytes per socket send, so that ``bytes_sent`` shows a slow write moving
_COUNTED_PIECE = 1 << 16  # the same on a libp2p stream, whose links (relays, home uplinks) are slower
_TAG = 16
_LENGTH = struct.Struct("!I")  # kind in the top 2 bits, sealed size below; authenticated with the frame
_DATA, _END, _OPEN = 0, 1, 2  # frame kinds: stream bytes, end of this stream, a new stream (its protocol)
_SIZE_MASK = (1 << 30) - 1
REUSE_SECONDS = 20.0  # an idle lane is used again for the next stream to its peer within this
IDLE_SECONDS = 60.0  # a listener closes a lane idle this long (longer than REUSE_SECONDS)
END_SECONDS = 2.0  # the longest a closing side waits for the other's end of stream
MAX_IDLE_PER_PEER = 4
LANE_ID_BYTES = 16
PENDING_SECONDS = 10.0  # a lane id not presented by then is forgotten
MAX_PENDING = 256  # lane ids handed out and not yet presented, all peers together
MAX_PENDING_PER_PEER = 8  # of those, per peer: one peer cannot push the others off lanes
MAX_INBOUND_PER_PEER = 16  # lanes a peer may hold open to this listener at once (streams in flight and idle)
NO_LANE_SECONDS = 300.0  # a peer whose lane failed gets libp2p streams for this long

Handler = Callable[[INetStream], Awaitable[None]]


class Traffic:
    """Bytes moved by one transport of a host's bulk protocols (``Lanes.traffic``)."""

    def __init__(self) -> None:
        self.sent = self.received = 0


class CountedStream:
    """A libp2p stream whose reads and writes add to a ``Traffic`` and to its own ``bytes_sent`` and
    ``bytes_received``, as a lane's do: a stall is then bytes not moving on either kind of stream
    (``averaging.wire``), not a frame that is slow to finish. Everything else is the stream's."""

    def __init__(self, stream: INetStream, traffic: Traffic) -> None:
        self._stream, self._traffic = stream, traffic
        self.bytes_sent = self.bytes_received = 0

    async def read(self, n: int | None = None) -> bytes:
        data = await self._stream.read(n)
        self._traffic.received += len(data)
        self.bytes_received += len(data)
        return data

    async def write(self, data: bytes) -> None:
        for start in range(0, max(len(data), 1), _COUNTED_PIECE):  # a slow write shows it is moving
            piece = data[start:start + _COUNTED_PIECE]
            await self._stream.write(piece)
            self._traffic.sent += len(piece)
            self.bytes_sent += len(piece)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class LaneError(Exception):
    """A lane that cannot be set up, or whose bytes fail authentication."""


def _keys(dialer_random: bytes, listener_random: bytes, lane_id: bytes) -> tuple[bytes, bytes]:
    """(dialer -> listener key, listener -> dialer key)."""
    secret = hashlib.sha256(b"legion lane v1" + dialer_random + listener_random + lane_id).digest()
    return hashlib.sha256(secret + b"to listener").digest(), hashlib.sha256(secret + b"to dialer").digest()


def _unsupported(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a peer declining the lane protocol."""
    while exc is not None:
        if isinstance(exc, MultiselectClientError) and "not supported" in str(exc):
            return True
        exc = exc.__cause__
    return False


class Lane:
    """One encrypted TCP connection to ``peer_id``, carrying one stream at a time. Reads are
    cancel-safe (a read cancelled while waiting loses nothing); a write cancelled midway breaks
    the lane, as it would a TCP stream.

    A stream ends with an end-of-stream frame each way instead of a TCP FIN, so a lane whose
    stream closed cleanly on both sides carries the dialer's next stream to the same peer (opened
    with a frame naming its protocol): no new libp2p stream, TCP handshake or slow start per round.
    """

    def __init__(self, sock: trio.SocketStream, peer_id: ID, send_key: bytes, receive_key: bytes,
                 traffic: Traffic | None = None) -> None:
        self.sock, self.peer_id = sock, peer_id
        self.traffic = traffic or Traffic()  # shared by a host's lanes
        self._send, self._receive = AESGCM(send_key), AESGCM(receive_key)
        self._send_count = self._receive_count = 0
        self._inbox = bytearray(2 * (MAX_PLAIN + _TAG + _LENGTH.size))
        self._start = self._end = 0  # undecrypted bytes in _inbox
        self._plain, self._taken = b"", 0  # the last decrypted frame, and how much of it was read
        self._eof = False  # the other side ended this stream
        self._ended = False  # we ended this stream
        self.on_idle: Callable[[Lane], None] | None = None  # given the lane when a stream ends cleanly
        self._idle = False  # handed to ``on_idle`` since the last stream began
        self._broken: str | None = None
        self._write_lock = trio.Lock()
        self._read_lock = trio.Lock()
        self.bytes_sent = self.bytes_received = 0

    @staticmethod
    def _nonce(count: int) -> bytes:
        return count.to_bytes(12, "big")

    def _seal(self, kind: int, plain: bytes | memoryview) -> bytes:
        head = _LENGTH.pack(kind << 30 | (len(plain) + _TAG))
        sealed = self._send.encrypt(self._nonce(self._send_count), plain, head)
        self._send_count += 1
        return head + sealed

    async def _write_frames(self, kind: int, data: bytes) -> None:
        if self._broken:
            raise LaneError(f"lane to {self.peer_id} is broken: {self._broken}")
        async with self._write_lock:
            view = memoryview(data)
            for start in range(0, max(len(view), 1), MAX_PLAIN):
                frame = memoryview(self._seal(kind, view[start:start + MAX_PLAIN]))
                try:
                    for piece in range(0, len(frame), _SEND_PIECE):  # counted as it goes: progress
                        part = frame[piece:piece + _SEND_PIECE]
                        await self.sock.send_all(part)
                        self.bytes_sent += len(part)
                        self.traffic.sent += len(part)
                except Exception as exc:
                    self._break(f"{type(exc).__name__}: {exc}")
                    raise LaneError(f"lane to {self.peer_id}: {self._broken}") from exc
                except BaseException:  # cancelled: part of a frame may have gone out
                    self._break("a write was cancelled midway")
                    raise

    async def write(self, data: bytes) -> None:
        if self._ended:
            raise LaneError(f"stream to {self.peer_id} is closed for writing")
        if data:
            await self._write_frames(_DATA, data)

    async def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes (all that is decrypted if ``n`` is None or negative); b"" at the end."""
        async with self._read_lock:
            while self._taken == len(self._plain):
                if self._eof:
                    return b""
                if self._broken:
                    raise LaneError(f"lane to {self.peer_id} is broken: {self._broken}")
                kind, plain = await self._next_frame()
                if kind == _DATA:
                    self._plain, self._taken = plain, 0
                elif kind == _END:
                    self._eof = True
                else:
                    self._break("a stream opened inside another")
                    raise LaneError(f"lane from {self.peer_id} opened a stream inside another")
            start = self._taken
            left = len(self._plain) - start
            self._taken += left if n is None or n < 0 else min(n, left)
            if start == 0 and self._taken == len(self._plain):
                return self._plain  # a whole frame, as most reads of large payloads are: no copy
            return self._plain[start:self._taken]

    async def _next_frame(self) -> tuple[int, bytes]:
        """The next frame's kind and decrypted contents. A TCP end counts as an end of stream
        too, but leaves the lane unusable for another."""
        while True:
            have = self._end - self._start
            if have >= _LENGTH.size:
                (word,) = _LENGTH.unpack_from(self._inbox, self._start)
                kind, size = word >> 30, word & _SIZE_MASK
                if kind > _OPEN or not _TAG <= size <= MAX_PLAIN + _TAG:
                    self._break(f"frame of {size} bytes")
                    raise LaneError(f"lane from {self.peer_id} sent a frame of {size} bytes (kind {kind})")
                if have >= _LENGTH.size + size:
                    begin = self._start + _LENGTH.size
                    try:
                        plain = self._receive.decrypt(self._nonce(self._receive_count),
                                                      memoryview(self._inbox)[begin:begin + size],
                                                      bytes(self._inbox[self._start:begin]))
                    except InvalidTag as exc:
                        self._break("a frame failed authentication")
                        raise LaneError(f"lane from {self.peer_id}: a frame failed authentication") from exc
                    self._receive_count += 1
                    self._start = begin + size
                    return kind, plain
                if self._start + _LENGTH.size + size > len(self._inbox):  # make room at the front
                    self._inbox[:have] = self._inbox[self._start:self._end]
                    self._start, self._end = 0, have
            elif self._start == self._end:
                self._start = self._end = 0
            try:
                got = await self.sock.socket.recv_into(memoryview(self._inbox)[self._end:])
            except (OSError, trio.ClosedResourceError) as exc:  # the latter: aborted by another task
                self._break(f"{type(exc).__name__}: {exc}")
                raise LaneError(f"lane from {self.peer_id}: {exc}") from exc
            if not got:
                if self._end != self._start:
                    self._break("ended inside a frame")
                    raise LaneError(f"lane from {self.peer_id} ended inside a frame")
                self._broken = self._broken or "the connection ended"
                return _END, b""
            self._end += got
            self.bytes_received += got
            self.traffic.received += got

    def _break(self, reason: str) -> None:
        self._broken = self._broken or reason
        self.abort()

    def abort(self) -> None:
        """Close the socket at once: every pending and later read or write fails."""
        self._broken = self._broken or "aborted"
        with contextlib.suppress(OSError):
            self.sock.socket.close()

    @property
    def reusable(self) -> bool:
        """Both sides ended the stream cleanly, and nothing of it is left unread."""
        return self._ended and self._eof and not self._broken and self._taken == len(self._plain)

    async def close(self) -> None:
        """End our side of the stream, then wait briefly for the other side's end (bytes it
        still sends are dropped): only a lane both sides ended can carry another stream."""
        try:
            send_end = not self._ended and not self._broken
            self._ended = True  # before the write: no more of this stream's data after its end
            if send_end:
                with contextlib.suppress(LaneError):
                    await self._write_frames(_END, b"")
            self._taken = len(self._plain)  # what was not read is dropped
            with trio.move_on_after(END_SECONDS), contextlib.suppress(LaneError):
                while not self._eof and not self._broken:
                    await self.read()
        finally:
            if not self.reusable:
                self.abort()
            elif self.on_idle is not None and not self._idle:
                self._idle = True  # once, however often close is called
                self.on_idle(self)

    async def reset(self) -> None:
        self.abort()

    def _next_stream(self) -> None:
        """Reset per-stream state once a stream is over on both sides."""
        self._eof = self._ended = self._idle = False
        self._plain, self._taken = b"", 0

    async def open(self, protocol: str) -> None:
        """Dialer: start a new stream for ``protocol`` on a lane whose last stream is over."""
        if self._readable_while_idle():
            self._break("the other side ended it while it was idle")
        self._next_stream()
        await self._write_frames(_OPEN, protocol.encode())

    def _readable_while_idle(self) -> bool:
        """Whether the socket has something to read although no stream is open: the other side
        closed it (its process died or restarted) or sent what nobody asked for. Writing to such a
        lane would seem to work, and only the stream's first read would fail."""
        try:
            readable, _, _ = select.select([self.sock.socket.fileno()], [], [], 0)
        except (OSError, ValueError):  # already closed
            return True
        return bool(readable)

    async def wait_open(self) -> str | None:
        """Listener: the protocol of the dialer's next stream, or None if the lane ended."""
        self._next_stream()
        async with self._read_lock:
            try:
                kind, plain = await self._next_frame()
            except LaneError:
                return None
        if kind != _OPEN:
            self.abort()
            return None
        try:
            return plain.decode()
        except UnicodeDecodeError:
            self.abort()
            return None


class Lanes:
    """The lane listener of a host and the dialing side. ``serve`` a protocol on both libp2p
    streams and lanes; ``open_stream`` to a peer. Lanes are used once ``run`` has started
    (``await nursery.start(lanes.run, ip)``); until then, or without it, everything is libp2p."""

    def __init__(self, host: IHost, *, timeout: float = 5.0) -> None:
        self.host, self.timeout = host, timeout
        self.handlers: dict[str, Handler] = {}
        self.port: int | None = None
        self._pending: dict[bytes, tuple[float, ID, str, bytes, bytes]] = {}
        self._inbound: dict[ID, int] = {}  # peer -> lanes it holds open to our listener
        self._no_lane: dict[str, float] = {}  # peer -> trio time until which libp2p is used
        self._idle: dict[str, list[tuple[float, Lane]]] = {}  # peer -> lanes we dialed, free again
        self._nursery: trio.Nursery | None = None
        self.traffic = {"lane": Traffic(), "libp2p": Traffic()}  # bytes of the protocols served here

    def serve(self, protocol: str, handler: Handler) -> None:
        """Answer ``protocol`` with ``handler``, on libp2p streams and on lanes alike."""
        async def counted(stream: INetStream) -> None:
            await handler(CountedStream(stream, self.traffic["libp2p"]))

        self.host.set_stream_handler(protocol, counted)
        self.handlers[protocol] = handler

    async def run(self, ip: str = "0.0.0.0", port: int = 0, *,
                  task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=ip)
        self.port = listeners[0].socket.getsockname()[1]
        self.host.set_stream_handler(PROTOCOL, self._offer)
        log.info("lane listener on %s:%d", ip, self.port)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self.port)
            await trio.serve_listeners(self._accept, listeners, handler_nursery=nursery)

    # ---- dialing ----------------------------------------------------------------------------------

    async def open_stream(self, peer: ID, protocol: str) -> INetStream | Lane:
        """A lane to ``peer`` for ``protocol``, or a libp2p stream where no lane can be had."""
        key = peer.to_base58()
        lane = await self._reuse(key, protocol)
        if lane is not None:
            return lane
        if self._nursery is not None and self._no_lane.get(key, 0) <= trio.current_time():
            try:
                with trio.fail_after(self.timeout):
                    return await self._dial(peer, protocol)
            except (LaneError, FrameError, trio.TooSlowError, OSError) as exc:
                log.info("no lane to %s (%s): libp2p streams for %.0f s", peer, exc, NO_LANE_SECONDS)
                self._no_lane[key] = trio.current_time() + NO_LANE_SECONDS
            except Exception as exc:  # opening the libp2p stream: libp2p raises many kinds
                if _unsupported(exc):  # a peer without lanes (--no-lanes, another implementation)
                    self._no_lane[key] = trio.current_time() + NO_LANE_SECONDS
                log.debug("no lane to %s: %s: %s", peer, type(exc).__name__, exc)
        return CountedStream(await self.host.new_stream(peer, [protocol]), self.traffic["libp2p"])

    async def _reuse(self, key: str, protocol: str) -> Lane | None:
        """An idle lane to ``key``, now carrying a new stream for ``protocol``, if one is left."""
        self._drop_stale_idle()
        idle = self._idle.get(key, [])
        while idle:
            _, lane = idle.pop()
            try:
                await lane.open(protocol)
                return lane
            except LaneError as exc:
                log.debug("idle lane to %s is gone: %s", key, exc)
        return None

    def _keep_idle(self, lane: Lane) -> None:
        idle = self._idle.setdefault(lane.peer_id.to_base58(), [])
        idle.append((trio.current_time(), lane))
        while len(idle) > MAX_IDLE_PER_PEER:
            idle.pop(0)[1].abort()

    def _drop_stale_idle(self) -> None:
        now = trio.current_time()
        for key, idle in list(self._idle.items()):
            for entry in [e for e in idle if now - e[0] > REUSE_SECONDS]:
                idle.remove(entry)
                entry[1].abort()
            if not idle:
                del self._idle[key]

    async def _dial(self, peer: ID, protocol: str) -> Lane:
        mine = secrets.token_bytes(32)
        stream = await self.host.new_stream(peer, [PROTOCOL])
        try:
            await write_frame(stream, {"proto": protocol, "key": mine})
            answer, _ = await read_frame(stream, 0)
            address = stream.get_remote_address()
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()
        theirs, lane_id, port = answer.get("key"), answer.get("id"), answer.get("port")
        if answer.get("t") != "ok" or not isinstance(theirs, bytes) or len(theirs) != 32 \
                or not isinstance(lane_id, bytes) or len(lane_id) != LANE_ID_BYTES \
                or not isinstance(port, int) or not 0 < port < 65536:
            raise LaneError(f"lane offer refused or malformed: {answer.get('t')!r}")
        if address is None:
            raise LaneError("the libp2p connection has no IP address to dial")
        sock = await trio.open_tcp_stream(address[0], port)
        try:
            await sock.send_all(lane_id)
        except BaseException:
            await trio.aclose_forcefully(sock)
            raise
        to_listener, to_dialer = _keys(mine, theirs, lane_id)
        lane = Lane(sock, peer, to_listener, to_dialer, self.traffic["lane"])
        lane.on_idle = self._keep_idle
        return lane

    # ---- listening --------------------------------------------------------------------------------

    async def _offer(self, stream: INetStream) -> None:
        """libp2p handler of ``PROTOCOL``: hand out a lane id and keys to an authenticated peer."""
        try:
            with trio.fail_after(self.timeout):
                request, _ = await read_frame(stream, 0)
                theirs, protocol = request.get("key"), request.get("proto")
                now = trio.current_time()
                for lane_id in [i for i, entry in self._pending.items() if entry[0] < now]:
                    del self._pending[lane_id]
                peer = stream_peer(stream)
                if not isinstance(theirs, bytes) or len(theirs) != 32 or protocol not in self.handlers \
                        or self.port is None or not self._may_offer(peer):
                    await write_frame(stream, {"t": "no"})
                    return
                mine, lane_id = secrets.token_bytes(32), os.urandom(LANE_ID_BYTES)
                to_listener, to_dialer = _keys(theirs, mine, lane_id)
                self._pending[lane_id] = (now + PENDING_SECONDS, peer, protocol, to_dialer, to_listener)
                await write_frame(stream, {"t": "ok", "key": mine, "id": lane_id, "port": self.port})
        except Exception as exc:  # an escaping exception would tear down the host
            log.info("lane offer to %s failed: %s: %s", stream_peer(stream), type(exc).__name__, exc)
        finally:
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()

    def _may_offer(self, peer: ID) -> bool:
        """Whether ``peer`` may have another lane id: within the global and its own caps on
        pending ids, and on lanes it holds open."""
        pending = sum(1 for entry in self._pending.values() if entry[1] == peer)
        return len(self._pending) < MAX_PENDING and pending < MAX_PENDING_PER_PEER \
            and pending + self._inbound.get(peer, 0) < MAX_INBOUND_PER_PEER

    async def _accept(self, sock: trio.SocketStream) -> None:
        """Serve one inbound TCP connection; nothing it does (reset, silence, garbage) escapes:
        ``serve_listeners`` would end the whole peer. Anyone can connect here, key or not."""
        try:
            await self._serve_lane(sock)
        except Exception as exc:
            log.info("lane connection from %s ended: %s: %s", _remote(sock), type(exc).__name__, exc)
        finally:
            await trio.aclose_forcefully(sock)

    async def _serve_lane(self, sock: trio.SocketStream) -> None:
        lane_id = bytearray()
        with trio.move_on_after(self.timeout):
            while len(lane_id) < LANE_ID_BYTES:
                got = await sock.receive_some(LANE_ID_BYTES - len(lane_id))
                if not got:
                    break
                lane_id += got
        entry = self._pending.pop(bytes(lane_id), None)
        if entry is None or entry[0] < trio.current_time():
            log.info("dropped a lane connection from %s that presented no valid lane id", _remote(sock))
            return
        _, peer, protocol, send_key, receive_key = entry
        lane = Lane(sock, peer, send_key, receive_key, self.traffic["lane"])
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        try:
            while protocol is not None:
                handler = self.handlers.get(protocol)
                if handler is None:
                    log.info("lane from %s opened unknown protocol %r", peer, protocol[:100])
                    return
                try:
                    await handler(lane)
                except Exception:  # handlers catch their own errors; this is the last line
                    log.exception("lane handler for %s from %s failed", protocol, peer)
                    return
                await lane.close()  # the handler's own close is enough; this one is bounded
                if not lane.reusable:
                    return
                protocol = None
                with trio.move_on_after(IDLE_SECONDS):
                    protocol = await lane.wait_open()
        finally:
            lane.abort()
            self._inbound[peer] -= 1
            if not self._inbound[peer]:
                del self._inbound[peer]


def _remote(sock: trio.SocketStream) -> str:
    try:
        host, port = sock.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "a closed socket"
