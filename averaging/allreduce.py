"""Butterfly all-reduce of one flat float32 vector among an agreed group, over libp2p streams.

Reduce-scatter: member i streams part j of its vector (encoded, in chunks) to owner j. All-gather:
owner j averages what arrived complete and valid, and answers every sender on the same stream with
the encoded average and the exact set of contributors it used. A member that misses a part (its
owner died while answering) asks the other members for it (repair).

Outcome, the same on every survivor of crash faults: success when every part is present and all
owners report the same contributor set; otherwise the round fails everywhere. Survivors hold the
same parts (a part that reached any survivor reaches all through repair), so they decide alike.
A member that is killed or hung mid-round costs the others at most the round's deadlines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable

import multiaddr
import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.codecs import BLOCK, Codec, CodecError, encode_with_feedback, get_codec
from averaging.lanes import Lanes
from averaging.wire import FrameError, read_frame, stream_peer, write_frame_within

log = logging.getLogger(__name__)

PROTOCOL = "/legion/allreduce/1.0.0"
REPAIR_PROTOCOL = "/legion/allreduce-repair/1.0.0"
CHUNK_VALUES = 1 << 18  # values per streamed chunk (1 MiB as float32), a multiple of BLOCK
MAX_PAYLOAD = 8 * CHUNK_VALUES + 1024  # the largest encoding of one chunk (top-k at ratio 1)
REPAIR_GRACE = 30.0  # seconds a finished round keeps answering repair requests
REPAIR_ANSWER_SECONDS = 5.0  # a member that has not answered a repair request by then is hung or dead
KEEPALIVE = 1.0  # seconds between an owner's "still collecting" frames
FINISHED_NOTE_SECONDS = 1.0  # the longest a member spends telling another that its round is over
LINGER_POLL = 0.5  # seconds between a leaving member's checks on members still in their round
STALL_SLACK = 8  # a chunk may take this many times its share of the estimated bandwidth
RESULT_SENDS = 2  # an owner sends its part to this many members at a time (8 peers: 24 s, 29 s with 1)
assert CHUNK_VALUES % BLOCK == 0


class SpecError(ValueError):
    """A group description that cannot be right."""


@dataclass(frozen=True)
class GroupSpec:
    """What every member of a group agrees on before the all-reduce starts."""

    group_id: str
    members: tuple[str, ...]
    addrs: tuple[tuple[str, ...], ...]
    bounds: tuple[int, ...]
    codec: str
    send_concurrency: int = 0  # owners a member sends its contributions to at once; 0: all

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def part(self, index: int) -> tuple[int, int]:
        return self.bounds[index], self.bounds[index + 1]

    def to_wire(self) -> dict[str, Any]:
        return {"group": self.group_id, "members": list(self.members),
                "addrs": [list(a) for a in self.addrs], "bounds": list(self.bounds), "codec": self.codec,
                "send": self.send_concurrency}

    @classmethod
    def from_wire(cls, wire: Any) -> "GroupSpec":
        try:
            spec = cls(str(wire["group"]), tuple(wire["members"]), tuple(tuple(a) for a in wire["addrs"]),
                       tuple(int(b) for b in wire["bounds"]), str(wire["codec"]), int(wire.get("send", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise SpecError(f"malformed group spec: {exc}") from exc
        spec.validate()
        return spec

    def validate(self) -> None:
        n = len(self.members)
        if not 1 <= n <= 256 or len(self.addrs) != n or len(self.bounds) != n + 1 or len(set(self.members)) != n:
            raise SpecError("group spec sizes disagree")
        if self.bounds[0] != 0 or any(b > c for b, c in zip(self.bounds, self.bounds[1:])) or self.total > 2**31:
            raise SpecError("group spec bounds are not an increasing split")
        get_codec(self.codec)
        if not 0 <= self.send_concurrency <= n:
            raise SpecError("group spec send concurrency out of range")


@dataclass
class RoundStats:
    group_id: str
    members: list[str]
    outcome: str = "pending"
    reason: str = ""
    contributors: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)


class RoundFailed(Exception):
    """The round ended without an average every survivor agrees on; retry."""

    def __init__(self, reason: str, stats: RoundStats) -> None:
        super().__init__(reason)
        self.stats = stats


@dataclass
class _Part:
    """A finished part as every member receives it: the owner's encoded average and contributors."""

    contributors: tuple[int, ...]
    chunks: list[bytes]


