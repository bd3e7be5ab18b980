"""The run board: choosing the run to join, the run configurations, and the board's buckets
(``dht.buckets``) over a stand-in for the DHT's reads."""

import statistics
import time

import msgpack

import pytest

from dht.buckets import (BUCKET_ENTRIES, LEVEL_READ_BEATS, SPLIT_REFRESH_BEATS, bucket_level, bucket_prefix,
                         own_bucket_key, parse_entries, read_every_bucket)
from dht.records import Entry
from swarm.run_board import (Progress, board_place, choose_run, publishes_config, read_board, read_run_configs,
                             run_configs_key, run_key)
from swarm.members import MEMBER_REFRESHES_PER_BEAT, member_place, members_key
from swarm.run_config import PROTOCOL as RUN_PROTOCOL, RunConfig, RunConfigError


def test_a_joiner_picks_the_run_most_peers_train_and_explains_an_incompatible_swarm():
    a, b = RunConfig(model="tiny").validate(), RunConfig(model="mini").validate()
    configs = {a.run_id: a, b.run_id: b}
    board = [Progress(a.run_id, RUN_PROTOCOL, peer_id="p1"), Progress(b.run_id, RUN_PROTOCOL, peer_id="p2"),
             Progress(b.run_id, RUN_PROTOCOL, peer_id="p3")]
    assert choose_run(board, configs) == b
    assert choose_run(board, {a.run_id: a}) is None  # b's configuration not read yet: wait for it
    with pytest.raises(RunConfigError, match="cannot join"):
        choose_run([Progress("x", RUN_PROTOCOL + 1, peer_id="p9")], configs)
    with pytest.raises(RunConfigError, match="no peer of this swarm publishes"):
        choose_run([], configs)
    with pytest.raises(ValueError):
        Progress.from_value("p5", {"run_id": 1, "protocol": 1, "bogus": True})
    # an entry of run protocol 3 (its configuration inside) is read, so the joiner can say why it cannot join
    old = Progress.from_value("p6", {"run_id": a.run_id, "protocol": 3, "config": a.to_dict()})
    with pytest.raises(RunConfigError, match=r"protocol \[3\]"):
        choose_run([old], configs)


def test_a_configuration_made_in_python_names_the_run_its_published_copy_names():
    # an int where a float is due (round_timeout=10) named another run than the copy peers read
    # from the DHT (10.0): a peer joining from the network waited for its configuration for ever
    made = RunConfig(model="tiny", round_timeout=10, outer_lr=1).validate()
    read = RunConfig.from_dict(msgpack.unpackb(msgpack.packb(made.to_dict())), "a peer's configuration")
    assert read == made and read.run_id == made.run_id
    assert type(made.round_timeout) is float and type(made.inner_steps) is int


def test_a_board_entry_is_written_with_short_names_and_without_its_defaults():
    """Field names were two thirds of an entry, which every peer of its bucket reads (run protocol 5)."""
    progress = Progress("r1", RUN_PROTOCOL, round=7, loss=2.5, training=True, group=["a", "b"], peer_id="p1")
    value = progress.to_value()
    assert value == {"id": "r1", "p": RUN_PROTOCOL, "r": 7, "l": 2.5, "T": True, "gm": ["a", "b"]}
    assert Progress.from_value("p1", msgpack.unpackb(msgpack.packb(value))) == progress
    assert len(msgpack.packb(value)) < len(msgpack.packb({k: v for k, v in vars(progress).items() if k != "peer_id"})) / 2
    with pytest.raises(ValueError, match="unknown field"):
        Progress.from_value("p1", {**value, "zz": 1})
    with pytest.raises(ValueError):
        Progress.from_value("p1", {**value, "r": "seven"})


