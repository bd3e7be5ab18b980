"""Finding a group through the DHT, without a server.

Peers that want to average under a key declare themselves in one DHT key (an entry each, with
addresses, upload bandwidth, Vivaldi coordinates and what they average; in a large swarm, the key
of their bucket: ``groups.bucket_of``), and read it until the target group size is reached (where a
key holds several groups, every peer expected there) or the time budget ends. Every peer then computes the same
latency-aware split (``groups.form_groups``); the smallest peer id of each group leads it: it
invites the members over a direct stream, and those that accept (a peer accepts one invitation per
round) receive the final ``GroupSpec`` with bounds proportional to their bandwidth (or the order
and bounds the caller's ``RoundPlan`` gives, for owner-side steps). Differing DHT
views only cost a retry: a member never starts without the leader's ``begin``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from averaging.allreduce import GroupSpec, SpecError, add_addrs
from averaging.groups import BUCKET_PEERS, Coordinates, bucket_count, bucket_of, plan_groups
from averaging.partition import cell_owner_bounds, partition_bounds
from averaging.wire import FrameError, PerPeerLimit, read_frame, write_frame
from dht import RecordDHT

log = logging.getLogger(__name__)

# 1.1: splits salted by the key alone, buckets from 2x the target size; 1.2: two-level rounds (a
# spec's cells, a declaration's covers); 1.3: a spec's order with cells (sharded two-level rounds)
PROTOCOL = "/legion/matchmaking/1.3.0"
CELLS_PROTOCOL = "/legion/matchmaking-cells/1.0.0"  # the owners of a two-level round's cells (``Averager``)
PING_PROTOCOL = "/legion/ping/1.0.0"


# A peer alone under a key that others have left waits this long for a newcomer before it gives up;
# where the swarm holds more peers than a group, its budget (a round's later groups form later: 3
# peers that came a few seconds after a group of 3 formed each gave up alone after 1 s)
LATE_GRACE = 1.0
LEAD_INVITE_SECONDS = 3.0  # a leader's bound on one invitation
INVITE_SECONDS = 5.0  # a follower waits this long for its leader's invitation
RELAYED_INVITE_SECONDS = 8.0  # both, this much more where a member may have to be reached through a relay
READY_PING_SECONDS = 0.5  # pings to new candidates once a group can form
# A seeker reads its key again after 0.3 s, then twice as long each time up to 2 s, and when the
# budget ends: at every 0.3 s, 64 peers seeking in one process group (8 replicas read each time)
# sent ~1,700 DHT requests a second, every read timed out and no group formed
# (``bench/matchmaking_swarm.py``); and a key's holders served each of its seekers 3 reads a second.
FIRST_REREAD_SECONDS = 0.3
MAX_REREAD_SECONDS = 2.0


class MatchmakingFailed(Exception):
    """No group could be formed before the deadline. ``others_seeking``: other peers of this peer's
    base were still seeking under the key at its last read (``_Seeking.others_seeking``);
    ``others_left``: other peers had sought under it and left (of any base: a withdrawal says none)."""

    def __init__(self, message: str, others_seeking: bool = False, others_left: bool = False) -> None:
        super().__init__(message)
        self.others_seeking = others_seeking
        self.others_left = others_left


# members -> (the vector's order as ranges, part bounds): a caller's layout of its groups (``RoundPlan``)
GroupOrder = Callable[[list[str]], tuple[list[tuple[int, int]], list[int]]]


def _other_bases(seeking: "_Seeking") -> str:
    """A failed search's word on the peers it saw seeking from other weights (``base``): a peer
    groups only with peers of its own weights, so where a round's groups left it with different
    weights, the swarm splits until states are adopted."""
    if not seeking.other_bases:
        return ""
    return f" ({seeking.other_bases} peer{'s' if seeking.other_bases > 1 else ''} there held other weights)"


@dataclass
class _Seeking:
    key: str
    place: str | None  # the key whose DHT nodes hold ``key`` (``RecordDHT.store``), if not its own
    total: int
    codec: str
    order: GroupOrder | None = None
    base: str = ""  # what the caller's vector was computed from; only peers of the same base group
    cells: int = 0  # a group this peer leads is a two-level round's: parts of whole cells (``GroupSpec.cells``)
    covers: int = 1  # the peers this seeker stands for (a group, at the second level); declared
    committed: bool = False
    superseded: bool = False  # a later round's seeking ended this one
    spec: GroupSpec | None = None
    found: trio.Event = field(default_factory=trio.Event)
    suspects: set[str] = field(default_factory=set)  # leaders that never invited: dead or elsewhere
    seen: frozenset[str] = frozenset()  # the peers last read seeking under the key
    unanswered: set[str] = field(default_factory=set)  # peers this one invited that never answered
    read_again_for: set[str] = field(default_factory=set)  # inviters unseen at a read, read again for once
    left: int = 0  # other peers last read to have sought under the key and left
    other_bases: int = 0  # peers last read seeking under the key from another base than this peer's
    other_covers: int = 0  # ...and the peers they stand for (``covers``), who will not join this peer's group
    leader: str | None = None  # the leader of this peer's group in its own split, once computed
    alone: bool = False  # that split leaves this peer in a group too small to form
    scope: trio.CancelScope | None = None  # cancelled when a later seeking supersedes this one

    def others_seeking(self, me: str) -> bool:
        """Whether peers other than ``me`` were still seeking under the key at the last read, save
        leaders that never invited ``me`` and peers that never answered its invitation (gone,
        stopped, unreachable): they will not form a group with ``me`` either, and may go on alone."""
        return bool(self.seen - self.suspects - self.unanswered - {me})

    def may_invite(self, peer: str, me: str) -> bool:
        """Only a leader this peer can derive itself may invite it: the one of its own split once
        computed, before that (or when that split leaves it alone) a peer seen seeking under the
        key that sorts first (leaders are the smallest id of their group), one it gave up on
        included. Nobody else chooses this peer's group, split or codec. (Two peers that each
        waited in vain for the other's invitation, their views having differed, each gave up on
        the other and then refused its invitation until the round ended.)"""
        if self.leader is not None and not self.alone:
            return peer == self.leader
        return (peer in self.seen or peer in self.suspects) and peer < me


MAX_DECLARED_ADDRS = 16
MAX_COVERS = 256  # peers one declaration may stand for (a group: ``allreduce.MAX_MEMBERS``)
MAX_STREAMS_PER_PEER = 4  # invitation and ping streams one peer may have served at once
# Rounds a peer blamed for a failed round is left out of groups: twice as many each time it is
# blamed again. A pair of peers behind NATs that could not reach each other in time is blamed
# alike (each owner lacks the other's contribution); most such pairs connect in a later round.
EXCLUDE_ROUNDS = 2
MAX_EXCLUDE_ROUNDS = 64
MAX_BLAMED_PEERS = 1024  # peers whose count of blames is kept (the oldest forgotten first)


def _declaration(value: object) -> dict | None:
    """A matchmaking entry with every field of the right type and range, or None: peers read
    each other's entries and compute groups from them, so nothing malformed may get that far."""
    if not isinstance(value, dict):
        return None
    addrs, total, codec, upload = value.get("addrs"), value.get("total"), value.get("codec"), value.get("upload_mbps")
    if not (isinstance(addrs, list) and len(addrs) <= MAX_DECLARED_ADDRS and all(isinstance(a, str) for a in addrs)
            and type(total) is int and isinstance(codec, str)):
        return None
    target, reach, base, covers = value.get("target"), value.get("reach"), value.get("base", ""), value.get("covers", 1)
    return {"addrs": addrs, "total": total, "codec": codec, "coords": value.get("coords"),
            "upload_mbps": upload if type(upload) in (int, float) and math.isfinite(upload) and upload > 0 else None,
            "target": target if type(target) is int else None,
            "reach": reach if reach in ("public", "private", "relayed") else "unknown",
            "base": base if isinstance(base, str) and len(base) <= 64 else None,
            "covers": covers if type(covers) is int and 1 <= covers <= MAX_COVERS else 1}


