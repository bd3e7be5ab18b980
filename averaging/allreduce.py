"""Butterfly all-reduce of one flat float32 vector among an agreed group, over lanes (or libp2p streams).

Reduce-scatter: member i streams part j of its vector (encoded, in chunks) to owner j. All-gather:
owner j answers every sender on the same stream with the encoded average and the exact set of
contributors it used, chunk k as soon as every contributor's chunk k is in, so the two halves
overlap (``_OwnerState``). A member that misses a part (its owner died while answering) asks the
other members for it (repair). Every part ends with its owner's signature over the part's digest,
so a part relayed by another member is taken only as its owner made it.

Outcome, the same on every survivor of crash faults: success when every part is present and all
owners report the same contributor set; otherwise the round fails everywhere. Survivors hold the
same parts (a part that reached any survivor reaches all through repair), so they decide alike.
A member that is killed or hung mid-round costs the others at most the round's deadlines.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
from collections import Counter
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable, Sequence

import multiaddr
import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.codecs import BLOCK, Codec, CodecError, encode_with_feedback, get_codec
from averaging.lanes import Lanes
from averaging.partition import cell_bounds
from averaging.wire import FrameError, PerPeerLimit, read_frame, read_frame_within, stream_peer, write_frame, write_frame_within
from dht.records import RecordError, ed25519_key

log = logging.getLogger(__name__)

# 1.1: a part's chunks are followed by its owner's signature (``_part_digest``)
PROTOCOL = "/legion/allreduce/1.1.0"
REPAIR_PROTOCOL = "/legion/allreduce-repair/1.1.0"
CHUNK_VALUES = 1 << 18  # values per streamed chunk (1 MiB as float32), a multiple of BLOCK
MAX_PAYLOAD = 8 * CHUNK_VALUES + 1024  # the largest encoding of one chunk (top-k at ratio 1)
REPAIR_GRACE = 30.0  # seconds a finished round keeps answering repair requests
REPAIR_ANSWER_SECONDS = 5.0  # a member that has not answered a repair request by then is hung or dead
KEEPALIVE = 1.0  # seconds between an owner's "still collecting" frames
BEGIN_RETRY_SECONDS = 0.5  # first pause before a member tries again to reach an owner (doubling)
FINISHED_NOTE_SECONDS = 1.0  # the longest a member spends telling another that its round is over
LINGER_POLL = 0.5  # seconds between a leaving member's checks on members still in their round
STALL_SLACK = 8  # a chunk may take this many times its share of the estimated bandwidth
MAX_STALL_SECONDS = 15.0  # a stream on which no byte moves for this long has stalled, whatever the estimate
MAX_ORDER_RANGES = 1 << 16  # ranges a group spec's order may list
MAX_MEMBERS = 256
MAX_ADDRS = 16  # addresses per member in a group spec
MAX_CELLS = MAX_MEMBERS  # cells of a two-level round's grid (``partition.cell_bounds``)
MAX_ORDERED_CELLS = 1 << 12  # cells of a two-level round's order: a sharded run's shards (up to 4096)
MAX_STREAMS_PER_PEER = 16  # contribution, repair and note streams one peer may have served at once
CLIP_RATIO = 2.0  # contributions are clipped to this many times the median norm (see _OwnerState.clip)
MAX_ABS_VALUE = 1e9  # larger contributed values are absurd (and their weighted sum could overflow float32)
# A contribution this large says how fast its sender uploads (``uploads_seen``). At 64 KiB, on links
# rate-limited to 10 Mbit/s with a 64 KB token bucket, 120 KB contributions arrived at up to 27 Mbit/s.
MIN_MEASURED_BYTES = 1 << 18
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
    # The round's vector as ranges of the caller's (natural) vector, concatenated; empty: natural
    # order. Lets a group give each member a part made of whole shards it owns (``Averager``).
    order: tuple[tuple[int, int], ...] = ()
    # Two-level rounds: the vector is cut into this many cells, the same in every group of the round:
    # ``partition.cell_bounds``'s grid, or with an ``order`` its ranges (a sharded run's shards,
    # cell i the i-th from the vector's start). Each member's part is whole cells, which its owner
    # reduces with the owners of the same cells in the round's other groups (``CrossReduce``)
    cells: int = 0

    @property
    def total(self) -> int:
        return self.bounds[-1]

    def part(self, index: int) -> tuple[int, int]:
        return self.bounds[index], self.bounds[index + 1]

    def to_wire(self) -> dict[str, Any]:
        return {"group": self.group_id, "members": list(self.members),
                "addrs": [list(a) for a in self.addrs], "bounds": list(self.bounds), "codec": self.codec,
                "send": self.send_concurrency, "order": [list(r) for r in self.order], "cells": self.cells}

    @classmethod
    def from_wire(cls, wire: Any) -> "GroupSpec":
        """The spec a leader sent; ``SpecError`` for anything malformed (types are checked
        exactly: a float, a bool or a string where an int belongs is an error, not converted)."""
        if not isinstance(wire, dict):
            raise SpecError("malformed group spec: not a map")
        try:
            members, addrs = _list(wire["members"], MAX_MEMBERS), _list(wire["addrs"], MAX_MEMBERS)
            bounds, order = _list(wire["bounds"], MAX_MEMBERS + 1), _list(wire.get("order", []), MAX_ORDER_RANGES)
            spec = cls(_str(wire["group"]), tuple(_str(m) for m in members),
                       tuple(tuple(_str(a) for a in _list(listed, MAX_ADDRS)) for listed in addrs),
                       tuple(_int(b) for b in bounds), _str(wire["codec"]), _int(wire.get("send", 0)),
                       tuple((_int(r[0]), _int(r[1])) for r in (_list(r, 2) for r in order) if len(r) == 2),
                       _int(wire.get("cells", 0)))
            if len(spec.order) != len(order):
                raise SpecError("an order range is not a pair")
        except KeyError as exc:
            raise SpecError(f"malformed group spec: no {exc}") from exc
        spec.validate()
        for member in spec.members:
            try:
                ID.from_base58(member)
            except Exception as exc:  # base58 or multihash errors of many kinds
                raise SpecError(f"group member {member[:60]!r} is not a peer id") from exc
        return spec

    def validate(self) -> None:
        n = len(self.members)
        if not 1 <= n <= MAX_MEMBERS or len(self.addrs) != n or len(self.bounds) != n + 1 or len(set(self.members)) != n:
            raise SpecError("group spec sizes disagree")
        if self.bounds[0] != 0 or any(b > c for b, c in zip(self.bounds, self.bounds[1:])) or self.total > 2**31:
            raise SpecError("group spec bounds are not an increasing split")
        try:
            get_codec(self.codec)
        except ValueError as exc:
            raise SpecError(f"group spec codec: {exc}") from exc
        if not 0 <= self.send_concurrency <= n:
            raise SpecError("group spec send concurrency out of range")
        if self.order:
            if len(self.order) > MAX_ORDER_RANGES or any(a >= b for a, b in self.order) or \
                    sum(b - a for a, b in self.order) != self.total:
                raise SpecError("group spec order is not a split of the vector")
            ends = sorted(self.order)
            if ends[0][0] != 0 or any(b != c for (_, b), (c, _) in zip(ends, ends[1:])):
                raise SpecError("group spec order is not a split of the vector")
        if not 0 <= self.cells <= (MAX_ORDERED_CELLS if self.order else MAX_CELLS):
            raise SpecError("group spec cell count out of range")
        if self.cells and self.order and len(self.order) != self.cells:
            raise SpecError("group spec order ranges are not its cells")
        if self.cells and not set(self.bounds) <= set(self._cell_edges()):
            raise SpecError("group spec parts are not whole cells")

    def _cell_edges(self) -> list[int]:
        """Where the cells of a two-level round begin and end, in the round's vector."""
        if not self.order:
            return cell_bounds(self.total, self.cells)
        return list(itertools.accumulate((b - a for a, b in self.order), initial=0))

    def cells_of(self, index: int) -> list[tuple[int, int, int]]:
        """The cells member ``index`` owns in a two-level round: (cell, start, end) in the round's
        vector, none empty. With an ``order``, its ranges are the cells, numbered by where they lie
        in the natural vector (every group's order holds the same ranges, in its own sequence)."""
        if not self.cells:
            return []
        start, end = self.part(index)
        edges = self._cell_edges()
        if self.order:  # the cell number of each range, in the round's sequence
            by_range = {r: i for i, r in enumerate(sorted(self.order))}
            numbers = [by_range[r] for r in self.order]
        else:
            numbers = list(range(self.cells))
        return [(numbers[i], a, b) for i, (a, b) in enumerate(zip(edges, edges[1:])) if start <= a < b <= end]

    def chunks(self, index: int) -> list[tuple[int, int]]:
        """Member ``index``'s part as streamed chunks. In a sharded two-level round none crosses a
        cell's edge: the codec's blocks then start at each cell's start, so a cell's result encodes
        alike in every group whatever its place in the group's vector (shards do not end on blocks,
        and a round's groups had stepped a shard each with its own rounding)."""
        start, end = self.part(index)
        if not (self.cells and self.order):
            return _chunk_ranges(start, end)
        edges = [start, *(e for e in self._cell_edges() if start < e < end), end]
        return [r for a, b in zip(edges, edges[1:]) for r in _chunk_ranges(a, b)]

    def permutation(self) -> np.ndarray | None:
        """Indices of the natural vector in the round's order (None: the natural order)."""
        if not self.order:
            return None
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in self.order])


