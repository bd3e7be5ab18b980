"""Length-framed, checksummed messages on libp2p streams.

A frame is ``[u32 header length][u32 payload length][u32 crc32 of header+payload][header][payload]``
where the header is a msgpack map and the payload raw bytes. Both lengths are checked against caps
before anything is read, so nothing a remote peer sends can make a reader allocate without bound,
and a sender that dies mid-frame (which a reader sees as a clean EOF) is always detected.

On a stream that authenticates every byte itself (a lane: AES-GCM, ``authenticated = True``) the
checksum is left 0 and not checked: crc32 runs at ~3.9 GB/s here, half the speed of AES-GCM, and
on a lane it would only repeat what the cipher already guarantees.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from contextlib import contextmanager
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import msgpack
import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_HEADER = 64 * 1024
_PREFIX = struct.Struct("!III")


class FrameError(Exception):
    """A frame that is truncated, oversized, corrupt or malformed."""


async def read_exactly(stream: INetStream, size: int) -> bytes:
    pieces, got = [], 0
    while got < size:
        try:
            chunk = await stream.read(size - got)
        except Exception as exc:  # EOF, reset: the peer is gone mid-frame
            raise FrameError(f"stream ended after {got} of {size} bytes: {type(exc).__name__}") from exc
        if not chunk:
            raise FrameError(f"stream ended after {got} of {size} bytes")
        pieces.append(chunk)
        got += len(chunk)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)  # a lane's whole frame: no copy


# The attributes leading from a yamux connection down to its socket in py-libp2p 0.8
# (Yamux -> SecureSession -> Noise read-writer -> [PskConn] -> RawConnection -> TrioTCPStream).
_LOWER_LAYER = ("secured_conn", "conn", "_conn", "stream")


def _authenticated(stream: INetStream) -> bool:
    return getattr(stream, "authenticated", False) is True


def stream_peer(stream: INetStream) -> ID:
    """The peer at the other end of a libp2p stream or a lane (``averaging.lanes``)."""
    peer = getattr(stream, "peer_id", None)
    return peer if peer is not None else stream.muxed_conn.peer_id


def abort_connection(stream: INetStream) -> bool:
    """Close the TCP socket under ``stream``'s connection at once; True if one was found.

    A peer that stops reading (hung, SIGSTOP) fills our send buffer, after which every write on
    that connection blocks, py-libp2p's own cleanup writes included, and some of those run
    shielded from cancellation (a cancelled ``new_stream`` resets its stream shielded): one hung
    peer could then hold a task, or the process's exit, forever. Closing the socket makes every
    such write fail at once. A live peer simply reconnects.
    """
    abort = getattr(stream, "abort", None)  # a lane: its own socket
    if abort is not None:
        abort()
        log.info("aborted the lane to %s: it stopped reading", stream_peer(stream))
        return True
    if close_socket_under(getattr(stream, "muxed_conn", None)):
        log.info("aborted the connection to %s: it stopped reading", stream.muxed_conn.peer_id)
        return True
    return False


def close_socket_under(muxed_conn: Any) -> bool:
    """Close the TCP socket under a libp2p (yamux) connection; True if one was found."""
    socket = socket_under(muxed_conn)
    if socket is None:
        log.warning("found no socket of its own under a connection to close (relayed, or py-libp2p's layout changed)")
        return False
    socket.socket.close()
    return True


def socket_under(muxed_conn: Any) -> trio.SocketStream | None:
    """The TCP socket a libp2p (yamux) connection runs on; None for one relayed through another
    peer (or if py-libp2p's layout changed)."""
    layer = muxed_conn
    for _ in range(8):
        if isinstance(layer, trio.SocketStream):
            return layer
        layer = next((getattr(layer, name) for name in _LOWER_LAYER if hasattr(layer, name)), None)
    return None


async def write_frame(stream: INetStream, header: dict[str, Any], payload: bytes = b"") -> int:
    """Send one frame; returns the bytes written."""
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER:
        raise FrameError(f"header of {len(head)} bytes exceeds {MAX_HEADER}")
    checksum = 0 if _authenticated(stream) else zlib.crc32(payload, zlib.crc32(head))
    data = _PREFIX.pack(len(head), len(payload), checksum) + head
    try:
        # One write for small frames; large payloads go separately to avoid copying them.
        if len(payload) <= 65536:
            await stream.write(data + payload)
        else:
            await stream.write(data)
            await stream.write(payload)
    except Exception as exc:  # reset, closed, connection lost: the peer is gone
        raise FrameError(f"stream broke while writing: {type(exc).__name__}: {exc}") from exc
    return len(data) + len(payload)


async def _unless_stalled(stream: INetStream, seconds: float, counter: str,
                          operation: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """``(True, operation())``, or ``(False, None)`` once the stream stalled for ``seconds``.

    On a lane, which counts the bytes its socket moves (``counter``), a stall is ``seconds``
    without a byte moving: a frame crawling through a link shared with many other streams is
    slow, not stalled. A libp2p stream counts nothing, so there the whole operation must finish
    within ``seconds``."""
    if not hasattr(stream, counter):
        with trio.move_on_after(seconds):
            return True, await operation()
        return False, None
    with trio.CancelScope(deadline=trio.current_time() + seconds) as scope:
        async def extend_while_moving() -> None:
            seen = getattr(stream, counter)
            while True:
                await trio.sleep(min(1.0, seconds / 4))
                if getattr(stream, counter) != seen:
                    seen = getattr(stream, counter)
                    scope.deadline = trio.current_time() + seconds

        failure: Exception | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(extend_while_moving)
            try:
                value = await operation()
            except Exception as exc:  # raised below as itself, not wrapped in an exception group
                failure = exc
            scope.deadline = math.inf  # done: a deadline passing now must not lose the outcome
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return True, value
    return False, None


async def write_frame_within(stream: INetStream, seconds: float, header: dict[str, Any], payload: bytes = b"", *,
                             what: str = "a frame") -> int:
    """``write_frame``, but a peer that takes nothing of the frame for ``seconds`` (hung, or no
    longer reading) gets its connection aborted and the write raises ``FrameError``."""
    done, sent = await _unless_stalled(stream, seconds, "bytes_sent", lambda: write_frame(stream, header, payload))
    if done:
        return sent
    abort_connection(stream)  # later writes to it would block too, some of them uncancellable
    raise FrameError(f"sending {what} stalled for {seconds:.1f}s")


async def read_frame_within(stream: INetStream, seconds: float, max_payload: int, *,
                            what: str = "a frame") -> tuple[dict[str, Any], bytes]:
    """``read_frame``, raising ``FrameError`` if nothing of the frame arrives for ``seconds``."""
    done, frame = await _unless_stalled(stream, seconds, "bytes_received", lambda: read_frame(stream, max_payload))
    if done:
        return frame
    raise FrameError(f"{what} stalled for {seconds:.1f}s")


async def read_frame(stream: INetStream, max_payload: int) -> tuple[dict[str, Any], bytes]:
    """Read one frame, checking sizes before reading and the checksum after."""
    head_len, payload_len, checksum = _PREFIX.unpack(await read_exactly(stream, _PREFIX.size))
    if head_len > MAX_HEADER or payload_len > max_payload:
        raise FrameError(f"frame of {head_len}+{payload_len} bytes exceeds {MAX_HEADER}+{max_payload}")
    head = await read_exactly(stream, head_len)
    payload = await read_exactly(stream, payload_len) if payload_len else b""
    if not _authenticated(stream) and zlib.crc32(payload, zlib.crc32(head)) != checksum:
        raise FrameError("frame checksum mismatch")
    try:
        header = msgpack.unpackb(head, raw=False, max_bin_len=MAX_HEADER, max_str_len=MAX_HEADER)
    except Exception as exc:
        raise FrameError(f"frame header is not msgpack: {exc}") from exc
    if not isinstance(header, dict):
        raise FrameError("frame header is not a map")
    return header, payload


class PerPeerLimit:
    """At most ``limit`` streams of one handler served at once per remote peer: what a peer can
    make this one hold (buffers, tasks, queued work) grows with its streams. ``with
    limits.slot(peer) as admitted:`` a stream over the limit is not admitted (close it)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[ID, int] = {}

    @contextmanager
    def slot(self, peer: ID) -> Iterator[bool]:
        if self._open.get(peer, 0) >= self.limit:
            log.info("refused a stream from %s: %d already open", peer, self.limit)
            yield False
            return
        self._open[peer] = self._open.get(peer, 0) + 1
        try:
            yield True
        finally:
            self._open[peer] -= 1
            if not self._open[peer]:
                del self._open[peer]
