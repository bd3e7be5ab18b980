"""Kademlia streams kept open between messages, on both ends.

py-libp2p opens a stream for every Kademlia message (a yamux stream, multistream negotiation,
its close), which costs ~3 KB on the wire for a message of a few hundred bytes; on a stream kept
open a message and its answer cost ~0.6 KB (``bench/dht_request_cost.py``). A peer's DHT upkeep is
a few messages every heartbeat to the same few nodes (a key's replicas, cached for minutes), so
go-libp2p's Kademlia keeps a stream per node and its nodes serve many messages on one stream,
closing it after a minute idle. Legion does the same:

- ``StreamPool`` (the asking end): a message goes out on an idle stream to its node where one is
  open, else on a new one, which is kept for the next message until ``CLIENT_IDLE_SECONDS``
  pass without one. A reused stream that fails (its node closed it meanwhile) is retried once
  on a new stream.
- ``ServedStream`` (the serving end): an answer goes out with its length in one frame, without
  the node's signed peer record where an earlier answer on the stream carried it, and, to a
  Legion reader's GET_VALUE request, as a delta (``dht.records.read_answer``): against the
  entries the request names, or against what this node told the reader with the request's
  token (``dht.told``).
- ``InboundStreams`` (the serving end): a stream waits ``SERVE_IDLE_SECONDS`` for its next message,
  its first message only ``first_message_seconds``, and a message (read and answer) has
  ``message_seconds``. What remote peers can hold open is capped: ``MAX_INBOUND_PER_PEER``
  streams a peer and ``MAX_INBOUND`` in all; beyond either the longest-idle stream is closed
  for the new one, or, with none idle, the new one is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import trio
import varint
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.common import MAX_DHT_MESSAGE_SIZE
from libp2p.kad_dht.kad_dht import PROTOCOL_ID
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.utils.varint import decode_uvarint, decode_varint_with_size, read_varint_prefixed_bytes_limited

from dht.records import TOKEN_BYTES, decode_read, read_answer
from dht.told import ToldReaders

log = logging.getLogger(__name__)

CLIENT_IDLE_SECONDS = 60.0  # an idle outbound stream is closed after this (its node waits longer)
SERVE_IDLE_SECONDS = 90.0  # an inbound stream waits this long for its next message (go-libp2p: 60 s)
MAX_IDLE_OUTBOUND = 256  # idle outbound streams kept, all nodes together (the longest idle closed first)
MAX_IDLE_OUTBOUND_PER_NODE = 2
MAX_INBOUND = 512  # inbound Kademlia streams open at once, all peers together
MAX_INBOUND_PER_PEER = 16


@dataclass
class _Kept:
    stream: INetStream
    record: bytes  # the last peer record it carried
    used: float = 0.0


class StreamPool:
    """Requests to Kademlia nodes, each on a stream kept open for the node's next request."""

    def __init__(self, host: IHost, idle_seconds: float = CLIENT_IDLE_SECONDS) -> None:
        self.host = host
        self.idle_seconds = idle_seconds
        self._idle: OrderedDict[tuple[ID, int], _Kept] = OrderedDict()  # the longest idle first
        self._closing: list[INetStream] = []  # streams no longer kept, to close
        self.opened = 0  # streams opened (a measure of what reuse saves)

    async def request(self, peer: ID, message: Message) -> Message:
        """``message``'s answer from ``peer``. Raises on a failed stream, a closed one, a
        malformed answer; the caller bounds the time. A stream's first message carries this
        peer's signed addresses (its peer record), which is how a node learns to dial it, and so
        does the first after they change (py-libp2p's requests carry it every time)."""
        record = env_to_send_in_RPC(self.host)[0]
        kept = self._take(peer)
        if kept is not None:
            try:
                return await self._exchange(peer, kept, message, record)
            except trio.Cancelled:
                raise
            except Exception as exc:  # the node closed it while idle, or dropped the connection
                log.debug("reused DHT stream to %s failed (%s); retrying on a new one", peer, exc)
        self.opened += 1
        return await self._exchange(peer, _Kept(await self.host.new_stream(peer, [PROTOCOL_ID]), b""), message, record)

    async def _exchange(self, peer: ID, kept: _Kept, message: Message, record: bytes) -> Message:
        if kept.record != record:
            message = _with_record(message, record)
        try:
            await kept.stream.write(varint.encode(len(payload := message.SerializeToString())) + payload)
            answer = Message()
            answer.ParseFromString(await read_varint_prefixed_bytes_limited(kept.stream, MAX_DHT_MESSAGE_SIZE))
        except BaseException:  # an answer may still be on its way: the stream cannot carry another request
            with trio.CancelScope(shield=True):
                await _close(kept.stream, reset=True)
            raise
        kept.record = record
        self._keep(peer, kept)
        return answer

    def _take(self, peer: ID) -> _Kept | None:
        self._retire_idle()
        for slot in range(MAX_IDLE_OUTBOUND_PER_NODE):
            kept = self._idle.pop((peer, slot), None)
            if kept is not None:
                return kept
        return None

    def _keep(self, peer: ID, kept: _Kept) -> None:
        free = [slot for slot in range(MAX_IDLE_OUTBOUND_PER_NODE) if (peer, slot) not in self._idle]
        if not free:
            self._closing.append(kept.stream)
            return
        kept.used = trio.current_time()
        self._idle[(peer, free[0])] = kept
        while len(self._idle) > MAX_IDLE_OUTBOUND:
            self._closing.append(self._idle.popitem(last=False)[1].stream)

    def _retire_idle(self) -> None:
        """Streams idle too long go to be closed (by ``close_retired``, not on a request's time)."""
        now = trio.current_time()
        while self._idle and now - next(iter(self._idle.values())).used > self.idle_seconds:
            self._closing.append(self._idle.popitem(last=False)[1].stream)

    async def close_retired(self) -> None:
        self._retire_idle()
        while self._closing:
            await _close(self._closing.pop())

    async def close_retired_forever(self) -> None:
        while True:
            await trio.sleep(max(1.0, self.idle_seconds / 4))
            await self.close_retired()

    async def aclose(self) -> None:
        """Close every idle stream (a node leaving), for at most a few seconds."""
        self._closing.extend(kept.stream for kept in self._idle.values())
        self._idle.clear()
        with trio.move_on_after(3):
            await self.close_retired()
        self._closing.clear()