def test_an_entry_shows_a_round_and_its_weights_digest_and_a_malformed_one_shows_nothing():
    progress = Progress("r1", RUN_PROTOCOL, peer_id="p1")
    assert progress.weights_shown() is None
    progress.show_weights(12, "0123456789ab")
    read = Progress.from_value("p1", msgpack.unpackb(msgpack.packb(progress.to_value())))
    assert read.weights_shown() == (12, "0123456789ab")
    for base in ("12", "12:", ":ab", "-1:ab", "x:ab", "1.5:ab"):  # (what another peer may write)
        assert Progress("r1", RUN_PROTOCOL, base=base).weights_shown() is None, base


async def test_a_run_configuration_is_published_by_a_few_peers_and_names_itself():
    assert all(publishes_config(f"p{i}", 16) for i in range(16))
    writers = sum(publishes_config(f"p{i}", 10_000) for i in range(10_000))
    assert 4 <= writers <= 40, writers
    a = RunConfig(model="tiny").validate()
    dht = BoardKeys()
    dht.write(run_configs_key("s"), "honest", a.to_dict())
    dht.write(run_configs_key("s"), "liar", {"model": b"\xff"})
    dht.write(run_configs_key("s"), "other", {**a.to_dict(), "batch_size": 9})
    configs = await read_run_configs(DHTReads(dht), "s")
    assert configs[a.run_id] == a and len(configs) == 2  # the malformed one dropped, the other under its own id


class DHTReads:
    """``get_parsed`` over ``BoardKeys``, as ``RecordDHT`` gives it."""

    def __init__(self, keys: "BoardKeys") -> None:
        self.keys = keys

    async def get_parsed(self, key, parse, what):
        return parse_entries(await self.keys.get(key), parse, what)


class BoardKeys:
    """The DHT as a reader of entries sees it once signatures are checked: keys holding one entry
    per writer, and which keys were read."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, Entry]] = {}
        self.reads: list[str] = []
        self.probes: list[str] = []  # the reads that were probes

    def write(self, key: str, peer_id: str, value: dict) -> None:
        now = time.time()
        self.keys.setdefault(key, {})[peer_id] = Entry(peer_id, msgpack.packb(value), now, now + 30, b"")

    async def get(self, key, *, probe=False, fanout=None):
        self.reads.append(key)
        if probe:
            self.probes.append(key)
        return dict(self.keys.get(key, {}))


def _board_of(n: int, level_of=lambda peer, n: bucket_level(n)) -> tuple[BoardKeys, list[str]]:
    config = RunConfig(model="tiny").validate()
    dht, peers = BoardKeys(), [f"peer-{n}-{i}" for i in range(n)]
    for peer in peers:
        value = Progress(config.run_id, RUN_PROTOCOL, round=3, training=True).to_value()
        dht.write(own_bucket_key(run_key("s"), peer, level_of(peer, n)), peer, value)
    return dht, peers


async def read_at(dht: BoardKeys, reader: str, level: int):
    """``reader``'s bucket of the board, read at ``level`` (a peer that knows its level)."""
    place = board_place("s", reader)
    place.level = level
    return await place.read(dht, find_level=False)


async def test_a_small_board_is_one_key_read_whole():
    dht, peers = _board_of(BUCKET_ENTRIES - 1)
    assert list(dht.keys) == [run_key("s")]
    read = await read_at(dht, peers[0], 0)
    assert dht.reads == [run_key("s")]  # one key, as before buckets
    assert {p.peer_id for p in read.entries} == set(peers) and read.estimate == len(peers) and read.level == 0