def _forget_failed_dials(host: IHost, peer: str) -> None:
    """py-libp2p refuses every dial to a peer for 60 s after one dial to it failed. A peer that
    has just declared itself here is alive (restarted at its address, or its link is back): under
    churn that refusal kept such peers out of every group for a minute (``bench/chaos.py``)."""
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None and hasattr(cache, "evict"):
        cache.evict(peer)


def _behind_nat(reach: str | None) -> bool:
    """Whether a peer's reachability (its own, or what a candidate declared) says it cannot be
    dialled (it may be reached through a relay)."""
    return reach in ("relayed", "private")


async def connect_each(host: IHost, peers: Iterable[tuple[str, Sequence[str]]], seconds: float) -> dict[str, str]:
    """Connect to each of ``peers`` (id, addresses) at once, each within ``seconds``: the peers
    not reached, with why (a malformed id or address is one of them)."""
    failed: dict[str, str] = {}

    async def connect(peer: str, addrs: Sequence[str]) -> None:
        failed[peer] = f"no connection within {seconds:.0f} s"
        with trio.move_on_after(seconds):
            try:
                await host.connect(PeerInfo(ID.from_base58(peer), [multiaddr.Multiaddr(a) for a in addrs]))
                failed.pop(peer, None)
            except Exception as exc:  # unreachable, gone, malformed: libp2p raises many kinds
                failed[peer] = f"{type(exc).__name__}: {exc}"

    async with trio.open_nursery() as nursery:
        for peer, addrs in peers:
            nursery.start_soon(connect, peer, addrs)
    return failed