def _int(value: Any) -> int:
    if type(value) is not int:
        raise SpecError(f"{value!r:.40} is not an integer")
    return value


def _str(value: Any, limit: int = 256) -> str:
    if type(value) is not str or len(value) > limit:
        raise SpecError(f"{value!r:.40} is not a string of at most {limit} characters")
    return value


def _list(value: Any, limit: int) -> list:
    if type(value) not in (list, tuple) or len(value) > limit:
        raise SpecError(f"{value!r:.40} is not a list of at most {limit} items")
    return list(value)


@dataclass
class RoundStats:
    group_id: str
    members: list[str]
    outcome: str = "pending"
    reason: str = ""
    contributors: list[str] = field(default_factory=list)
    blamed: list[str] = field(default_factory=list)  # owners whose part disagreed with most parts (failed rounds)
    bytes_sent: int = 0
    bytes_received: int = 0
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # member -> how fast its contribution to our part came, bytes/s (contributions of MIN_MEASURED_BYTES
    # or more): at most its upload, whatever it does, and a share of it while it sends to several owners
    # at once. (Times the owners it sends to at once, as it was, a sender sending to one owner after
    # the other would show several times its upload: on 10 Mbit/s links one showed 161.) What others
    # measured of a peer bounds its self-declared bandwidth where that matters (``shards.bids``).
    uploads_seen: dict[str, float] = field(default_factory=dict)


class RoundFailed(Exception):
    """The round ended without an average every survivor agrees on; retry."""

    def __init__(self, reason: str, stats: RoundStats) -> None:
        super().__init__(reason)
        self.stats = stats


@dataclass
class _Part:
    """A finished part as every member receives it: the owner's encoded average and contributors,
    and the owner's signature over them (``_part_digest``)."""

    contributors: tuple[int, ...]
    chunks: list[bytes]
    signature: bytes