def _chunk_ranges(start: int, end: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK_VALUES, end)) for s in range(start, end, CHUNK_VALUES)] or [(start, start)]


class _OwnerState:
    """Owner side of one round: accumulates complete contributions to this member's part."""

    def __init__(self, size: int, members: int, max_norm_ratio: float) -> None:
        self.sum = np.zeros(size, np.float32)
        self.pending = set(range(members))
        self.norms: dict[int, float] = {}
        self.weights: dict[int, float] = {}
        self.encoded: dict[int, list[bytes]] = {}
        self.failed: dict[int, str] = {}
        self.max_norm_ratio = max_norm_ratio
        self.resolved = trio.Event()
        self.result: _Part | None = None
        self.finalized = trio.Event()
        self.serving: dict[int, int] = {}  # contribution streams still open, per sender
        self.progress: dict[int, float] = {}  # trio time of each sender's last chunk
        self.lock = trio.Lock()
        self.sending = trio.Semaphore(RESULT_SENDS)

    def resolve(self, sender: int, reason: str | None = None) -> None:
        if reason is not None:
            self.failed[sender] = reason
        self.pending.discard(sender)
        if not self.pending:
            self.resolved.set()

    def add(self, sender: int, weight: float, values: np.ndarray, *, scratch: bool = False) -> None:
        """Add a contribution; ``scratch``: ``values`` may be overwritten (saves a temporary)."""
        self.norms[sender] = float(np.linalg.norm(values))
        self.weights[sender] = weight
        w = np.float32(weight)
        if w == 1:
            self.sum += values
        elif scratch:
            self.sum += np.multiply(values, w, out=values)
        else:
            self.sum += values * w

    def outliers(self) -> list[int]:
        """Contributors whose norm is absurd next to the median of the others (needs 3 or more)."""
        if len(self.norms) < 3:
            return []
        out = []
        for sender, norm in self.norms.items():
            others = [n for s, n in self.norms.items() if s != sender]
            if norm > self.max_norm_ratio * max(float(np.median(others)), 1e-12):
                out.append(sender)
        return out


class RoundState:
    """Everything one member holds for one round; also serves its owner streams and repairs."""

    def __init__(self, spec: GroupSpec, me: int, flat: np.ndarray, weight: float,
                 send_residual: np.ndarray | None, result_residual: np.ndarray | None,
                 max_norm_ratio: float) -> None:
        self.spec, self.me, self.flat, self.weight = spec, me, flat, weight
        self.codec: Codec = get_codec(spec.codec)
        self.send_residual, self.result_residual = send_residual, result_residual
        start, end = spec.part(me)
        self.owner = _OwnerState(end - start, len(spec.members), max_norm_ratio)
        self.output = np.empty(spec.total, np.float32)
        self.parts: dict[int, _Part] = {}
        self.stats = RoundStats(spec.group_id, list(spec.members))
        self.deadline = math.inf
        self.chunk_timeout = 30.0  # longest wait for one chunk to move, from the bandwidth estimate
        # Contributions on the wire at once (the spec's ``send_concurrency``, 0 for all), taken in
        # ring order: member m sends to owners m+1, m+2, ...
        self.parallel_sends = max(1, min(spec.send_concurrency or len(spec.members), len(spec.members) - 1))
        self.sending = trio.Semaphore(self.parallel_sends)
        self.part_seconds = 0.0  # the longest one part may take to send, with contributions queued
        self.exchanged = False  # the direct exchange with every owner is over: a part still
        #                         missing now can only come through repair
        self.finished: set[int] = {me}  # members whose round is over (they said so), or who are gone
        self.over = False  # our own round is over