@pytest.mark.parametrize("n", [100, 1000, 10000])
async def test_a_large_board_splits_into_bounded_buckets_and_one_bucket_estimates_the_swarm(n):
    dht, peers = _board_of(n)
    sizes = [len(entries) for entries in dht.keys.values()]
    assert len(sizes) == 2 ** bucket_level(n) and statistics.mean(sizes) <= 2 * BUCKET_ENTRIES and max(sizes) < 4 * BUCKET_ENTRIES
    for reader in peers[:: max(1, n // 50)]:
        joining = await read_board(dht, "s", reader)  # no level yet: finds it
        assert joining.level == bucket_level(n) or abs(joining.level - bucket_level(n)) == 1
        dht.reads.clear(), dht.probes.clear()
        read = await read_at(dht, reader, bucket_level(n))
        assert len(dht.reads) <= 4  # its bucket, the one above, its two halves below...
        own = own_bucket_key(run_key("s"), reader, bucket_level(n))
        assert own in dht.reads and set(dht.probes) == set(dht.reads) - {own}  # ...those three probed
        assert n / 2 <= read.estimate <= 2 * n and n / 2 <= joining.estimate <= 2 * n
        bucket = {p for p in peers if bucket_prefix(p, bucket_level(n)) == bucket_prefix(reader, bucket_level(n))}
        assert bucket <= {p.peer_id for p in read.entries}


async def test_peers_whose_estimates_differ_by_a_level_still_see_each_other():
    """Near a level's edge some peers write one level deeper than others: a reader at either
    level still sees every peer of its bucket."""
    n = 300
    dht, peers = _board_of(n, level_of=lambda peer, n: bucket_level(n) + int(peer[-1]) % 2)
    level = bucket_level(n)
    for reader in peers[:20]:
        for reading_level in (level, level + 1):
            read = await read_at(dht, reader, reading_level)
            bucket = {p for p in peers if bucket_prefix(p, reading_level) == bucket_prefix(reader, reading_level)}
            assert bucket <= {p.peer_id for p in read.entries}


async def test_an_operator_can_still_read_every_entry_bucket_by_bucket():
    dht, peers = _board_of(1000)
    read = await read_every_bucket(dht, run_key("s"), Progress.from_value, "run board entry")
    assert {p.peer_id for p in read.entries} == set(peers) and read.estimate == 1000


async def test_a_writer_finds_its_level_before_it_writes_then_checks_it_every_few_heartbeats():
    dht, peers = _board_of(1000)
    place = board_place("s", "a newcomer")
    assert place.own_key == run_key("s")  # nothing read yet: the unsplit key
    await place.follow(dht)
    assert place.level == bucket_level(1000) and place.own_key == own_bucket_key(run_key("s"), "a newcomer", place.level)
    reading_beats = []
    for beat in range(3 * LEVEL_READ_BEATS):  # one call a heartbeat
        before = len(dht.reads)
        await place.follow(dht)
        if len(dht.reads) > before:
            reading_beats.append(beat)
            # a check looks at the levels above (probes) besides its bucket and the keys next to it
            assert any(key.startswith(f"{run_key('s')}/{place.level + 2}.") for key in dht.reads[before:])
    assert len(reading_beats) == 3 and {b - a for a, b in zip(reading_beats, reading_beats[1:])} == {LEVEL_READ_BEATS}
    assert 500 <= place.estimate <= 2000


def test_a_writer_refreshes_its_entry_every_heartbeat_in_a_small_swarm_every_few_once_split_and_at_once_on_change():
    """A DHT message costs ~3 KB on the wire whatever it carries (``bench/dht_request_cost.py``):
    a large swarm's peers refresh their entries every ``SPLIT_REFRESH_BEATS`` heartbeats (which
    live as much longer), and write at once what the others act on."""
    place = board_place("s", "me")
    place.level = 0
    writes = []
    for beat in range(4):
        if place.refresh_due("training"):
            writes.append(beat)
            place.wrote("training")
    assert writes == [0, 1, 2, 3] and place.refresh_beats == 1
    place.level, writes = 3, []  # split: its key moved, so it writes at once, then every few heartbeats
    for beat in range(3 * SPLIT_REFRESH_BEATS):
        changed = beat == SPLIT_REFRESH_BEATS + 2
        value = "finished" if beat >= SPLIT_REFRESH_BEATS + 2 else "training"
        if place.refresh_due(value):
            writes.append((beat, changed))
            place.wrote(value)
    assert place.refresh_beats == SPLIT_REFRESH_BEATS
    assert writes == [(0, False), (SPLIT_REFRESH_BEATS, False), (SPLIT_REFRESH_BEATS + 2, True),
                      (2 * SPLIT_REFRESH_BEATS + 2, False)]


def test_member_entries_of_an_unsplit_key_are_refreshed_less_often_as_the_swarm_grows():
    """64 peers' member entries refreshed every heartbeat were a third of their DHT requests: while
    the key is one, a member refreshes every heartbeat up to MEMBER_REFRESHES_PER_BEAT peers, less
    often beyond (its entry living as much longer), and a lifetime written short is not outlived."""
    place = member_place("s", "me")
    place.level, place.estimate = 0, MEMBER_REFRESHES_PER_BEAT
    assert place.refresh_beats == 1
    place.wrote("up")
    place.estimate = 2 * BUCKET_ENTRIES  # the swarm grew: the entry written lives one heartbeat's lifetime still
    assert place.refresh_beats == 2 * BUCKET_ENTRIES // MEMBER_REFRESHES_PER_BEAT > 1 and place.refresh_due("up")
    place.estimate = 1000  # (never beyond a split key's)
    assert place.refresh_beats == SPLIT_REFRESH_BEATS
    place.wrote("up", beats=place.refresh_beats)
    due = []
    for beat in range(1, 3 * SPLIT_REFRESH_BEATS):
        if place.refresh_due("up"):
            due.append(beat)
            place.wrote("up")
    assert due == [SPLIT_REFRESH_BEATS, 2 * SPLIT_REFRESH_BEATS]
    assert board_place("s", "me").refresh_beats == 1  # the run board: every heartbeat while unsplit


async def test_a_trainers_member_and_holdings_entries_take_the_boards_level_without_reading_their_own():
    """The same peers write the board, the member list and the holdings: a level the board's read
    found is theirs too, and their own reads to follow it (a third of a peer's DHT traffic) stop
    while it keeps coming, and start again when it does not."""
    dht, _ = _board_of(1000)
    board, members = board_place("s", "trainer"), member_place("s", "trainer")
    await board.read(dht)
    members.adopt(board.level)
    assert members.level == board.level
    dht.reads.clear()
    for beat in range(4 * LEVEL_READ_BEATS):
        if beat % SPLIT_REFRESH_BEATS == 0:  # the board read every few heartbeats
            members.adopt(board.level)
        await members.follow(dht)
    assert dht.reads == []
    for _ in range(2 * LEVEL_READ_BEATS):  # no more board reads (the trainer stopped): it follows on its own
        await members.follow(dht)
    assert any(key.startswith(members_key("s")) for key in dht.reads)


@pytest.mark.parametrize("me", ["a", "b"])
def test_only_a_groups_first_member_lists_the_group_on_the_board(me):
    """The dashboard needs one list per group; in every entry it was two thirds of the board's
    bytes (``bench/scale.py --only dht``)."""
    from types import SimpleNamespace

    from swarm.reducer import RoundReport
    from swarm.shard_ownership import MeasuredUploads
    from swarm.trainer import Trainer

    trainer = SimpleNamespace(progress=Progress("run", RUN_PROTOCOL), me=me, _record=lambda event: None,
                              _uploads=MeasuredUploads())
    Trainer._on_round(trainer, RoundReport("diloco-7", "averaged", 1.0, members=["c", "a", "b"]))
    assert trainer.progress.group_key == "diloco-7"
    assert trainer.progress.group == (["a", "b", "c"] if me == "a" else [])


def test_a_bid_vouches_for_the_median_of_a_peers_last_measurements():
    """One round's measurement of a peer varies several-fold on a loaded machine; a bid that
    vouched for the newest changed with every round, and the owners every peer computes with it."""
    from swarm.shard_ownership import MEASUREMENTS_KEPT, MeasuredUploads

    uploads = MeasuredUploads()
    for mbit in (2.0, 13.2, 1.8, 2.4):
        uploads.add({"peer": mbit})
    assert uploads.current() == {"peer": 2.2}
    for _ in range(MEASUREMENTS_KEPT):
        uploads.add({"peer": 9.0})
    assert uploads.current() == {"peer": 9.0}  # only the last MEASUREMENTS_KEPT count