def _part_digest(group_id: str, owner: int, contributors: tuple[int, ...], chunks: list[bytes]) -> bytes:
    """What an owner signs: the round, its index, the contributors and every encoded chunk."""
    digest = hashlib.blake2b(f"legion-part\0{group_id}\0{owner}\0{contributors}".encode(), digest_size=32)
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.digest()


def _check_part_signature(spec: GroupSpec, owner: int, part: _Part) -> None:
    """``FrameError`` unless ``part`` carries its owner's valid signature."""
    try:
        key = ed25519_key(ID.from_base58(spec.members[owner]).to_bytes())
    except RecordError as exc:
        raise FrameError(f"owner {owner} cannot sign its part: {exc}") from exc
    if not key.verify(_part_digest(spec.group_id, owner, part.contributors, part.chunks), part.signature):
        raise FrameError(f"part {owner} does not carry its owner's signature")


def add_addrs(host: IHost, peer: str, addrs: Sequence[str], ttl: float) -> None:
    """Put the addresses a peer declared (in a group spec, a matchmaking entry) in the peerstore;
    malformed ones are ignored."""
    try:
        host.get_peerstore().add_addrs(ID.from_base58(peer), [multiaddr.Multiaddr(a) for a in addrs], ttl)
    except Exception as exc:
        log.debug("ignoring addresses of %s: %s", peer, exc)


def _first_cause(exc: BaseException) -> BaseException:
    """The first exception inside ``exc``'s exception groups, or ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _chunk_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """A part's chunks. Smaller ones would shorten the pipeline's tail (an owner's last result chunk
    leaves after the last contribution is in) but cost CPU per byte: 64 Ki-value chunks took 4 x 20 MB
    on 50 Mbit/s links from 1.36x to 1.23-1.41x the bandwidth bound, but made 8 x 100 MB on loopback
    slower than hivemind (ratio 1.23-1.24 against 0.79-0.96) and 4 x 20 MB codec runs 1.4-1.8x slower."""
    return [(s, min(s + CHUNK_VALUES, end)) for s in range(start, end, CHUNK_VALUES)] or [(start, start)]


class _OwnerState:
    """Owner side of one round. Contributions to this member's part are summed chunk by chunk as
    they arrive, and result chunk k goes out as soon as every contributor's chunk k is in, so the
    two halves of the butterfly overlap instead of following each other.

    The contributors are fixed once every member has begun its contribution or failed; the result
    header names them before the first result chunk. Should one of them fail later (killed, hung,
    a payload that does not decode, an absurd norm found once all is in), the sum is rebuilt from
    the others' encoded chunks and the result starts over under a new header; members drop what
    they had of it. The last chunk goes out only when every contribution is complete and checked,
    so a part whose last chunk was sent is final."""

    def __init__(self, ranges: list[tuple[int, int]], members: int, max_norm_ratio: float, clip_ratio: float) -> None:
        self.start, self.ranges = ranges[0][0], ranges
        self.sum = np.zeros(ranges[-1][1] - ranges[0][0], np.float32)
        self.pending = set(range(members))  # neither complete nor failed
        self.weights: dict[int, float] = {}  # senders whose contribution began
        self.received: dict[int, int] = {}  # chunks of each sender summed so far
        self.in_sum: set[int] = set()  # senders with values in ``sum``
        self.norms2: dict[int, float] = {}  # squared norm of what each sender sent so far
        self.encoded: dict[int, list[bytes]] = {}  # each sender's chunks, to rebuild the sum without one
        self.failed: dict[int, str] = {}
        self.max_norm_ratio, self.clip_ratio = max_norm_ratio, clip_ratio
        self.scales: dict[int, float] = {}  # senders whose values count scaled down (norm clipping)
        self.rescaled = False  # the scales changed: the sum must be rebuilt
        self.contributors: tuple[int, ...] | None = None  # fixed once every member began or failed
        self.attempt = 0  # the result's header number: bumped when the contributors change
        self.result_chunks: list[bytes] = []  # of the current attempt, in order
        self.result: _Part | None = None  # the final part
        self.residual_start: np.ndarray | None = None  # error feedback before the first attempt
        self.crossed: np.ndarray | None = None  # a two-level round's result: the part's mean across groups
        self.changed = trio.Event()  # replaced on every change: wait on the one you looked at
        self.serving: dict[int, int] = {}  # contribution streams still open, per sender
        self.lock = trio.Lock()  # over ``sum``: chunk additions, rebuilds and result encoding

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def resolve(self, sender: int, reason: str | None = None) -> None:
        """``sender``'s contribution is complete (no reason) or failed; the first word counts."""
        if sender not in self.pending:
            return
        if reason is not None:
            self.failed[sender] = reason
        self.pending.discard(sender)
        self.notify()

    def begin(self, sender: int, weight: float) -> None:
        self.weights[sender], self.received[sender], self.norms2[sender] = weight, 0, 0.0
        self.encoded[sender] = []
        self.notify()

    def add_chunk(self, sender: int, index: int, values: np.ndarray, payload: bytes, norm2: float) -> None:
        """Sum ``sender``'s chunk ``index`` (callers hold ``lock``, then ``notify``)."""
        self.sum_into(sender, index, values)
        self.encoded[sender].append(payload)
        self.received[sender], self.norms2[sender] = index + 1, self.norms2[sender] + norm2
        self.in_sum.add(sender)

    def sum_into(self, sender: int, index: int, values: np.ndarray) -> None:
        a, b = self.ranges[index]
        w = np.float32(self.weights[sender] * self.scales.get(sender, 1.0))
        target = self.sum[a - self.start:b - self.start]
        target += values if w == 1 else values * w

    def outliers(self, among: tuple[int, ...]) -> list[int]:
        """Contributors whose norm is absurd next to the median of the others (needs 3 or more)."""
        if len(among) < 3:
            return []
        norms = {s: math.sqrt(self.norms2[s]) for s in among}
        out = []
        for sender, norm in norms.items():
            others = [n for s, n in norms.items() if s != sender]
            if norm > self.max_norm_ratio * max(float(np.median(others)), 1e-12):
                out.append(sender)
        return out

    def clip(self, among: tuple[int, ...]) -> bool:
        """Scale down every contribution whose norm exceeds ``clip_ratio`` times the median norm
        of ``among`` (3 or more) to that norm, so that no member can steer the mean far from the
        others' (a scaled or sign-flipped update inside the outlier filter counts at most as
        ``clip_ratio`` honest ones). True if a scale changed (the sum must be rebuilt)."""
        if len(among) < 3 or not self.clip_ratio:
            return False
        norms = {s: math.sqrt(self.norms2[s]) for s in among}
        limit = self.clip_ratio * float(np.median(list(norms.values())))
        scales = {s: limit / norm for s, norm in norms.items() if norm > limit > 0}
        changed = scales != self.scales
        self.scales = scales
        return changed