async def _read_chunk(stream: INetStream, state: RoundState, index: int, size: int, what: str) -> bytes:
    """One ``{"c": index}`` frame holding ``size`` encoded values, within the stall timeout."""
    with trio.move_on_after(state.chunk_timeout) as stall:
        header, payload = await read_frame(stream, MAX_PAYLOAD)
    if stall.cancelled_caught:
        raise FrameError(f"{what} chunk {index} stalled for {state.chunk_timeout:.1f}s")
    if header.get("c") != index or len(payload) != state.codec.encoded_size(size):
        raise FrameError(f"{what} chunk {index} has the wrong index or size")
    state.stats.bytes_received += len(payload)
    return payload


async def _write_chunk(stream: INetStream, state: RoundState, index: int, payload: bytes, what: str) -> None:
    """One ``{"c": index}`` frame, within the stall timeout: a peer that stops reading (hung,
    SIGSTOP) must not hold us past it."""
    sent = await write_frame_within(stream, state.chunk_timeout, {"c": index}, payload, what=f"{what} chunk {index}")
    state.stats.bytes_sent += sent  # not `+= await`: that reads the counter before awaiting


def _check_weight(weight: Any) -> float:
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or not 0 < weight < 1e12:
        raise FrameError(f"weight {weight!r} is not a positive finite number")
    return float(weight)