class Matchmaker:
    """Finds groups under keys (``find_group``). ``one_at_a_time``: a seeking supersedes the ones
    still seeking (a peer's rounds), and a peer left alone under its key by others that sought there
    gives up at once (they formed their groups); otherwise seekings under different keys run side
    by side and wait for others to their deadline (the cells of a two-level round, ``protocol``
    ``CELLS_PROTOCOL``: a round's groups reach them at different times)."""

    def __init__(self, host: IHost, dht: RecordDHT, swarm: str, *, target_size: int = 8, min_size: int = 2,
                 budget: float = 5.0, mix_every: int = 4, upload_mbps: float | None = None,
                 send_concurrency: int = 0, protocol: str = PROTOCOL, one_at_a_time: bool = True) -> None:
        self.host, self.dht, self.swarm = host, dht, swarm
        self.protocol, self.one_at_a_time = protocol, one_at_a_time
        self.send_concurrency = send_concurrency  # what this peer sets in the groups it leads
        self.target_size, self.min_size, self.budget, self.mix_every = target_size, min_size, budget, mix_every
        self.upload_mbps = upload_mbps
        # how many peers seek groups each round (the caller's estimate, say from the run board):
        # from twice the target size on they seek in buckets, each under its own key
        self.swarm_size = 0
        # where set, the peers the seekers read must stand for (``covers``) before a group forms
        # ahead of the budget, apart from a group's most seekers (``target_size``): a round's
        # cells, whose seekers are groups' owners (``Averager._cross_groups``)
        self.covers_expected = 0
        self.bucket_peers = BUCKET_PEERS  # ``groups.bucket_count``
        self.coords = Coordinates()
        self._rtt_ms: dict[str, float] = {}
        self._seekings: dict[str, _Seeking] = {}  # by DHT key
        self._streams = PerPeerLimit(MAX_STREAMS_PER_PEER)
        self._rounds = 0
        self._excluded: dict[str, int] = {}  # peer -> the matchmaking round until which it is left out
        self._blames: dict[str, int] = {}  # peer -> how often it was blamed for a failed round
        # whether others can dial this peer (public / private / unknown), declared so that groups
        # never hold two private peers (``averaging.groups``)
        self.reachability: Callable[[], str] = lambda: "unknown"
        # addresses through relays (``swarm.relay``), declared after the host's own
        self.relayed: Callable[[], list[str]] = list

    def register_handlers(self) -> None:
        self.host.set_stream_handler(self.protocol, self._limited(self._serve_invitation))
        # every instance answers pings alike: the one registered last serves them
        self.host.set_stream_handler(PING_PROTOCOL, self._limited(self._serve_ping))

    def _limited(self, handler):
        """``handler`` for at most ``MAX_STREAMS_PER_PEER`` streams per peer at once."""
        async def limited(stream: INetStream) -> None:
            with self._streams.slot(stream.muxed_conn.peer_id) as admitted:
                if admitted:
                    await handler(stream)
                    return
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()

        return limited

    @property
    def me(self) -> str:
        return self.host.get_id().to_base58()

    def _key(self, group_key: str, rotation: str | None = None) -> tuple[str, str | None]:
        """The DHT key this peer seeks a group for ``group_key`` under (its bucket's, where there
        are several: ``groups.bucket_count``), and the key whose nodes hold it (``rotation``'s)."""
        key = f"/legion/{self.swarm}/mm/{group_key}"
        drawn_by = key if rotation is None else f"/legion/{self.swarm}/mm/{rotation}"
        count = bucket_count(self.swarm_size, self.target_size, self.bucket_peers)
        if count == 1:
            return key, None if rotation is None else drawn_by
        bucket = f"{count}.{bucket_of(self.me, drawn_by, count)}"
        return f"{key}/{bucket}", None if rotation is None else f"{drawn_by}/{bucket}"

    async def find_group(self, group_key: str, total: int, codec: str, deadline: float,
                         order: GroupOrder | None = None, base: str = "", cells: int = 0,
                         covers: int = 1, rotation: str | None = None) -> GroupSpec:
        """Declare, wait for candidates, then lead or follow; retries until ``deadline``. A group
        this peer leads takes its order and bounds from ``order``, if given (with ``cells``, the
        order's ranges are a two-level round's cells), else with ``cells`` gives each member whole
        cells of a two-level round. With ``base`` (say a digest of the
        weights a pseudo-gradient was taken from) only peers declaring the same base form a group:
        a mean of updates to different weights would leave the members with different weights
        after it. A group forms before the budget ends once the seekers read stand for the target
        size, each for ``covers`` peers as it declares.

        ``rotation`` (a round's series and its place in a cycle of ``ROTATION_ROUNDS``, the same
        at every peer: ``rotation_of``) draws the bucket instead of ``group_key``, so that a
        peer's buckets repeat every cycle, and places the key at its bucket's DHT nodes for the
        whole series (``RecordDHT.store``): a peer then looks up a few keys' nodes every
        ``LOOKUP_SECONDS``, not a new key every round (at 1,000 peers, a third of matchmaking's
        DHT traffic: ``bench/dht_load.py``)."""
        key, place = self._key(group_key, rotation)
        if self.one_at_a_time:
            for previous in self._seekings.values():
                if not previous.committed and previous.scope is not None:
                    # An earlier round still seeking (its average no longer wanted: the peer adopted
                    # a newer state) would take invitations meant for this one, and on leaving cleared
                    # this one's slot, so this peer refused its group.
                    previous.superseded = True
                    previous.scope.cancel()
        seeking = self._seekings[key] = _Seeking(key, place, total, codec, order, base, cells,
                                                 max(1, min(covers, MAX_COVERS)))
        self._rounds += 1
        try:
            with trio.move_on_at(deadline) as seeking.scope:
                while True:
                    spec = await self._attempt(seeking, deadline)
                    if spec is not None:
                        if _behind_nat(self.reachability()):
                            await self._connect_members(spec)
                        return spec
                    seeking.committed, seeking.leader, seeking.alone = False, None, False
            if seeking.superseded:
                raise MatchmakingFailed(f"left {group_key!r}: this peer seeks a later round's group now")
            raise MatchmakingFailed(f"no group for {group_key!r} before the deadline{_other_bases(seeking)}",
                                    others_seeking=seeking.others_seeking(self.me), others_left=seeking.left > 0)
        finally:
            if self._seekings.get(key) is seeking:
                del self._seekings[key]
            with trio.move_on_after(2):
                await self.dht.withdraw(key, self.budget + 10, place)

    @property
    def several_groups(self) -> bool:
        """Whether the caller expects more peers to seek each round than a group holds."""
        return self.swarm_size > self.target_size

    def _enough(self) -> int:
        """The peers read under a key that let a group form before the budget ends: the target
        size, or where a key holds several groups, every peer expected there (the swarm's share
        of the bucket), so that all are split at once: 3 of 4 peers in groups of 2 formed a group
        of 3 as soon as they read each other, and the fourth, a second later, was left alone."""
        if self.covers_expected:
            return self.covers_expected
        if not self.several_groups:
            return self.target_size
        return max(self.target_size, math.ceil(self.swarm_size / bucket_count(self.swarm_size, self.target_size,
                                                                                self.bucket_peers)))

    async def _attempt(self, seeking: _Seeking, deadline: float) -> GroupSpec | None:
        addrs = [*(str(a) for a in self.host.get_addrs()), *self.relayed()][:MAX_DECLARED_ADDRS]
        declaration = {"addrs": addrs, "total": seeking.total,
                       "codec": seeking.codec, "coords": self.coords.to_wire(), "upload_mbps": self.upload_mbps,
                       "target": self.target_size, "reach": self.reachability(), "base": seeking.base,
                       "covers": seeking.covers}
        await self.dht.store(seeking.key, declaration, ttl=self.budget + 10, place=seeking.place)
        started, reread = trio.current_time(), FIRST_REREAD_SECONDS
        while True:
            if seeking.found.is_set():
                return seeking.spec
            candidates, left = await self._candidates(seeking)
            seeking.seen, seeking.left = frozenset(candidates), left
            waited = trio.current_time() - started
            if not self.one_at_a_time and candidates:
                # seekers that come at different times (a round's groups at their cells) count the
                # budget from the first declaration they read, so that it ends alike for all: counted
                # from each one's own start, a leader still waiting out its budget let a member that
                # came earlier give up on its invitation, and the cell's groups never met
                waited = max(waited, time.time() - min(c["t"] for c in candidates.values()))
                if waited >= 2 * self.budget and set(candidates) <= {self.me}:
                    # nobody else came while a round's groups form (their members seek for up to two
                    # budgets): this peer's group is likely the round's only one (a peer the caller
                    # expected is behind), and waiting on would cost every round
                    raise MatchmakingFailed(f"nobody else sought under {seeking.key} within {2 * self.budget:.0f} s")
            if self.me not in candidates:
                # our declaration is not where we read (its store failed, or the nodes holding the
                # key changed): nobody else sees it either, so declare again rather than group
                # without ourselves (a chaos run crashed there, on a loaded machine)
                log.info("own declaration under %s not found; declaring again", seeking.key)
                await self.dht.store(seeking.key, declaration, ttl=self.budget + 10, place=seeking.place)
            elif (len(candidates) >= self.min_size
                  and sum(c["covers"] for c in candidates.values()) + seeking.other_covers + left >= self._enough()) or (
                    waited >= self.budget and len(candidates) >= self.min_size):
                # (peers read seeking from other weights count as read: waiting for them cost a
                # budget every round to both of two lineages, until they merged; and so do peers
                # that sought here and left: they formed their groups. A peer that read 3 of 4, then
                # 2 and the 2 others gone, waited out its budget while the one its split of 4 left
                # it with gave up on its invitation: two of 4 peers in groups of 2 missed 1 round in 4)
                # a few pings first, briefly: otherwise, where groups fill at once (a large swarm),
                # coordinates stop learning and latency-aware grouping turns random
                with trio.move_on_after(READY_PING_SECONDS):
                    await self._ping_some(candidates)
                break
            grace = self.budget if self.several_groups else LATE_GRACE
            if left and set(candidates) <= {self.me} and waited >= grace and not seeking.committed \
                    and self.one_at_a_time:
                # the others sought here and left (their groups formed, or they gave up) and no
                # leader has invited this peer (committed: accepted, awaiting its begin): nobody is
                # left to group with, so fail now rather than hold up this peer's next round
                raise MatchmakingFailed(f"the others' groups under {seeking.key} formed without this peer"
                                        f"{_other_bases(seeking)}")
            await self._ping_some(candidates)
            waited = trio.current_time() - started
            pause = reread if waited >= self.budget else min(reread, self.budget - waited)
            with trio.move_on_after(pause):
                await seeking.found.wait()
            reread = min(MAX_REREAD_SECONDS, 2 * reread)
        groups = self._split(seeking, candidates)
        mine = next(g for g in groups if self.me in g)
        seeking.leader, seeking.alone = mine[0], len(mine) < self.min_size
        log.debug("%s: %d seekers read (%d expected, %d enough), split into %s; this peer's group led by %s",
                  seeking.key, len(candidates), self.swarm_size, self._enough(), [len(g) for g in groups], mine[0])
        if mine[0] == self.me and not seeking.committed:
            return await self._lead(seeking, mine, candidates, deadline)
        if _behind_nat(self.reachability()):
            # the leader cannot dial this peer: its invitation comes over a connection this peer opened
            await self._connect([(mine[0], tuple(candidates[mine[0]]["addrs"]))])
        wait = INVITE_SECONDS + (RELAYED_INVITE_SECONDS if any(_behind_nat(candidates[m]["reach"]) for m in mine) else 0)
        with trio.move_on_after(min(wait, max(0.0, deadline - trio.current_time()))):
            await seeking.found.wait()
        if not seeking.found.is_set():
            # A killed peer's declaration outlives it; were it the leader, every retry would wait
            # for it again. Followers leave it out alike, so they agree on the next split.
            log.info("leader %s of %s never invited; leaving it out", mine[0], seeking.key)
            seeking.suspects.add(mine[0])
        return seeking.spec

    def _split(self, seeking: _Seeking, candidates: dict[str, dict]) -> list[list[str]]:
        """The groups every peer that read ``candidates`` under the key splits them into."""
        # this peer's coordinates as declared, like everyone's: its own have moved since (pings), and
        # with them its split differed from the others' (a round-0 group of 4 peers in groups of 2
        # left two peers each waiting for a leader that had not put them in its group)
        coords = {p: Coordinates.from_wire(e["coords"]) for p, e in candidates.items()}
        private = frozenset(p for p, e in candidates.items() if e["reach"] == "private")
        return plan_groups(sorted(candidates), lambda a, b: coords[a].distance(coords[b]),
                           self.target_size, self.min_size, seeking.key, self.mix_every, private)

    async def _connect_members(self, spec: GroupSpec) -> None:
        """A peer behind NAT opens a connection to every member first: they can then reach it over
        that connection (they cannot dial it), as owners must."""
        await self._connect([(m, a) for m, a in zip(spec.members, spec.addrs) if m != self.me])

    async def _connect(self, peers: list[tuple[str, tuple[str, ...]]]) -> None:
        """Connect to each of ``peers`` (id, declared addresses) not connected yet, at once, bounded."""
        await connect_each(self.host, peers, 3)

    def exclude(self, peers: list[str]) -> None:
        """Leave ``peers`` out of the groups of the next rounds this peer seeks (they made a round
        fail; the other members, holding the same parts, leave them out alike): ``EXCLUDE_ROUNDS``
        the first time, twice as many each time a peer is blamed again."""
        for peer in peers:
            if peer == self.me:
                continue
            blames = self._blames.pop(peer, 0) + 1
            self._blames[peer] = blames
            rounds = min(MAX_EXCLUDE_ROUNDS, EXCLUDE_ROUNDS << min(blames - 1, 16))
            self._excluded[peer] = self._rounds + rounds
            log.warning("leaving %s out of groups for %d rounds: its part disagreed with the others' (blamed %d "
                        "time%s)", peer, rounds, blames, "s" if blames > 1 else "")
        while len(self._blames) > MAX_BLAMED_PEERS:
            del self._blames[next(iter(self._blames))]
        self._excluded = {p: r for p, r in self._excluded.items() if r >= self._rounds}

    async def open_base(self, group_key: str, rotation: str | None = None) -> str | None:
        """Whether a group forms under ``group_key`` now that a newcomer can still join: peers seek
        there, at least half as many as their target size and fewer than it (they wait for more).
        Returns the base most of them declare ("" for none), or None. A few peers seeking alone
        are stragglers of a round whose group formed without them, not the swarm."""
        key, place = self._key(group_key, rotation)
        entries = await self.dht.get(key, every_replica=True, place=place)
        declarations = [d for d in map(_declaration, (e.value for e in entries.values())) if d]
        targets = [d["target"] for d in declarations if d["target"] is not None]
        if not targets or not len(entries) < max(targets) <= 2 * len(entries):
            return None
        bases = Counter(d["base"] for d in declarations if d["base"] is not None)
        return bases.most_common(1)[0][0] if bases else ""

    async def _candidates(self, seeking: _Seeking) -> tuple[dict[str, dict], int]:
        """The peers seeking a group under the key now, and how many others sought and left (peers
        this one leaves out of its groups not counted: it would not have grouped with them)."""
        entries = await self.dht.get(seeking.key, withdrawn=True, every_replica=True, place=seeking.place)
        out, left, other_bases, other_covers = {}, 0, 0, 0
        for peer, entry in entries.items():
            excluded = self._excluded.get(peer, -1) >= self._rounds
            if entry.withdrawn:
                left += peer != self.me and not excluded
                continue
            if peer in seeking.suspects or excluded:
                continue
            value = _declaration(entry.value)
            if value is None or value["total"] != seeking.total or value["codec"] != seeking.codec:
                continue
            if value["base"] != seeking.base:
                other_bases, other_covers = other_bases + 1, other_covers + value["covers"]
            else:
                out[peer] = {**value, "t": entry.timestamp}
                _forget_failed_dials(self.host, peer)
                add_addrs(self.host, peer, value["addrs"], self.budget + 30)  # pinged and invited there
        seeking.other_bases, seeking.other_covers = other_bases, other_covers
        return out, left

    async def _lead(self, seeking: _Seeking, group: list[str], candidates: dict[str, dict],
                    deadline: float) -> GroupSpec | None:
        seeking.committed = True
        accepted: dict[str, INetStream] = {}

        async def invite(member: str) -> None:
            # where the member says it can be reached (through a relay, say: a circuit first, after a
            # direct try); no other address of it may be known yet
            declared = candidates.get(member, {})
            add_addrs(self.host, member, declared.get("addrs", []), self.budget + 30)
            answered = False
            with trio.move_on_after(LEAD_INVITE_SECONDS + (RELAYED_INVITE_SECONDS if _behind_nat(declared.get("reach")) else 0)):
                try:
                    stream = await self.host.new_stream(ID.from_base58(member), [self.protocol])
                except Exception as exc:  # gone, unreachable: libp2p raises many kinds
                    log.debug("cannot invite %s: %s", member, exc)
                    seeking.unanswered.add(member)
                    return
                try:
                    await write_frame(stream, {"t": "invite", "key": seeking.key, "leader": self.me})
                    answer, _ = await read_frame(stream, 0)
                    answered = True
                    seeking.unanswered.discard(member)
                    if answer.get("t") == "accept":
                        accepted[member] = stream
                        return
                except Exception as exc:
                    log.debug("invitation to %s failed: %s", member, exc)
                with contextlib.suppress(Exception):
                    await stream.close()
            if not answered:  # (not reached where the seeking itself ended meanwhile)
                seeking.unanswered.add(member)

        async with trio.open_nursery() as nursery:
            for member in group:
                if member != self.me:
                    nursery.start_soon(invite, member)
        members = sorted([self.me, *accepted])
        spec = None
        if len(members) >= self.min_size:
            if seeking.order is not None:
                order, bounds = seeking.order(members)
            elif seeking.cells:
                order, bounds = [], cell_owner_bounds(seeking.total, seeking.cells, len(members))
            else:
                bandwidths = [candidates.get(m, {}).get("upload_mbps") or 0 for m in members]
                order, bounds = [], partition_bounds(seeking.total, bandwidths)
            group_id = hashlib.sha256(f"{seeking.key}/{','.join(members)}/{trio.current_time()}".encode()).hexdigest()[:32]
            spec = GroupSpec(group_id, tuple(members), tuple(tuple(candidates.get(m, {}).get("addrs", [])) for m in members),
                             tuple(bounds), seeking.codec, min(self.send_concurrency, len(members)),
                             tuple(tuple(r) for r in order), seeking.cells)
        async with trio.open_nursery() as nursery:
            for stream in accepted.values():
                nursery.start_soon(self._finish_invitation, stream, spec)
        return spec

    async def _read_again(self, seeking: _Seeking, inviter: str) -> None:
        """An invitation from ``inviter``, which this peer's last read did not find seeking: its view
        may lag. Read again, and where this peer had split what it read, split anew with the
        inviter in view, so that ``may_invite`` asks this peer's split of what it reads now. (In a
        bucket of 17 at 64 peers, followers that had read 16, missing the smallest id, waited for
        the second smallest, which was following the first, and refused the first's invitation:
        round 0 of ``bench/matchmaking_swarm.py --peers 64`` grouped 0.2-0.4 of its peers.)"""
        candidates = (await self._candidates(seeking))[0]
        seeking.seen = frozenset(candidates)
        if seeking.leader is not None and inviter in candidates and self.me in candidates:
            mine = next(g for g in self._split(seeking, candidates) if self.me in g)
            if mine[0] != seeking.leader:
                log.debug("%s: %s invites, unseen at this peer's split; read again, %d seekers put this peer in a "
                          "group led by %s", seeking.key, inviter, len(candidates), mine[0])
            seeking.leader, seeking.alone = mine[0], len(mine) < self.min_size

    @staticmethod
    async def _finish_invitation(stream: INetStream, spec: GroupSpec | None) -> None:
        with trio.move_on_after(3), contextlib.suppress(Exception):
            await write_frame(stream, {"t": "begin", "spec": spec.to_wire()} if spec else {"t": "cancel"})
            await stream.close()

    async def _serve_invitation(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id.to_base58()
        seeking = None
        try:
            with trio.fail_after(INVITE_SECONDS + 2 * RELAYED_INVITE_SECONDS):
                invitation, _ = await read_frame(stream, 0)
                key = invitation.get("key")
                candidate = self._seekings.get(key) if isinstance(key, str) else None
                if candidate is not None and not candidate.committed and candidate.leader != self.me \
                        and peer not in candidate.seen and peer not in candidate.read_again_for:
                    candidate.read_again_for.add(peer)  # (once: a peer that never declares costs one read)
                    await self._read_again(candidate, peer)
                if candidate is None or candidate.committed \
                        or invitation.get("leader") != peer or not candidate.may_invite(peer, self.me):
                    await write_frame(stream, {"t": "reject"})
                    return
                seeking = candidate
                seeking.committed = True
                await write_frame(stream, {"t": "accept"})
                decision, _ = await read_frame(stream, 0)
            if decision.get("t") == "begin":
                spec = GroupSpec.from_wire(decision.get("spec"))
                if self.me not in spec.members or spec.members[0] != peer:
                    raise SpecError("the group does not hold this peer, or is not led by its inviter")
                if spec.codec != seeking.codec or spec.total != seeking.total:
                    raise SpecError(f"the group averages {spec.total} values with {spec.codec!r}, "
                                    f"not {seeking.total} with {seeking.codec!r}")
                seeking.spec = spec
                seeking.found.set()
        except (FrameError, SpecError, trio.TooSlowError) as exc:
            log.info("invitation from %s dropped: %s", peer, exc)
        except Exception as exc:
            log.info("invitation stream from %s ended: %s: %s", peer, type(exc).__name__, exc)
        finally:
            if seeking is not None and not seeking.found.is_set():
                seeking.committed = False  # whatever ended the invitation, this peer is free again
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.close()

    async def _ping_some(self, candidates: dict[str, dict], limit: int = 4) -> None:
        """Measure RTT to a few candidates not measured yet; each sample moves our coordinates."""
        targets = [p for p in candidates if p != self.me and p not in self._rtt_ms][:limit]

        async def ping(peer: str) -> None:
            with trio.move_on_after(2):
                try:
                    stream = await self.host.new_stream(ID.from_base58(peer), [PING_PROTOCOL])
                    began = trio.current_time()
                    await write_frame(stream, {"t": "ping"})
                    await read_frame(stream, 0)
                    rtt = (trio.current_time() - began) * 1000
                    await stream.close()
                except Exception:
                    return
                self._rtt_ms[peer] = rtt
                self.coords.update(Coordinates.from_wire(candidates[peer].get("coords")), rtt)

        async with trio.open_nursery() as nursery:
            for peer in targets:
                nursery.start_soon(ping, peer)

    async def _serve_ping(self, stream: INetStream) -> None:
        with trio.move_on_after(5), contextlib.suppress(Exception):
            await read_frame(stream, 0)
            await write_frame(stream, {"t": "pong"})
            await stream.close()