# (start, end, the weighted mean of values start:end of our part) -> what the members receive for
# them instead of the mean (an owner-side optimizer step, say); the same length, float32
ResultTransform = Callable[[int, int, np.ndarray], np.ndarray]
# A two-level round's owner step: (cell, the group's weighted mean of that cell, the group's total
# weight, how many members contributed to it) -> the cell's mean across the round's groups (the
# same on every group that takes part), the same length, float32. Raising fails the round.
CrossReduce = Callable[[int, np.ndarray, float, int], Awaitable[np.ndarray]]


class RoundState:
    """Everything one member holds for one round; also serves its owner streams and repairs."""

    def __init__(self, spec: GroupSpec, me: int, flat: np.ndarray, weight: float,
                 send_residual: np.ndarray | None, result_residual: np.ndarray | None,
                 max_norm_ratio: float, clip_ratio: float, transform: "ResultTransform | None" = None,
                 cross: "CrossReduce | None" = None, max_weight: float = 1e12) -> None:
        self.spec, self.me, self.flat, self.weight = spec, me, flat, weight
        self.transform, self.max_weight = transform, max_weight
        self.cross = cross if spec.cells else None
        if self.cross is not None:  # every group must encode the cross-group mean alike: no feedback
            result_residual = None
        self.codec: Codec = get_codec(spec.codec)
        self.send_residual, self.result_residual = send_residual, result_residual
        self.owner = _OwnerState(spec.chunks(me), len(spec.members), max_norm_ratio, clip_ratio)
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
    """One ``{"c": index}`` frame holding ``size`` encoded values, unless the stream stalls."""
    header, payload = await read_frame_within(stream, state.chunk_timeout, MAX_PAYLOAD, what=f"{what} chunk {index}")
    return _take_chunk(state, header, payload, index, size, what)


def _take_chunk(state: RoundState, header: dict, payload: bytes, index: int, size: int, what: str) -> bytes:
    """``payload`` if its frame is chunk ``index`` holding ``size`` encoded values; counted as received."""
    if header.get("c") != index or len(payload) != state.codec.encoded_size(size):
        raise FrameError(f"{what} chunk {index} has the wrong index or size")
    state.stats.bytes_received += len(payload)
    return payload


async def _write_chunk(stream: INetStream, state: RoundState, index: int, payload: bytes, what: str) -> None:
    """One ``{"c": index}`` frame, within the stall timeout: a peer that stops reading (hung,
    SIGSTOP) must not hold us past it."""
    sent = await write_frame_within(stream, state.chunk_timeout, {"c": index}, payload, what=f"{what} chunk {index}")
    state.stats.bytes_sent += sent  # not `+= await`: that reads the counter before awaiting


def _decode_with_norm(codec: Codec, payload: bytes, size: int) -> tuple[np.ndarray, float]:
    """Decoded values and their squared norm (in float64); ``CodecError`` for absurd magnitudes."""
    values = codec.decode(payload, size)
    return values, _norm2(values)


def _norm2(values: np.ndarray) -> float:
    if len(values) and float(np.abs(values).max()) > MAX_ABS_VALUE:
        raise CodecError(f"a value beyond {MAX_ABS_VALUE:g}")
    return float(np.dot(values.astype(np.float64), values))


def _check_weight(weight: Any, max_weight: float = 1e12) -> float:
    """A contribution's weight, clipped to ``max_weight`` (what a peer can have computed in a round)."""
    if type(weight) not in (int, float) or not math.isfinite(weight) or not 0 < weight < 1e12:
        raise FrameError(f"weight {weight!r:.40} is not a positive finite number")
    return min(float(weight), max_weight)