def _lone_varint(data: bytes) -> bool:
    return 0 < len(data) <= 10 and data[-1] < 0x80 and all(b & 0x80 for b in data[:-1])


def _with_record(message: Message, record: bytes) -> Message:
    copy = Message()
    copy.CopyFrom(message)
    copy.senderRecord = record
    return copy


async def _close(stream: INetStream, reset: bool = False) -> None:
    with trio.move_on_after(1), contextlib.suppress(Exception):
        await (stream.reset() if reset else stream.close())


class ServedStream:
    """An inbound Kademlia stream as py-libp2p's handler reads it (``KadDHT._do_handle_stream``
    loops over its messages), with deadlines: between messages a read that waits past its idle
    deadline reads as the stream's end (the handler closes it cleanly); within a message, reads and
    the answer's writes share ``message_seconds``, past which a read comes back short and the
    handler resets the stream, or a write raises."""

    def __init__(self, stream: INetStream, first_message_seconds: float, message_seconds: float,
                 idle_seconds: float = SERVE_IDLE_SECONDS) -> None:
        self._stream = stream
        self.peer: ID = stream.muxed_conn.peer_id
        self.message_seconds = message_seconds
        self.idle_seconds = idle_seconds
        self.idle_since: float | None = trio.current_time()  # None while a message is read or answered
        self._idle_deadline = self.idle_since + first_message_seconds
        self._message_deadline = 0.0
        self._idle_wait: trio.CancelScope | None = None
        self.messages = 0
        self.on_answered: Callable[[float], None] | None = None  # given each message's seconds
        self.after_first_answer: Callable[[], Awaitable[Any]] | None = None
        self.expired = False  # its idle deadline passed
        self.ended_for_room = False
        self._length: bytes | None = None  # an answer's length, written with the answer
        self._record_sent = b""  # the peer record an answer on it carried last
        self._request = bytearray()  # the message being answered, as read (py-libp2p's handler caps its size)
        self.told: ToldReaders | None = None  # what this node told its readers (read answers as deltas)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        if self._length is not None:  # (py-libp2p's handler writes the answer before it reads again)
            await self._stream.write(self._length)
            self._length = None
        if self.idle_since is None:
            with trio.move_on_at(self._message_deadline):
                data = await self._stream.read(n)
                self._request += data
                return data
            return b""  # mid-message: the handler sees a short message and resets the stream
        data = b""
        with trio.move_on_at(self._idle_deadline) as wait:
            self._idle_wait = wait
            with contextlib.suppress(StreamEOF):  # the asking end closed it: py-libp2p's handler ends cleanly on b""
                data = await self._stream.read(n)
        self._idle_wait = None
        if wait.cancelled_caught:
            self.expired = not self.ended_for_room
            return b""
        if data:
            self.idle_since = None
            self._message_deadline = trio.current_time() + self.message_seconds
            self._request[:] = data
        return data

    @property
    def waiting(self) -> bool:
        """Whether it waits for its next message (and may be ended to make room)."""
        return self._idle_wait is not None

    async def write(self, data: bytes) -> None:
        """py-libp2p's handler writes an answer's length, then the answer: both go out as one
        frame, and the answer without this node's signed peer record where the stream's earlier
        answer carried the same one (the asker has it)."""
        if self.idle_since is not None:  # not answering a message (py-libp2p's handler does not)
            await self._stream.write(data)
            return
        if self._length is None and _lone_varint(data):
            self._length = data
            return
        if self._length is not None:
            data, self._length = self._compact(self._length, data), None
            self._request.clear()
        with trio.fail_after(max(0.0, self._message_deadline - trio.current_time())):
            await self._stream.write(data)
        now = trio.current_time()
        self.messages += 1
        if self.on_answered is not None:
            self.on_answered(now - (self._message_deadline - self.message_seconds))
        self.idle_since, self._idle_deadline = now, now + self.idle_seconds
        if self.messages == 1 and self.after_first_answer is not None:
            with trio.move_on_after(self.message_seconds), contextlib.suppress(Exception):
                await self.after_first_answer()

    def _compact(self, length: bytes, body: bytes) -> bytes:
        answer = Message()
        try:
            if decode_uvarint(length) != len(body):
                raise ValueError("not a length-prefixed answer")
            answer.ParseFromString(body)
        except Exception:
            return length + body
        changed = False
        if answer.senderRecord and answer.senderRecord == self._record_sent:
            answer.ClearField("senderRecord")
            changed = True
        else:
            self._record_sent = answer.senderRecord
        if answer.type == Message.MessageType.GET_VALUE and answer.record.value and self.told is not None \
                and (read := self._read()) is not None:
            key, (token, known) = read
            since = self.told.since(self.peer, key, token) if token else None
            fresh = os.urandom(TOKEN_BYTES)
            answer.record.value, told = read_answer(answer.record.value, known, since, fresh)
            self.told.remember(self.peer, key, fresh, told)
            changed = True
        if changed:
            body = answer.SerializeToString()
        return varint.encode(len(body)) + body

    def _read(self) -> tuple[bytes, tuple[bytes, frozenset[bytes]]] | None:
        """The key of the GET_VALUE request being answered, and its reader's token and the digests
        of the entries it holds (``dht.records.decode_read``); None for another request."""
        request = Message()
        try:
            length, start = decode_varint_with_size(bytes(self._request))
            request.ParseFromString(bytes(self._request[start:start + length]))
        except Exception:
            return None
        if request.type != Message.MessageType.GET_VALUE or not request.HasField("record"):
            return None
        read = decode_read(request.record.value)
        return None if read is None else (request.key, read)

    def close_idle(self) -> None:
        """End the stream at its wait for the next message (to make room for another)."""
        if self._idle_wait is not None:
            self.ended_for_room = True
            self._idle_wait.cancel()


