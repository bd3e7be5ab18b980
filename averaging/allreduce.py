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
from typing import Any

import multiaddr
import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.codecs import BLOCK, Codec, CodecError, encode_with_feedback, get_codec
from averaging.wire import FrameError, read_frame, write_frame

log = logging.getLogger(__name__)

PROTOCOL = "/legion/allreduce/1.0.0"
REPAIR_PROTOCOL = "/legion/allreduce-repair/1.0.0"
CHUNK_VALUES = 1 << 18  # values per streamed chunk (1 MiB as float32), a multiple of BLOCK
MAX_PAYLOAD = 8 * CHUNK_VALUES + 1024  # the largest encoding of one chunk (top-k at ratio 1)
REPAIR_GRACE = 30.0  # seconds a finished round keeps answering repair requests
KEEPALIVE = 1.0  # seconds between an owner's "still collecting" frames
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

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def part(self, index: int) -> tuple[int, int]:
        return self.bounds[index], self.bounds[index + 1]

    def to_wire(self) -> dict[str, Any]:
        return {"group": self.group_id, "members": list(self.members),
                "addrs": [list(a) for a in self.addrs], "bounds": list(self.bounds), "codec": self.codec}

    @classmethod
    def from_wire(cls, wire: Any) -> "GroupSpec":
        try:
            spec = cls(str(wire["group"]), tuple(wire["members"]), tuple(tuple(a) for a in wire["addrs"]),
                       tuple(int(b) for b in wire["bounds"]), str(wire["codec"]))
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
    """A finished part as every member receives it: the owner's encoded average, the contributors
    it was averaged over, and whether every chunk had the same contributors."""

    contributors: tuple[int, ...]
    chunks: list[bytes]
    consistent: bool = True


def _chunk_ranges(start: int, end: int) -> list[tuple[int, int]]:
    return [(s, min(s + CHUNK_VALUES, end)) for s in range(start, end, CHUNK_VALUES)] or [(start, start)]