class AllReduce:
    """Runs butterfly rounds on a host; ``register_handlers`` once, then ``run(...)`` per round."""

    def __init__(self, host: IHost, *, lanes: Lanes | None = None, max_norm_ratio: float = 100.0,
                 clip_ratio: float = CLIP_RATIO, wait_for_round: float = 10.0, max_weight: float = 1e12) -> None:
        self.host = host
        self.lanes = lanes or Lanes(host)  # bulk data on lanes where the peer runs them
        self.max_norm_ratio = max_norm_ratio  # contributions this far above the median norm are dropped
        self.clip_ratio = clip_ratio  # and those above this ratio scaled down to it (0: no clipping)
        self.max_weight = max_weight  # contributions' weights are clipped to it (owner side)
        self.wait_for_round = wait_for_round
        self._rounds: dict[str, RoundState] = {}
        self._streams = PerPeerLimit(MAX_STREAMS_PER_PEER)
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
                with trio.move_on_after(600), self._streams.slot(peer) as admitted:
                    if admitted:
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
        """Read ``sender``'s contribution chunk by chunk into the sum while the result goes back
        on the same stream as it becomes ready."""
        owner = state.owner
        try:
            weight = _check_weight(header.get("weight"), state.max_weight)
            if header.get("chunks") != len(owner.ranges):
                raise FrameError("wrong chunk count")
            if owner.contributors is not None or sender not in owner.pending or sender in owner.weights:
                raise FrameError("contribution began after the contributors were fixed")
        except FrameError as exc:
            owner.resolve(sender, str(exc))
            # said, so that a sender whose earlier stream broke does not send again until it gives up
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await write_frame(stream, {"t": "refused"})
            raise
        owner.begin(sender, weight)
        failure: FrameError | CodecError | None = None
        began, received = trio.current_time(), 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_result, stream, state, sender)
            try:
                for index, (a, b) in enumerate(owner.ranges):
                    payload = await _read_chunk(stream, state, index, b - a, "contribution")
                    received += len(payload)
                    # on the event loop, as the result chunks below: a thread hop per chunk cost more
                    # than the work (4 peers x 100 MB on loopback took ~1.5x as long)
                    values, norm2 = _decode_with_norm(state.codec, payload, b - a)
                    async with owner.lock:
                        if sender in owner.failed or owner.sum is None:
                            raise FrameError(f"contribution dropped: {owner.failed.get(sender, 'part is final')}")
                        owner.add_chunk(sender, index, values, payload, norm2)
                    owner.notify()
                owner.resolve(sender)
                seconds = trio.current_time() - began
                if received >= MIN_MEASURED_BYTES and seconds > 0:
                    state.stats.uploads_seen[state.spec.members[sender]] = received / seconds
            except (FrameError, CodecError) as exc:
                owner.resolve(sender, str(exc))
                failure = exc
                nursery.cancel_scope.cancel()  # no result for a sender we could not count
            except BaseException as exc:
                owner.resolve(sender, type(exc).__name__)
                raise
        if failure is not None:
            raise failure

    async def _send_result(self, stream: INetStream, state: RoundState, sender: int) -> None:
        """Stream our part's result to ``sender`` as its chunks are released, from the top again
        under a new header whenever the contributors change; keepalives while nothing is ready
        (to a member, a silent owner is a hung owner)."""
        owner, n = state.owner, len(state.owner.ranges)
        attempt = sent = 0
        try:
            with trio.move_on_at(state.deadline):
                while True:
                    changed = owner.changed
                    if owner.attempt != attempt:
                        attempt, sent = owner.attempt, 0
                        await self._write_result_header(stream, state, owner.contributors, n)
                    elif sent < len(owner.result_chunks):
                        await _write_chunk(stream, state, sent, owner.result_chunks[sent], "result")
                        sent += 1
                    elif sent == n and owner.result is not None:
                        await self._write_signature(stream, state, owner.result)
                        return
                    else:
                        with trio.move_on_after(KEEPALIVE) as idle:
                            await changed.wait()
                        if idle.cancelled_caught:
                            await write_frame_within(stream, state.chunk_timeout, {"t": "wait"}, what="a keepalive")
        except Exception as exc:  # the member stopped reading; its contribution may still count
            log.info("%s: result to %s failed: %s", state.spec.group_id, state.spec.members[sender], exc)

    async def _run_owner(self, state: RoundState) -> None:
        """Our own part: add our contribution, fix the contributors once every member began or
        failed, then release result chunks as they complete until the part is final."""
        owner, spec = state.owner, state.spec
        start, end = spec.part(state.me)
        own = state.flat[start:end]
        if np.isfinite(own).all() and not (len(own) and float(np.abs(own).max()) > MAX_ABS_VALUE):
            owner.begin(state.me, state.weight)
            async with owner.lock:
                await trio.to_thread.run_sync(self._add_own, state)
            owner.resolve(state.me)
        else:  # our own update is garbage too: average the others' (who reject it as well)
            log.warning("%s: own contribution holds NaN, infinity or absurd values; excluded", spec.group_id)
            owner.resolve(state.me, "own contribution is not finite or absurd")
        if state.result_residual is not None:
            owner.residual_start = state.result_residual[start:end].copy()
        started = trio.current_time()
        with trio.move_on_at(state.deadline):
            while owner.result is None:
                changed = owner.changed
                self._drop_stalled(state, started)
                if owner.contributors is None and all(s in owner.weights or s not in owner.pending
                                                      for s in range(len(spec.members))):
                    owner.contributors = tuple(sorted(s for s in owner.weights if s not in owner.failed))
                    owner.attempt = 1
                    owner.notify()
                if owner.contributors is not None:
                    async with owner.lock:
                        await self._release_chunks(state)
                if owner.result is None:
                    with trio.move_on_after(0.5):
                        await changed.wait()
        for sender, reason in owner.failed.items():
            log.info("%s: no contribution from %s: %s", spec.group_id, spec.members[sender], reason)
        if owner.result is None:  # what it waited for: the round fails for every member
            waiting = [spec.members[s] for s in sorted(owner.pending)] if owner.contributors is None else [
                f"{spec.members[s]} ({owner.received.get(s, 0)} of {len(owner.ranges)} chunks)"
                for s in owner.contributors if owner.received.get(s, 0) < len(owner.ranges)]
            log.warning("%s: own part unfinished at the deadline, waiting for %s", spec.group_id,
                        ", ".join(waiting) or "its result chunks to go out")
        owner.encoded.clear()
        owner.sum = None  # encoded into the result

    @staticmethod
    def _add_own(state: RoundState) -> None:
        for index, (a, b) in enumerate(state.owner.ranges):
            values = state.flat[a:b]
            state.owner.add_chunk(state.me, index, values, b"", _norm2(values))

    def _drop_stalled(self, state: RoundState, started: float) -> None:
        """Fail the contributions that have not begun in time (one that began fails on its own
        stream when that stalls)."""
        owner, n = state.owner, len(state.spec.members)
        limit = state.chunk_timeout + self.wait_for_round
        now = trio.current_time()
        for sender in list(owner.pending):
            # a sender that has not begun may still be sending to the owners before us
            first = started + ((state.me - sender) % n - 1) * state.part_seconds
            if sender not in owner.weights and now - first > limit:
                owner.resolve(sender, f"no contribution began within {limit:.0f}s")

    async def _release_chunks(self, state: RoundState) -> None:
        """With ``owner.lock`` held: encode every result chunk that is complete, starting over
        if a contributor dropped out; sets ``owner.result`` when the last one is out."""
        owner, spec = state.owner, state.spec
        n = len(owner.ranges)
        while len(owner.result_chunks) < n:
            contributors = tuple(s for s in owner.contributors if s not in owner.failed)
            if contributors != owner.contributors or owner.in_sum - set(contributors) or owner.rescaled:
                owner.rescaled = False
                await trio.to_thread.run_sync(self._rebuild_sum, state, contributors)
                owner.contributors, owner.result_chunks = contributors, []
                owner.attempt += 1
                owner.notify()
            index = len(owner.result_chunks)
            # a two-level round's owner reduces its part with the other groups' once all of it is in
            crossing = state.cross is not None
            if any(owner.received[s] <= (n - 1 if crossing else index) for s in contributors):
                return
            if index == (0 if crossing else n - 1):  # all is in: the norms are known
                for sender in owner.outliers(contributors):
                    log.warning("excluding %s from %s: update norm %.3g is absurd", spec.members[sender],
                                spec.group_id, math.sqrt(owner.norms2[sender]))
                    owner.failed[sender] = "absurd update norm"
                if any(s in owner.failed for s in contributors):
                    continue
                if owner.clip(contributors):  # the sum is rebuilt with the new scales, the result starts over
                    for sender, scale in owner.scales.items():
                        log.info("%s: %s's update counts scaled by %.3g (norm clipping)", spec.group_id,
                                 spec.members[sender], scale)
                    owner.rescaled = True
                    continue
                if crossing:
                    owner.crossed = await self._cross(state, contributors)
            owner.result_chunks.append(self._encode_result_chunk(state, index))
            if len(owner.result_chunks) == n:
                digest = await trio.to_thread.run_sync(
                    _part_digest, spec.group_id, state.me, contributors, owner.result_chunks)
                signature = self.host.get_private_key().sign(digest)
                owner.result = state.parts[state.me] = _Part(contributors, list(owner.result_chunks), signature)
            owner.notify()

    @staticmethod
    async def _cross(state: RoundState, contributors: tuple[int, ...]) -> np.ndarray:
        """A two-level round: our part's mean across the round's groups, each of its cells reduced
        with the owners of that cell in the other groups at once."""
        owner = state.owner
        total = sum(owner.weights[s] for s in contributors)
        crossed = owner.sum / np.float32(total or 1)

        async def cross(cell: int, a: int, b: int) -> None:
            values = crossed[a - owner.start:b - owner.start]
            reduced = await state.cross(cell, values.copy(), total, len(contributors))
            if reduced.shape != values.shape:
                raise ValueError(f"cell {cell} came back with {reduced.shape} values, not {values.shape}")
            values[:] = reduced

        async with trio.open_nursery() as nursery:
            for cell, a, b in state.spec.cells_of(state.me):
                nursery.start_soon(cross, cell, a, b)
        return crossed

    @staticmethod
    def _rebuild_sum(state: RoundState, contributors: tuple[int, ...]) -> None:
        """Sum ``contributors`` again from scratch (subtracting one that dropped out would leave
        its rounding error, large next to an absurd value) and restore the error feedback."""
        owner = state.owner
        owner.sum[:] = 0
        for sender in contributors:
            for index in range(owner.received[sender]):
                a, b = owner.ranges[index]
                values = state.flat[a:b] if sender == state.me else state.codec.decode(owner.encoded[sender][index], b - a)
                owner.sum_into(sender, index, values)
        owner.in_sum = set(contributors)
        if owner.residual_start is not None:
            start, end = state.spec.part(state.me)
            state.result_residual[start:end] = owner.residual_start

    @staticmethod
    def _encode_result_chunk(state: RoundState, index: int) -> bytes:
        """Result chunk ``index``: the weighted mean (or the round's transform of it), encoded
        (with error feedback), and decoded into our own output as every member will decode it."""
        owner = state.owner
        a, b = owner.ranges[index]
        total = sum(owner.weights[s] for s in owner.contributors)
        if owner.crossed is not None:
            average = owner.crossed[a - owner.start:b - owner.start]
        else:
            average = owner.sum[a - owner.start:b - owner.start] / np.float32(total or 1)
        if state.transform is not None:
            average = state.transform(a, b, average)
        residual = None if state.result_residual is None else state.result_residual[a:b]
        chunk = encode_with_feedback(state.codec, average, residual)
        state.output[a:b] = state.codec.decode(chunk, b - a)
        return chunk

    @staticmethod
    def _decode_part(codec: Codec, chunks: list[bytes], ranges: list[tuple[int, int]], out: np.ndarray) -> None:
        """Decode a part's chunks into ``out``."""
        start = ranges[0][0]
        for chunk, (a, b) in zip(chunks, ranges):
            out[a - start:b - start] = codec.decode(chunk, b - a)

    @staticmethod
    async def _write_result_header(stream: INetStream, state: RoundState, contributors: tuple[int, ...],
                                   chunks: int) -> None:
        sent = await write_frame_within(stream, state.chunk_timeout, {
            "t": "result", "contributors": list(contributors), "chunks": chunks}, what="a result header")
        state.stats.bytes_sent += sent

    @staticmethod
    async def _write_signature(stream: INetStream, state: RoundState, part: _Part) -> None:
        sent = await write_frame_within(stream, state.chunk_timeout, {"t": "signed", "sig": part.signature},
                                        what="a part's signature")
        state.stats.bytes_sent += sent

    async def _send_part(self, stream: INetStream, state: RoundState, part: _Part) -> None:
        """A final part, whole, with its owner's signature (repair)."""
        await self._write_result_header(stream, state, part.contributors, len(part.chunks))
        for index, chunk in enumerate(part.chunks):
            await _write_chunk(stream, state, index, chunk, "result")
        await self._write_signature(stream, state, part)

    # ---- member side --------------------------------------------------------------------------

    async def _exchange_with_owner(self, state: RoundState, owner: int, deadline: float) -> None:
        """Stream our contribution to ``owner`` while its result streams back on the same stream.
        A stream that breaks before the owner sent a byte on it is opened again while the owner
        may still take our contribution (``wait_for_round``): a relayed connection replaced by a
        hole-punched one as a round started took its streams with it, the owner never saw our
        header, and the round failed for every member."""
        ranges = state.spec.chunks(owner)
        payloads: list[bytes] = []  # each chunk encoded once: encoding moves the error feedback on
        give_up = trio.current_time() + self.wait_for_round
        with trio.move_on_at(deadline):
            while not await self._send_contribution(state, owner, ranges, payloads, give_up):
                if trio.current_time() + BEGIN_RETRY_SECONDS >= give_up:
                    return
                log.info("%s: the stream to owner %s broke before it answered; sending again",
                         state.spec.group_id, state.spec.members[owner])
                await trio.sleep(BEGIN_RETRY_SECONDS)

    async def _send_contribution(self, state: RoundState, owner: int, ranges: list[tuple[int, int]],
                                 payloads: list[bytes], give_up: float) -> bool:
        """One try of ``_exchange_with_owner``: False if its stream broke before the owner sent a
        byte on it (worth another), True otherwise (done, failed after the owner answered, or the
        owner not reached by ``give_up``)."""
        spec, peer = state.spec, ID.from_base58(state.spec.members[owner])
        stream, heard = None, 0
        try:
            async with trio.open_nursery() as nursery:
                async with state.sending:  # released when our chunks are out; the result may follow
                    stream = await self._begin_contribution(state, owner, len(ranges), give_up)
                    if stream is None:
                        return True
                    heard = stream.bytes_received  # a lane counts its earlier streams' bytes too
                    nursery.start_soon(self._receive_result, stream, state, owner, nursery.cancel_scope)
                    try:
                        for index, (a, b) in enumerate(ranges):
                            if index == len(payloads):
                                residual = None if state.send_residual is None else state.send_residual[a:b]
                                payloads.append(await trio.to_thread.run_sync(
                                    encode_with_feedback, state.codec, state.flat[a:b], residual))
                            await _write_chunk(stream, state, index, payloads[index], "contribution")
                    except Exception as exc:
                        log.info("%s: contribution to %s failed: %s", spec.group_id, peer, exc)
                        nursery.cancel_scope.cancel()
            return owner in state.parts or stream.bytes_received != heard
        finally:
            if stream is not None:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()

    async def _begin_contribution(self, state: RoundState, owner: int, chunks: int,
                                  give_up: float) -> INetStream | None:
        """A stream to ``owner`` carrying our contribution's header, or None if none could be had
        by ``give_up`` (the owner stops waiting for our contribution to begin soon after).
        Failures are retried meanwhile: a connection through a relay can drop as a round starts
        and be dialled again in seconds, and one member given up on fails the round for all."""
        spec, peer = state.spec, ID.from_base58(state.spec.members[owner])
        pause = BEGIN_RETRY_SECONDS
        while True:
            stream = None
            try:
                stream = await self.lanes.open_stream(peer, PROTOCOL)
                state.stats.bytes_sent += await write_frame_within(stream, state.chunk_timeout, {
                    "group": spec.group_id, "part": owner, "weight": state.weight, "chunks": chunks},
                    what="a contribution header")
                return stream
            except Exception as exc:
                if stream is not None:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
                if trio.current_time() + pause > give_up:
                    log.info("%s: cannot reach owner %s: %s", spec.group_id, peer, exc)
                    return None
                log.info("%s: owner %s not reached, trying again in %.1f s: %s", spec.group_id, peer, pause, exc)
            await trio.sleep(pause)
            pause *= 2

    async def _receive_result(self, stream: INetStream, state: RoundState, owner: int,
                              exchange: trio.CancelScope) -> None:
        try:
            # the owner answers once its own round runs, which may start up to wait_for_round after ours
            await self._receive_part(stream, state, owner, first_wait=self.wait_for_round)
        except Exception as exc:
            log.info("%s: part %d from %s failed: %s", state.spec.group_id, owner, state.spec.members[owner], exc)
        finally:
            exchange.cancel()  # the owner is done with our contribution, or gone

    async def _receive_part(self, stream: INetStream, state: RoundState, owner: int, first_wait: float = 0.0) -> None:
        """Read ``owner``'s part: a result header, its chunks and the owner's signature, skipping
        keepalives and starting over at a new header (the owner's contributors changed); check the
        signature (the part may come from another member) and decode the part into our output.
        The first frame may take ``first_wait`` seconds more than the stall timeout."""
        spec = state.spec
        start, end = spec.part(owner)
        ranges = spec.chunks(owner)
        contributors: list[int] | None = None
        chunks: list[bytes] = []
        signature: bytes | None = None
        while signature is None:
            header, payload = await read_frame_within(stream, state.chunk_timeout + first_wait, MAX_PAYLOAD,
                                                      what=f"owner {owner}'s result")
            first_wait = 0.0
            kind = header.get("t")
            if kind == "wait":
                continue
            if kind == "refused":
                raise FrameError("the owner refused our contribution (its contributors were fixed, or ours began before)")
            if kind == "result":
                if contributors is not None:
                    log.info("%s: owner %d starts its result over (its contributors changed)", spec.group_id, owner)
                contributors = header.get("contributors")
                if header.get("chunks") != len(ranges) or not isinstance(contributors, list) or not all(
                        isinstance(c, int) and 0 <= c < len(spec.members) for c in contributors):
                    raise FrameError("malformed result header")
                chunks = []
                continue
            if contributors is None:
                raise FrameError("result chunk before its header")
            if len(chunks) < len(ranges):
                a, b = ranges[len(chunks)]
                chunks.append(_take_chunk(state, header, payload, len(chunks), b - a, "result"))
            elif kind == "signed" and type(header.get("sig")) is bytes and len(header["sig"]) <= 256:
                signature = header["sig"]
            else:
                raise FrameError("no owner's signature after a part")
        if owner in state.parts:
            return
        part = _Part(tuple(sorted(set(contributors))), chunks, signature)
        await trio.to_thread.run_sync(_check_part_signature, spec, owner, part)
        # straight into the output: a part that fails to decode there is overwritten by a repaired
        # copy, or the round fails and the output is dropped
        await trio.to_thread.run_sync(self._decode_part, state.codec, chunks, ranges, state.output[start:end])
        if owner not in state.parts:
            state.parts[owner] = part

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
                  bandwidth: float = 12.5e6, transform: ResultTransform | None = None,
                  cross: CrossReduce | None = None, max_weight: float | None = None) -> tuple[np.ndarray, RoundStats]:
        """Average ``flat`` with the group; returns the average and statistics or raises ``RoundFailed``.
        With ``transform``, our part's result is the transform of its mean (``ResultTransform``).
        In a two-level round (``spec.cells``), with ``cross``, our part's result is its mean across
        the round's groups (``CrossReduce``). ``max_weight`` bounds the weights of this round's
        contributions (default: the one this ``AllReduce`` was made with).

        ``deadline`` (trio clock) bounds the whole round. Within it nothing waits on a fixed
        schedule: a transfer fails when it stalls (no byte of a chunk moves within a time sized
        from ``bandwidth``, bytes/s), and an owner still collecting sends keepalives, so a
        dead or hung member is noticed in seconds whatever the link speed.

        The group's ``send_concurrency`` is how many owners a member sends its contributions to at
        once (0: all). All at once lets every owner stream its result back while contributions
        still arrive (4 peers x 20 MB on emulated 50 Mbit/s, 40 ms RTT links: 1.4x the bandwidth
        bound, 2.1x one at a time, when an owner's result waits for its last sender to begin); one at a
        time spares owners short of CPU (it was needed on libp2p streams, before lanes, for 8
        peers x 100 MB on one 2-core machine)."""
        spec.validate()
        max_weight = max_weight or self.max_weight
        weight = _check_weight(weight, max_weight)
        if flat.dtype != np.float32 or flat.shape != (spec.total,):
            raise ValueError(f"vector of shape {flat.shape} does not match the group's {spec.total} values")
        state = RoundState(spec, me, flat, weight, send_residual, result_residual, self.max_norm_ratio,
                           self.clip_ratio, transform, cross, max_weight)
        state.deadline = deadline
        self._rounds[spec.group_id] = state
        self._round_started.pop(spec.group_id, trio.Event()).set()
        for member, addrs in zip(spec.members, spec.addrs):
            if member != spec.members[me] and addrs:
                add_addrs(self.host, member, addrs, 600)
        started = trio.current_time()
        # A chunk shares the link with the other members' streams both ways: allow 8x its share
        # for its bytes to start moving, but never more than MAX_STALL_SECONDS. ``bandwidth`` comes
        # from past rounds' throughput, waits included: over relays it was a tenth of the link's,
        # and a stall then outlived the round, failing it for every member.
        largest = max(b - a for a, b in zip(spec.bounds, spec.bounds[1:]))
        chunk_bytes = state.codec.encoded_size(min(CHUNK_VALUES, largest))
        state.chunk_timeout = min(MAX_STALL_SECONDS, 3 + STALL_SLACK * 2 * len(spec.members) * chunk_bytes / bandwidth)
        if state.parallel_sends < len(spec.members) - 1:  # owners late in the ring wait for earlier parts
            state.part_seconds = STALL_SLACK * state.codec.encoded_size(largest) / bandwidth
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_owner, state)
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
        except Exception as exc:
            if isinstance(exc, RoundFailed):
                raise
            # Remote data may still reach a path that raises (a result that does not encode, say):
            # that is this round's failure, never the peer's end. Said by its first cause: a
            # nursery's "Exceptions from Trio nursery (1 sub-exception)" said nothing (a cell whose
            # reduction across groups failed, in chaos runs)
            cause = _first_cause(exc)
            reason = f"{type(cause).__name__}: {cause}"
            log.warning("%s: round failed: %s", spec.group_id, reason)
            state.stats.outcome, state.stats.reason = "failed", reason
            raise RoundFailed(reason, state.stats) from exc
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
            # Every survivor holds the same parts, so all blame alike: the owners whose set differs
            # from the one most parts share (a member that contributes nowhere but to its own part,
            # say), if one set is shared by more than half of the parts
            counts = Counter(state.parts[j].contributors for j in state.parts)
            common, shared = counts.most_common(1)[0]
            if shared * 2 > len(state.parts):
                stats.blamed = [spec.members[j] for j in state.parts if state.parts[j].contributors != common]
        else:
            stats.outcome = "ok"
            stats.contributors = [spec.members[i] for i in sets.pop()]
            return state.output
        raise RoundFailed(stats.reason, stats)

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