class AllReduce:
    """Runs butterfly rounds on a host; ``register_handlers`` once, then ``run(...)`` per round."""

    def __init__(self, host: IHost, *, lanes: Lanes | None = None, max_norm_ratio: float = 100.0,
                 wait_for_round: float = 10.0) -> None:
        self.host = host
        self.lanes = lanes or Lanes(host)  # bulk data on lanes where the peer runs them
        self.max_norm_ratio = max_norm_ratio
        self.wait_for_round = wait_for_round
        self._rounds: dict[str, RoundState] = {}
        self._round_started: dict[str, trio.Event] = {}
        self._expiries: dict[str, float] = {}

    def register_handlers(self) -> None:
        self.lanes.serve(PROTOCOL, self._guarded(self._serve_contribution))
        self.lanes.serve(REPAIR_PROTOCOL, self._guarded(self._serve_repair))

    def _guarded(self, handler):
        """Every handler: bounded in time, errors logged, never escaping to the host."""

        async def guarded(stream: INetStream) -> None:
            peer = stream_peer(stream)
            try:
                with trio.move_on_after(600):
                    await handler(stream, peer)
            except (FrameError, CodecError, SpecError) as exc:
                log.warning("dropped bad all-reduce stream from %s: %s", peer, exc)
            except Exception as exc:
                log.info("all-reduce stream from %s ended: %s: %s", peer, type(exc).__name__, exc)
            finally:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()

        return guarded

    async def _round_for(self, group_id: Any) -> RoundState | None:
        """The local round ``group_id``, waiting briefly: a sender may start a moment before us."""
        if not isinstance(group_id, str) or len(group_id) > 128:
            raise FrameError("bad group id")
        if group_id not in self._rounds:
            event = self._round_started.setdefault(group_id, trio.Event())
            with trio.move_on_after(self.wait_for_round):
                await event.wait()
            if group_id not in self._rounds:
                self._round_started.pop(group_id, None)
                return None
        return self._rounds[group_id]

    # ---- owner side ---------------------------------------------------------------------------

    async def _serve_contribution(self, stream: INetStream, peer: ID) -> None:
        with trio.fail_after(self.wait_for_round):
            header, _ = await read_frame(stream, 0)
        state = await self._round_for(header.get("group"))
        if state is None:
            raise FrameError(f"contribution for unknown group {header.get('group')!r}")
        spec, owner = state.spec, state.owner
        sender = spec.members.index(peer.to_base58()) if peer.to_base58() in spec.members else -1
        if sender < 0 or sender == state.me or header.get("part") != state.me:
            raise FrameError(f"{peer} is not a member sending our part of {spec.group_id}")
        owner.serving[sender] = owner.serving.get(sender, 0) + 1
        try:
            await self._take_contribution(stream, state, sender, header)
        finally:
            owner.serving[sender] -= 1
            if not owner.serving[sender]:
                del owner.serving[sender]

    async def _take_contribution(self, stream: INetStream, state: RoundState, sender: int, header: dict) -> None:
        spec, owner = state.spec, state.owner
        start, end = spec.part(state.me)
        ranges = _chunk_ranges(start, end)
        try:
            weight = _check_weight(header.get("weight"))
            if header.get("chunks") != len(ranges):
                raise FrameError("wrong chunk count")
            chunks = []
            for index, (a, b) in enumerate(ranges):
                chunks.append(await _read_chunk(stream, state, index, b - a, "contribution"))
                owner.progress[sender] = trio.current_time()
            values = await trio.to_thread.run_sync(self._decode_part, state.codec, chunks, ranges)
            async with owner.lock:
                if owner.finalized.is_set():
                    raise FrameError("contribution arrived after the part was finalized")
                await trio.to_thread.run_sync(partial(owner.add, sender, weight, values, scratch=True))
            owner.encoded[sender] = chunks
            owner.resolve(sender)
        except (FrameError, CodecError) as exc:
            owner.resolve(sender, str(exc))
            raise
        except BaseException as exc:
            owner.resolve(sender, type(exc).__name__)
            raise
        with trio.move_on_at(state.deadline):
            await self._keepalive_until(stream, state, owner.finalized.wait)
            # few results on the wire at a time, as contributions (RoundState.sending)
            await self._keepalive_until(stream, state, owner.sending.acquire)
            try:
                await self._send_part(stream, state, owner.result)
            finally:
                owner.sending.release()

    @staticmethod
    async def _keepalive_until(stream: INetStream, state: RoundState, wait: Callable[[], Awaitable[Any]]) -> None:
        """Await ``wait()``, meanwhile sending the member a keepalive each second: to a member,
        a silent owner is a hung owner."""
        while True:
            with trio.move_on_after(KEEPALIVE):
                await wait()
                return
            await write_frame_within(stream, state.chunk_timeout, {"t": "wait"}, what="a keepalive")

    @staticmethod
    def _decode_part(codec: Codec, chunks: list[bytes], ranges: list[tuple[int, int]],
                     out: np.ndarray | None = None) -> np.ndarray:
        """The values of a part's chunks, written into ``out`` (a new array if None)."""
        start = ranges[0][0]
        out = np.empty(ranges[-1][1] - start, np.float32) if out is None else out
        for chunk, (a, b) in zip(chunks, ranges):
            out[a - start:b - start] = codec.decode(chunk, b - a)
        return out

    async def _send_part(self, stream: INetStream, state: RoundState, part: _Part) -> None:
        sent = await write_frame_within(stream, state.chunk_timeout, {
            "t": "result", "contributors": list(part.contributors), "chunks": len(part.chunks)}, what="a result header")
        state.stats.bytes_sent += sent
        for index, chunk in enumerate(part.chunks):
            await _write_chunk(stream, state, index, chunk, "result")

    async def _finalize_owner(self, state: RoundState) -> None:
        owner, spec = state.owner, state.spec
        start, end = spec.part(state.me)
        own = state.flat[start:end]
        if np.isfinite(own).all():
            async with owner.lock:
                await trio.to_thread.run_sync(owner.add, state.me, state.weight, own)
            owner.resolve(state.me)
        else:  # our own update is garbage too: average the others' (who reject it as well)
            log.warning("%s: own contribution holds NaN or infinity; excluded", spec.group_id)
            owner.resolve(state.me, "own contribution is not finite")
        started = trio.current_time()
        with trio.move_on_at(state.deadline):  # each contribution ends by completing, failing or stalling
            while not owner.resolved.is_set():
                with trio.move_on_after(0.5):
                    await owner.resolved.wait()
                now = trio.current_time()
                for sender in list(owner.pending):  # also those that never opened a stream
                    # a sender that has not started may still be sending to the owners before us
                    first = started + ((state.me - sender) % len(spec.members) - 1) * state.part_seconds
                    if now - owner.progress.get(sender, first) > state.chunk_timeout + self.wait_for_round:
                        owner.resolve(sender, f"no progress for {state.chunk_timeout + self.wait_for_round:.0f}s")
        for sender in list(owner.pending):
            owner.resolve(sender, "no complete contribution before the deadline")
        async with owner.lock:
            excluded = owner.outliers()
            if excluded:
                # Sum the others again rather than subtract: next to an absurd value, float32
                # subtraction would leave its rounding error in the average.
                for sender in excluded:
                    log.warning("excluding %s from %s: update norm %.3g is absurd", spec.members[sender],
                                spec.group_id, owner.norms[sender])
                    owner.weights.pop(sender)
                owner.sum[:] = 0
                for sender, weight in owner.weights.items():
                    values = own if sender == state.me else self._decode_part(
                        state.codec, owner.encoded[sender], _chunk_ranges(start, end))
                    owner.sum += values * np.float32(weight)
            contributors = tuple(sorted(owner.weights))
            total_weight = sum(owner.weights.values())
            average = owner.sum
            if total_weight:
                average /= np.float32(total_weight)
            residual = None if state.result_residual is None else state.result_residual[start:end]
            chunks = await trio.to_thread.run_sync(self._encode_chunks, state.codec, average, residual)
            await trio.to_thread.run_sync(self._decode_part, state.codec, chunks, _chunk_ranges(start, end),
                                          state.output[start:end])
        owner.encoded.clear()
        for sender, reason in owner.failed.items():
            log.info("%s: no contribution from %s: %s", spec.group_id, spec.members[sender], reason)
        owner.result = _Part(contributors, chunks)
        state.parts[state.me] = owner.result
        owner.finalized.set()
        owner.sum = None  # encoded into the result; contributions arriving now are refused

    @staticmethod
    def _encode_chunks(codec: Codec, values: np.ndarray, residual: np.ndarray | None) -> list[bytes]:
        out = []
        for a in range(0, max(len(values), 1), CHUNK_VALUES):
            b = min(a + CHUNK_VALUES, len(values))
            out.append(encode_with_feedback(codec, values[a:b], None if residual is None else residual[a:b]))
        return out

    # ---- member side --------------------------------------------------------------------------

    async def _exchange_with_owner(self, state: RoundState, owner: int, deadline: float) -> None:
        spec = state.spec
        ranges = _chunk_ranges(*spec.part(owner))
        peer = ID.from_base58(spec.members[owner])
        stream = None
        with trio.move_on_at(deadline):
            try:
                async with state.sending:
                    stream = await self.lanes.open_stream(peer, PROTOCOL)
                    sent = await write_frame_within(stream, state.chunk_timeout, {
                        "group": spec.group_id, "part": owner, "weight": state.weight, "chunks": len(ranges)},
                        what="a contribution header")
                    state.stats.bytes_sent += sent
                    for index, (a, b) in enumerate(ranges):
                        residual = None if state.send_residual is None else state.send_residual[a:b]
                        payload = await trio.to_thread.run_sync(
                            encode_with_feedback, state.codec, state.flat[a:b], residual)
                        await _write_chunk(stream, state, index, payload, "contribution")
                await self._receive_part(stream, state, owner)
            except (FrameError, CodecError) as exc:
                log.info("%s: part %d from %s failed: %s", spec.group_id, owner, peer, exc)
            except Exception as exc:  # opening the stream: the owner is unreachable
                log.info("%s: cannot reach owner %s: %s", spec.group_id, peer, exc)
            finally:
                if stream is not None:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()

    async def _receive_part(self, stream: INetStream, state: RoundState, owner: int) -> None:
        spec = state.spec
        start, end = spec.part(owner)
        ranges = _chunk_ranges(start, end)
        header = {"t": "wait"}
        while header.get("t") == "wait":
            with trio.move_on_after(3 * KEEPALIVE) as silent:
                header, _ = await read_frame(stream, 0)
            if silent.cancelled_caught:
                raise FrameError(f"owner {owner} silent for {3 * KEEPALIVE:g}s")
        contributors = header.get("contributors")
        if header.get("t") != "result" or header.get("chunks") != len(ranges) or not isinstance(contributors, list) \
                or not all(isinstance(c, int) and 0 <= c < len(spec.members) for c in contributors):
            raise FrameError("malformed result header")
        chunks = [await _read_chunk(stream, state, index, b - a, "result") for index, (a, b) in enumerate(ranges)]
        if owner in state.parts:
            return
        # straight into the output: a part that fails to decode there is overwritten by a repaired
        # copy, or the round fails and the output is dropped
        await trio.to_thread.run_sync(self._decode_part, state.codec, chunks, ranges, state.output[start:end])
        if owner not in state.parts:
            state.parts[owner] = _Part(tuple(sorted(set(contributors))), chunks)

    async def _repair(self, state: RoundState, owner: int, deadline: float) -> None:
        """Ask the members, the owner first, for a part until one sends it or none can have it."""
        spec = state.spec
        asked = [owner, *(m for m in range(len(spec.members)) if m not in (state.me, owner))]
        silent: set[int] = set()  # dead or hung: not survivors whose view must match ours
        with trio.move_on_at(deadline):
            while owner not in state.parts:
                without = len(silent)  # and those whose exchange ended without the part
                for member in asked:
                    if owner in state.parts:
                        return
                    if member in silent:
                        continue
                    answer = await self._ask_for_part(state, member, owner)
                    if answer == "no answer":
                        silent.add(member)
                    if answer in ("never", "unknown", "no answer"):
                        without += 1
                if without == len(asked):
                    return
                await trio.sleep(0.2)

    async def _ask_for_part(self, state: RoundState, member: int, part: int) -> str:
        """One repair request; returns the member's answer, "no answer" if it gave none in time.
        A part that follows is received within the usual stall timeouts."""
        spec = state.spec
        stream, answer = None, None
        try:
            with trio.move_on_after(REPAIR_ANSWER_SECONDS):
                stream = await self.lanes.open_stream(ID.from_base58(spec.members[member]), REPAIR_PROTOCOL)
                await write_frame_within(stream, state.chunk_timeout, {"group": spec.group_id, "part": part})
                answer, _ = await read_frame(stream, 0)
            if answer is None:
                return "no answer"
            if answer.get("t") == "result-follows":
                await self._receive_part(stream, state, part)
            return str(answer.get("t"))
        except FrameError as exc:
            log.debug("repair of part %d from member %d failed: %s", part, member, exc)
            return "failed"
        except Exception as exc:  # opening the stream: dead, or its connection aborted
            log.debug("repair: member %d unreachable: %s", member, exc)
            return "no answer"
        finally:
            if stream is not None:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()

    async def _serve_repair(self, stream: INetStream, peer: ID) -> None:
        with trio.fail_after(10):
            request, _ = await read_frame(stream, 0)
        state = self._rounds.get(request.get("group"))
        part = request.get("part")
        if state is not None and request.get("t") == "finished" and peer.to_base58() in state.spec.members:
            state.finished.add(state.spec.members.index(peer.to_base58()))
            self._forget_if_finished(state)
            return
        if request.get("t") == "status":
            running = state is not None and not state.over
            await write_frame_within(stream, REPAIR_ANSWER_SECONDS, {"t": "running" if running else "finished"})
            return
        if state is None or peer.to_base58() not in state.spec.members or not isinstance(part, int):
            await write_frame_within(stream, REPAIR_ANSWER_SECONDS, {"t": "unknown"})
            return
        if part in state.parts:
            await write_frame_within(stream, REPAIR_ANSWER_SECONDS, {"t": "result-follows"})
            await self._send_part(stream, state, state.parts[part])
        else:
            await write_frame_within(stream, REPAIR_ANSWER_SECONDS, {"t": "never" if state.exchanged else "not-yet"})

    async def run(self, spec: GroupSpec, me: int, flat: np.ndarray, weight: float, *, deadline: float,
                  send_residual: np.ndarray | None = None, result_residual: np.ndarray | None = None,
                  bandwidth: float = 12.5e6) -> tuple[np.ndarray, RoundStats]:
        """Average ``flat`` with the group; returns the average and statistics or raises ``RoundFailed``.

        ``deadline`` (trio clock) bounds the whole round. Within it nothing waits on a fixed
        schedule: a transfer fails when it stalls (a chunk that does not move within a time
        sized from ``bandwidth``, bytes/s), and an owner still collecting sends keepalives, so a
        dead or hung member is noticed in seconds whatever the link speed.

        The group's ``send_concurrency`` is how many owners a member sends its contributions to at
        once (0: all). Many streams fill a long link sooner than one slow-starting stream (4 peers
        on emulated 50 Mbit/s, 40 ms RTT links: 1.6x the bandwidth bound all at once, 2.3x one at a
        time); one at a time keeps owners from being flooded where CPU is short (8 peers x 100 MB
        on one 2-core machine: all at once, starved streams were reset by yamux and rounds failed)."""
        spec.validate()
        weight = _check_weight(weight)
        if flat.dtype != np.float32 or flat.shape != (spec.total,):
            raise ValueError(f"vector of shape {flat.shape} does not match the group's {spec.total} values")
        state = RoundState(spec, me, flat, weight, send_residual, result_residual, self.max_norm_ratio)
        state.deadline = deadline
        self._rounds[spec.group_id] = state
        self._round_started.pop(spec.group_id, trio.Event()).set()
        for member, addrs in zip(spec.members, spec.addrs):
            if member != spec.members[me] and addrs:
                self._add_addrs(member, addrs)
        started = trio.current_time()
        # A chunk shares the link with the other members' streams both ways: allow 8x its share.
        state.chunk_timeout = 3 + STALL_SLACK * 2 * len(spec.members) * state.codec.encoded_size(CHUNK_VALUES) / bandwidth
        if state.parallel_sends < len(spec.members) - 1:  # owners late in the ring wait for earlier parts
            largest = max(b - a for a, b in zip(spec.bounds, spec.bounds[1:]))
            state.part_seconds = STALL_SLACK * state.codec.encoded_size(largest) / bandwidth
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._finalize_owner, state)
                for step in range(1, len(spec.members)):  # rotated: members do not all start at owner 0
                    nursery.start_soon(self._exchange_with_owner, state, (me + step) % len(spec.members), deadline)
            # Our answers as an owner are on their way too (bounded): then the statistics are
            # complete, and returning cannot cut a member short of our part.
            with trio.move_on_at(deadline):
                while state.owner.serving:
                    await trio.sleep(0.01)
            state.stats.phase_seconds["exchange"] = trio.current_time() - started
            state.exchanged = True
            missing = [j for j in range(len(spec.members)) if j not in state.parts]
            if missing:
                async with trio.open_nursery() as nursery:
                    for owner in missing:
                        nursery.start_soon(self._repair, state, owner, deadline)
                state.stats.phase_seconds["repair"] = trio.current_time() - started - state.stats.phase_seconds["exchange"]
            return self._conclude(state), state.stats
        finally:
            state.exchanged = state.over = True
            state.output = None  # returned to the caller; repair needs only the encoded parts
            await self._tell_finished(state)
            state.flat = None  # the caller's vector is not kept beyond the round
            self._expire_later(spec.group_id)
            self._forget_if_finished(state)

    async def _tell_finished(self, state: RoundState) -> None:
        """Tell the other members our round is over: a member waiting in ``linger`` may leave once
        all have (until then it may hold a part someone still has to repair from it)."""
        with trio.CancelScope(shield=True):  # also when the round itself was cancelled
            async with trio.open_nursery() as nursery:
                for member in range(len(state.spec.members)):
                    if member != state.me:
                        nursery.start_soon(partial(self._send_note, state, member, "finished",
                                                   FINISHED_NOTE_SECONDS, answered=False))

    async def _send_note(self, state: RoundState, member: int, kind: str, seconds: float, *,
                         answered: bool) -> dict | None:
        """A small message about ``state``'s round to a member, over libp2p (not worth a lane):
        its answer (``{}`` if ``answered`` is false), or None if that did not happen within
        ``seconds``."""
        answer = None
        with trio.move_on_after(seconds), contextlib.suppress(Exception):
            stream = await self.host.new_stream(ID.from_base58(state.spec.members[member]), [REPAIR_PROTOCOL])
            try:
                await write_frame_within(stream, seconds, {"group": state.spec.group_id, "t": kind})
                answer = (await read_frame(stream, 0))[0] if answered else {}
            finally:
                with trio.move_on_after(1):
                    await stream.close()
        return answer

    async def linger(self) -> None:
        """Before a peer leaves: wait until every member of its recent rounds has finished or is
        gone (dead, or hung: it does not answer within ``REPAIR_ANSWER_SECONDS``), at most until
        the round's deadline, answering repair requests meanwhile. A member that left at once
        could take with it a part others still have to repair from it, and they would fail a
        round it reported as a success."""
        for state in list(self._rounds.values()):
            with trio.move_on_at(state.deadline):
                while len(state.finished) < len(state.spec.members):
                    async with trio.open_nursery() as nursery:
                        for member in set(range(len(state.spec.members))) - state.finished:
                            nursery.start_soon(self._check_finished, state, member)
                    await trio.sleep(LINGER_POLL)

    async def _check_finished(self, state: RoundState, member: int) -> None:
        answer = await self._send_note(state, member, "status", REPAIR_ANSWER_SECONDS, answered=True)
        if answer is None or answer.get("t") != "running":
            state.finished.add(member)

    def _conclude(self, state: RoundState) -> np.ndarray:
        spec, stats = state.spec, state.stats
        missing = [j for j in range(len(spec.members)) if j not in state.parts]
        sets = {state.parts[j].contributors for j in state.parts}
        if missing:
            stats.outcome, stats.reason = "failed", f"parts of owners {missing} never arrived"
        elif len(sets) != 1:
            stats.outcome, stats.reason = "failed", "owners averaged over different contributor sets"
        else:
            stats.outcome = "ok"
            stats.contributors = [spec.members[i] for i in sets.pop()]
            return state.output
        raise RoundFailed(stats.reason, stats)

    def _add_addrs(self, member: str, addrs: tuple[str, ...]) -> None:
        try:
            self.host.get_peerstore().add_addrs(ID.from_base58(member), [multiaddr.Multiaddr(a) for a in addrs], 600)
        except Exception as exc:
            log.debug("ignoring addresses of %s: %s", member, exc)

    def _forget_if_finished(self, state: RoundState) -> None:
        """Drop a round every member has finished: nobody will ask to repair from it (holding
        finished rounds' parts for the whole grace period slowed the next rounds ~30%)."""
        if state.over and len(state.finished) == len(state.spec.members):
            self._rounds.pop(state.spec.group_id, None)
            self._expiries.pop(state.spec.group_id, None)

    def _expire_later(self, group_id: str) -> None:
        """Keep a finished round for repair requests for a while, then forget it."""
        now = time.monotonic()
        self._expiries[group_id] = now + REPAIR_GRACE
        for gid, when in list(self._expiries.items()):
            if when < now:
                self._rounds.pop(gid, None)
                del self._expiries[gid]