class _OwnerState:
    """Owner side of one round. Chunk ``c`` of the part is averaged as soon as every sender still
    live has delivered its chunk ``c``, so the answer streams back while later chunks arrive."""

    def __init__(self, ranges: list[tuple[int, int]], members: int, max_norm_ratio: float) -> None:
        self.ranges = ranges
        self.live = set(range(members))  # senders not failed or excluded
        self.arrived: list[dict[int, np.ndarray]] = [{} for _ in ranges]  # decoded, until averaged
        self.weights: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.progress: dict[int, float] = {}  # trio time of each sender's last chunk
        self.results: list[bytes | None] = [None] * len(ranges)
        self.chunk_contributors: list[frozenset[int]] = []
        self.max_norm_ratio = max_norm_ratio
        self.result: _Part | None = None
        self.finalized = trio.Event()
        self.serving: dict[int, int] = {}  # contribution streams still open, per sender
        self._changed = trio.Event()

    def changed(self) -> trio.Event:
        return self._changed

    def pulse(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def fail(self, sender: int, reason: str) -> None:
        if sender in self.live:
            self.live.discard(sender)
            self.failed[sender] = reason
            self.pulse()

    def outliers(self, chunk: int) -> list[int]:
        """Senders whose chunk norm is absurd next to the median of the others' (needs 3 or more)."""
        norms = {s: float(np.linalg.norm(v)) for s, v in self.arrived[chunk].items() if s in self.live}
        if len(norms) < 3:
            return []
        return [s for s, n in norms.items()
                if n > self.max_norm_ratio * max(float(np.median([m for t, m in norms.items() if t != s])), 1e-12)]


class RoundState:
    """Everything one member holds for one round; also serves its owner streams and repairs."""

    def __init__(self, spec: GroupSpec, me: int, flat: np.ndarray, weight: float,
                 send_residual: np.ndarray | None, result_residual: np.ndarray | None,
                 max_norm_ratio: float) -> None:
        self.spec, self.me, self.flat, self.weight = spec, me, flat, weight
        self.codec: Codec = get_codec(spec.codec)
        self.send_residual, self.result_residual = send_residual, result_residual
        self.owner = _OwnerState(_chunk_ranges(*spec.part(me)), len(spec.members), max_norm_ratio)
        self.output = np.empty(spec.total, np.float32)
        self.parts: dict[int, _Part] = {}
        self.stats = RoundStats(spec.group_id, list(spec.members))
        self.deadline = math.inf
        self.chunk_timeout = 30.0  # longest wait for one chunk to move, from the bandwidth estimate
        self.exchanged = False  # the direct exchange with every owner is over: a part still
        #                         missing now can only come through repair


def _check_weight(weight: Any) -> float:
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or not 0 < weight < 1e12:
        raise FrameError(f"weight {weight!r} is not a positive finite number")
    return float(weight)


async def _read_chunk(stream: INetStream, state: RoundState, index: int, size: int, what: str) -> bytes:
    """One ``{"c": index}`` frame of the right size, within the round's stall timeout."""
    with trio.move_on_after(state.chunk_timeout) as stall:
        header, payload = await read_frame(stream, MAX_PAYLOAD)
    if stall.cancelled_caught:
        raise FrameError(f"{what} chunk {index} stalled for {state.chunk_timeout:.1f}s")
    if header.get("c") != index or len(payload) != state.codec.encoded_size(size):
        raise FrameError(f"{what} chunk {index} has the wrong index or size")
    state.stats.bytes_received += len(payload)
    return payload


async def _write_chunk(stream: INetStream, state: RoundState, index: int, payload: bytes, what: str) -> None:
    with trio.move_on_after(state.chunk_timeout) as stall:
        sent = await write_frame(stream, {"c": index}, payload)
    if stall.cancelled_caught:
        raise FrameError(f"sending {what} chunk {index} stalled for {state.chunk_timeout:.1f}s")
    state.stats.bytes_sent += sent  # not `+= await`: that reads the counter before awaiting


class AllReduce:
    """Runs butterfly rounds on a host; ``register_handlers`` once, then ``run(...)`` per round."""

    def __init__(self, host: IHost, *, max_norm_ratio: float = 100.0, wait_for_round: float = 10.0) -> None:
        self.host = host
        self.max_norm_ratio = max_norm_ratio
        self.wait_for_round = wait_for_round
        self._rounds: dict[str, RoundState] = {}
        self._round_started: dict[str, trio.Event] = {}
        self._expiries: dict[str, float] = {}

    def register_handlers(self) -> None:
        self.host.set_stream_handler(PROTOCOL, self._guarded(self._serve_contribution))
        self.host.set_stream_handler(REPAIR_PROTOCOL, self._guarded(self._serve_repair))

    def _guarded(self, handler):
        """Every handler: bounded in time, errors logged, never escaping to the host."""

        async def guarded(stream: INetStream) -> None:
            peer = stream.muxed_conn.peer_id
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
        if sender < 0 or sender == state.me or header.get("part") != state.me or sender in owner.serving:
            raise FrameError(f"{peer} is not a member sending our part of {spec.group_id}")
        owner.serving[sender] = 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._take_contribution, stream, state, sender, header)
                nursery.start_soon(self._answer, stream, state)
        finally:
            del owner.serving[sender]

    async def _take_contribution(self, stream: INetStream, state: RoundState, sender: int, header: dict) -> None:
        owner = state.owner
        try:
            owner.weights[sender] = _check_weight(header.get("weight"))
            if header.get("chunks") != len(owner.ranges):
                raise FrameError("wrong chunk count")
            for index, (a, b) in enumerate(owner.ranges):
                payload = await _read_chunk(stream, state, index, b - a, "contribution")
                values = await trio.to_thread.run_sync(state.codec.decode, payload, b - a)
                if sender not in owner.live or owner.results[index] is not None:
                    continue  # excluded, or too late for this chunk: read on, so the answer still flows
                owner.arrived[index][sender] = values
                owner.progress[sender] = trio.current_time()
                owner.pulse()
        except BaseException as exc:
            owner.fail(sender, str(exc) or type(exc).__name__)
            raise

    async def _answer(self, stream: INetStream, state: RoundState) -> None:
        """Stream the averaged chunks back as they are ready, keepalives in between (a silent
        owner is a hung owner), then the contributors."""
        owner = state.owner
        with trio.move_on_at(state.deadline):
            for index in range(len(owner.ranges)):
                while owner.results[index] is None and not owner.finalized.is_set():
                    await write_frame(stream, {"t": "wait"})
                    with trio.move_on_after(KEEPALIVE):
                        await owner.changed().wait()
                if owner.results[index] is None:
                    return  # finalized without this chunk: the part is void
                await _write_chunk(stream, state, index, owner.results[index], "result")
            await owner.finalized.wait()
            part = owner.result
            sent = await write_frame(stream, {"t": "done", "contributors": list(part.contributors),
                                              "consistent": part.consistent})
            state.stats.bytes_sent += sent

    async def _finalize_owner(self, state: RoundState) -> None:
        """Average the part chunk by chunk, in order, as contributions arrive."""
        owner, spec = state.owner, state.spec
        start = owner.ranges[0][0]
        if np.isfinite(state.flat[start:owner.ranges[-1][1]]).all():
            owner.weights[state.me] = state.weight
        else:  # our own update is garbage too: average the others' (who reject it as well)
            log.warning("%s: own contribution holds NaN or infinity; excluded", spec.group_id)
            owner.fail(state.me, "own contribution is not finite")
        round_start = trio.current_time()
        with trio.move_on_at(state.deadline):
            for index, (a, b) in enumerate(owner.ranges):
                if state.me in owner.live:
                    owner.arrived[index][state.me] = state.flat[a:b]
                while True:
                    changed = owner.changed()
                    waiting = [s for s in owner.live if s not in owner.arrived[index]]
                    if not waiting:
                        break
                    now = trio.current_time()
                    for s in waiting:  # stalled or never came
                        if now - owner.progress.get(s, round_start) > state.chunk_timeout:
                            owner.fail(s, f"no chunk {index} within {state.chunk_timeout:.1f}s")
                    with trio.move_on_after(0.25):
                        await changed.wait()
                for s in owner.outliers(index):
                    log.warning("excluding %s from %s: its update's norm is absurd", spec.members[s], spec.group_id)
                    owner.fail(s, "absurd update norm")
                contributors = frozenset(s for s in owner.arrived[index] if s in owner.live)
                residual = None if state.result_residual is None else state.result_residual[a:b]
                payload, decoded = await trio.to_thread.run_sync(
                    self._average_chunk, state.codec, owner, index, contributors, residual)
                state.output[a:b] = decoded
                owner.chunk_contributors.append(contributors)
                owner.arrived[index] = {}
                owner.results[index] = payload
                owner.pulse()
        complete = len(owner.chunk_contributors) == len(owner.ranges)
        consistent = complete and len(set(owner.chunk_contributors)) == 1
        for sender, reason in owner.failed.items():
            log.info("%s: no contribution from %s: %s", spec.group_id, spec.members[sender], reason)
        if complete:
            owner.result = _Part(tuple(sorted(owner.chunk_contributors[0])) if consistent else (),
                                 list(owner.results), consistent)
            state.parts[state.me] = owner.result
        owner.finalized.set()
        owner.pulse()

    @staticmethod
    def _average_chunk(codec: Codec, owner: _OwnerState, index: int, contributors: frozenset[int],
                       residual: np.ndarray | None) -> tuple[bytes, np.ndarray]:
        a, b = owner.ranges[index]
        total = np.zeros(b - a, np.float32)
        weight = 0.0
        for sender in contributors:
            total += owner.arrived[index][sender] * np.float32(owner.weights[sender])
            weight += owner.weights[sender]
        average = total / np.float32(weight) if weight else total
        payload = encode_with_feedback(codec, average, residual)
        return payload, codec.decode(payload, b - a)

    # ---- member side --------------------------------------------------------------------------

    async def _exchange_with_owner(self, state: RoundState, owner: int, deadline: float) -> None:
        spec = state.spec
        ranges = _chunk_ranges(*spec.part(owner))
        peer = ID.from_base58(spec.members[owner])
        with trio.move_on_at(deadline):
            try:
                stream = await self.host.new_stream(peer, [PROTOCOL])
            except Exception as exc:
                log.info("%s: cannot reach owner %s: %s", spec.group_id, peer, exc)
                return
            try:
                sent = await write_frame(
                    stream, {"group": spec.group_id, "part": owner, "weight": state.weight, "chunks": len(ranges)})
                state.stats.bytes_sent += sent
                async with trio.open_nursery() as nursery:  # send and receive at once: the answer streams back early
                    nursery.start_soon(self._send_contribution, stream, state, ranges)
                    await self._receive_part(stream, state, owner)
            except* (FrameError, CodecError) as group:  # bare, or from the send/receive nursery
                log.info("%s: part %d from %s failed: %s", spec.group_id, owner, peer, group.exceptions[0])
            finally:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()

    async def _send_contribution(self, stream: INetStream, state: RoundState, ranges: list[tuple[int, int]]) -> None:
        for index, (a, b) in enumerate(ranges):
            residual = None if state.send_residual is None else state.send_residual[a:b]
            payload = await trio.to_thread.run_sync(encode_with_feedback, state.codec, state.flat[a:b], residual)
            await _write_chunk(stream, state, index, payload, "contribution")

    async def _receive_part(self, stream: INetStream, state: RoundState, owner: int) -> None:
        """Read an owner's answer: keepalives, the averaged chunks in order, then the contributors."""
        spec = state.spec
        ranges = _chunk_ranges(*spec.part(owner))
        chunks: list[bytes] = []
        decoded: list[np.ndarray] = []
        while True:
            with trio.move_on_after(max(3 * KEEPALIVE, state.chunk_timeout)) as silent:
                header, payload = await read_frame(stream, MAX_PAYLOAD)
            if silent.cancelled_caught:
                raise FrameError(f"owner {owner} went silent")
            kind = header.get("t")
            if kind == "wait":
                continue
            if kind == "done":
                break
            index = len(chunks)
            if index >= len(ranges) or header.get("c") != index:
                raise FrameError(f"result chunk {header.get('c')!r} out of order")
            a, b = ranges[index]
            if len(payload) != state.codec.encoded_size(b - a):
                raise FrameError(f"result chunk {index} has the wrong size")
            state.stats.bytes_received += len(payload)
            decoded.append(await trio.to_thread.run_sync(state.codec.decode, payload, b - a))
            chunks.append(payload)
        contributors = header.get("contributors")
        if len(chunks) != len(ranges) or not isinstance(contributors, list) or not isinstance(header.get("consistent"), bool) \
                or not all(isinstance(c, int) and 0 <= c < len(spec.members) for c in contributors):
            raise FrameError("malformed or incomplete result")
        if owner not in state.parts:
            start, end = spec.part(owner)
            state.output[start:end] = np.concatenate(decoded) if decoded else state.output[start:end]
            state.parts[owner] = _Part(tuple(sorted(set(contributors))), chunks, header["consistent"])

    async def _send_part(self, stream: INetStream, state: RoundState, part: _Part) -> None:
        """A whole finished part, as repair sends it: chunks, then the contributors."""
        for index, chunk in enumerate(part.chunks):
            await _write_chunk(stream, state, index, chunk, "repaired")
        await write_frame(stream, {"t": "done", "contributors": list(part.contributors), "consistent": part.consistent})

    async def _repair(self, state: RoundState, owner: int, deadline: float) -> None:
        """Ask the other members for a part until one has it or every one says it never came."""
        spec = state.spec
        with trio.move_on_at(deadline):
            while owner not in state.parts:
                # Members that cannot have the part: those whose exchange ended without it, and
                # those we cannot reach (dead, so not survivors whose view must match ours).
                without = 0
                for member in range(len(spec.members)):
                    if member in (state.me, owner) or owner in state.parts:
                        continue
                    answer = {}
                    with trio.move_on_after(5):
                        try:
                            stream = await self.host.new_stream(ID.from_base58(spec.members[member]), [REPAIR_PROTOCOL])
                        except Exception as exc:
                            log.debug("repair: member %d unreachable: %s", member, exc)
                            without += 1
                            continue
                        try:
                            await write_frame(stream, {"group": spec.group_id, "part": owner})
                            answer, _ = await read_frame(stream, 0)
                            if answer.get("t") == "result-follows":
                                await self._receive_part(stream, state, owner)
                            await stream.close()
                        except FrameError as exc:
                            log.debug("repair of part %d from member %d failed: %s", owner, member, exc)
                    if answer.get("t") in ("never", "unknown"):
                        without += 1
                if owner in state.parts or without == len(spec.members) - 2:
                    return
                await trio.sleep(0.2)

    async def _serve_repair(self, stream: INetStream, peer: ID) -> None:
        with trio.fail_after(10):
            request, _ = await read_frame(stream, 0)
        state = self._rounds.get(request.get("group"))
        part = request.get("part")
        if state is None or peer.to_base58() not in state.spec.members or not isinstance(part, int):
            await write_frame(stream, {"t": "unknown"})
            return
        if part in state.parts:
            await write_frame(stream, {"t": "result-follows"})
            await self._send_part(stream, state, state.parts[part])
        else:
            await write_frame(stream, {"t": "never" if state.exchanged else "not-yet"})

    async def run(self, spec: GroupSpec, me: int, flat: np.ndarray, weight: float, *, deadline: float,
                  send_residual: np.ndarray | None = None, result_residual: np.ndarray | None = None,
                  bandwidth: float = 12.5e6) -> tuple[np.ndarray, RoundStats]:
        """Average ``flat`` with the group; returns the average and statistics or raises ``RoundFailed``.

        ``deadline`` (trio clock) bounds the whole round. Within it nothing waits on a fixed
        schedule: a transfer fails when it stalls (a chunk that does not move within a time
        sized from ``bandwidth``, bytes/s), and an owner still collecting sends keepalives, so a
        dead or hung member is noticed in seconds whatever the link speed."""
        spec.validate()
        weight = _check_weight(weight)
        if flat.dtype != np.float32 or flat.shape != (spec.total,):
            raise ValueError(f"vector of shape {flat.shape} does not match the group's {spec.total} values")
        state = RoundState(spec, me, flat, weight, send_residual, result_residual, self.max_norm_ratio)
        state.deadline = deadline
        # A chunk shares the link with the other members' streams both ways: allow 8x its share.
        state.chunk_timeout = 3 + 8 * 2 * len(spec.members) * state.codec.encoded_size(CHUNK_VALUES) / bandwidth
        self._rounds[spec.group_id] = state
        self._round_started.pop(spec.group_id, trio.Event()).set()
        for member, addrs in zip(spec.members, spec.addrs):
            if member != spec.members[me] and addrs:
                self._add_addrs(member, addrs)
        started = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._finalize_owner, state)
                for owner in range(len(spec.members)):
                    if owner != me:
                        nursery.start_soon(self._exchange_with_owner, state, owner, deadline)
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
            state.exchanged = True
            state.flat = None  # the caller's vector is not kept beyond the round
            self._expire_later(spec.group_id)

    def _conclude(self, state: RoundState) -> np.ndarray:
        spec, stats = state.spec, state.stats
        missing = [j for j in range(len(spec.members)) if j not in state.parts]
        sets = {state.parts[j].contributors for j in state.parts}
        if missing:
            stats.outcome, stats.reason = "failed", f"parts of owners {missing} never arrived"
        elif not all(part.consistent for part in state.parts.values()):
            stats.outcome, stats.reason = "failed", "a member dropped out in the middle of a part"
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

    def _expire_later(self, group_id: str) -> None:
        """Keep a finished round for repair requests for a while, then forget it."""
        now = time.monotonic()
        self._expiries[group_id] = now + REPAIR_GRACE
        for gid, when in list(self._expiries.items()):
            if when < now:
                self._rounds.pop(gid, None)
                del self._expiries[gid]