class InboundStreams:
    """The inbound Kademlia streams a node serves, within ``MAX_INBOUND_PER_PEER`` a peer and
    ``MAX_INBOUND`` in all."""

    def __init__(self, limit: int = MAX_INBOUND, per_peer: int = MAX_INBOUND_PER_PEER) -> None:
        self.limit = limit
        self.per_peer = per_peer
        self._open: set[ServedStream] = set()
        self._per_peer: dict[ID, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, stream: ServedStream) -> bool:
        """Whether ``stream`` may be served: over a cap, the longest-idle stream of the peer (or
        of all) is told to end, and without one idle, ``stream`` is not admitted."""
        if self._per_peer.get(stream.peer, 0) >= self.per_peer:
            if not self._end_longest_idle([s for s in self._open if s.peer == stream.peer]):
                return False
        elif len(self._open) >= self.limit and not self._end_longest_idle(list(self._open)):
            return False
        self._open.add(stream)
        self._per_peer[stream.peer] = self._per_peer.get(stream.peer, 0) + 1
        return True

    def release(self, stream: ServedStream) -> None:
        if stream in self._open:
            self._open.discard(stream)
            left = self._per_peer[stream.peer] - 1
            if left:
                self._per_peer[stream.peer] = left
            else:
                del self._per_peer[stream.peer]

    def _end_longest_idle(self, streams: list[ServedStream]) -> bool:
        idle = [s for s in streams if s.waiting]
        if not idle:
            return False
        longest = min(idle, key=lambda s: s.idle_since or 0.0)  # waiting: idle_since is set
        longest.close_idle()
        self.release(longest)  # its handler ends at once; its place is the new stream's
        return True
