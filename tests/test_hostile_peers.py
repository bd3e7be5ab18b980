"""What a hostile or buggy remote peer sends cannot crash, hang or take over an honest peer."""

import re
import socket
import struct
import time

import trio

from swarm.local import status_json


def lane_port(process, timeout: float = 20.0) -> int:
    """The lane listener's port, from the peer's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"lane listener on \S+:(\d+)", process.log_path.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no lane listener in the log:\n{process.log_tail()}")


def reset_connection(port: int, send: bytes = b"") -> None:
    """Connect to 127.0.0.1:``port``, send ``send``, then reset the connection (RST, not FIN)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if send:
            sock.sendall(send)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_connections_reset_at_the_lane_listener_do_not_end_the_peer(seed):
    port = lane_port(seed)
    for send in (b"", b"\x01" * 7, b"\x02" * 16, b"\x03" * 40):  # no id, part of one, a wrong one, more
        reset_connection(port, send)
    await trio.sleep(1.0)
    assert seed.proc.poll() is None, f"the peer died:\n{seed.log_tail()}"
    listed = await trio.to_thread.run_sync(status_json, seed.addrs[0])
    assert [p["peer_id"] for p in listed] == seed.peer_ids
    log = seed.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("presented no valid lane id") + log.count("lane connection from") >= 4


# ----- averaging: absurd numbers, forged group specs, hijacked invitations (in-process, real hosts)

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from libp2p.crypto.ed25519 import create_new_key_pair  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from averaging.allreduce import GroupSpec, SpecError  # noqa: E402
from averaging.averager import Averager  # noqa: E402
from averaging.matchmaking import PROTOCOL as MATCHMAKING_PROTOCOL, _declaration  # noqa: E402
from averaging.partition import partition_bounds  # noqa: E402
from averaging.wire import read_frame, write_frame  # noqa: E402
from averaging_helpers import group_of, round_of  # noqa: E402
from peer_helpers import start_peers  # noqa: E402


@pytest.mark.parametrize("codec,members", [("none", 2), ("int8", 2), ("int8", 3)])
async def test_a_member_sending_values_near_float32s_limit_is_left_out_and_nobody_crashes(codec, members):
    size = 4096
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, members)
        spec, reducers, _ = group_of(peers, size, codec)
        hostile = spec.members[1]
        vectors = {m: np.full(size, 3e38 if m == hostile else i + 1.0, np.float32) for i, m in enumerate(spec.members)}
        outcomes = await round_of(spec, reducers, vectors, {m: 5.0 if m == hostile else 1.0 for m in spec.members})
        honest = [m for m in spec.members if m != hostile]
        expected = np.mean([vectors[m][0] for m in honest])
        for member in honest:
            result, stats = outcomes[member]
            assert stats.outcome == "ok" and sorted(stats.contributors) == sorted(honest)
            assert np.isfinite(result).all() and abs(float(result[0]) - expected) < 0.05
        nursery.cancel_scope.cancel()


async def test_a_contribution_weighs_no_more_than_a_peer_can_compute():
    size = 2048
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        spec, reducers, _ = group_of(peers, size, "none", max_weight=64)
        vectors = {spec.members[0]: np.zeros(size, np.float32), spec.members[1]: np.ones(size, np.float32)}
        weights = {spec.members[0]: 64.0, spec.members[1]: 1e11}  # the second claims a huge weight
        outcomes = await round_of(spec, reducers, vectors, weights)
        for result, stats in outcomes.values():
            assert stats.outcome == "ok"
            np.testing.assert_allclose(result, 0.5)  # clipped to 64 each: the plain mean
        nursery.cancel_scope.cancel()


async def test_a_member_scaling_its_update_inside_the_outlier_filter_counts_at_most_twice_the_median():
    size = 1 << 16
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 4)
        spec, reducers, _ = group_of(peers, size, "none")
        rng = np.random.default_rng(0)
        vectors = {m: rng.standard_normal(size).astype(np.float32) for m in spec.members}
        hostile = spec.members[2]
        vectors[hostile] *= 50  # inside the 100x outlier filter: counted, not dropped
        outcomes = await round_of(spec, reducers, vectors, dict.fromkeys(spec.members, 1.0), seconds=60)
        honest_sum = sum(vectors[m] for m in spec.members if m != hostile)
        largest = max(np.linalg.norm(vectors[m]) for m in spec.members if m != hostile)
        for result, stats in outcomes.values():
            assert stats.outcome == "ok" and len(stats.contributors) == 4
            np.testing.assert_array_equal(result, next(iter(outcomes.values()))[0])
            steer = np.linalg.norm(result - honest_sum / 4)  # what the hostile member moved the mean by
            assert steer <= 1.05 * 2 * largest / 4, steer  # 12.5x that without clipping
        nursery.cancel_scope.cancel()


async def test_a_member_that_contributes_nowhere_but_to_its_own_part_is_blamed_and_left_out():
    size = 4096
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 4)
        spec, reducers, by_id = group_of(peers, size, "none", wait_for_round=2)
        griefer = spec.members[1]

        async def silent(state, owner, deadline):
            await trio.sleep_until(deadline)

        reducers[griefer]._exchange_with_owner = silent
        failures = await round_of(spec, reducers, dict.fromkeys(spec.members, np.ones(size, np.float32)),
                                  dict.fromkeys(spec.members, 1.0), seconds=25)
        for member in spec.members:
            if member != griefer:
                assert failures[member].stats.blamed == [griefer], failures[member]
        averager = Averager(by_id[spec.members[0]], target_group_size=4)
        for rounds in (2, 4, 8):  # twice as long each time it is blamed again
            averager.matchmaker.exclude(failures[spec.members[0]].stats.blamed)
            assert averager.matchmaker._excluded == {griefer: rounds}
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("relay", ["honest", "forging"])
async def test_a_part_repaired_through_another_member_is_taken_only_as_its_owner_signed_it(relay):
    from averaging.allreduce import FrameError, _Part
    size = 4096
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        spec, reducers, _ = group_of(peers, size, "none")
        needy, relayer, owner = spec.members
        lost = spec.members.index(owner)
        start, end = spec.part(lost)
        receive_result = reducers[needy]._receive_result

        async def lose_the_part(stream, state, from_owner, exchange):
            await receive_result(stream, state, from_owner, exchange)
            if from_owner == lost:  # as if the owner had died while answering: repair must bring it
                state.parts.pop(lost, None)
                state.output[start:end] = np.nan

        async def gone(stream, state, part):
            raise FrameError("the owner is gone")

        send_part = reducers[relayer]._send_part

        async def forge(stream, state, part):
            forged = [np.full(len(c) // 4, 1000.0, np.float32).tobytes() for c in part.chunks]
            await send_part(stream, state, _Part(part.contributors, forged, part.signature))

        reducers[needy]._receive_result = lose_the_part
        reducers[owner]._send_part = gone
        if relay == "forging":
            reducers[relayer]._send_part = forge
        vectors = {m: np.full(size, float(i), np.float32) for i, m in enumerate(spec.members)}
        outcomes = await round_of(spec, reducers, vectors, dict.fromkeys(spec.members, 1.0), seconds=10)
        for member in (relayer, owner):
            result, stats = outcomes[member]
            assert stats.outcome == "ok" and np.allclose(result, 1.0)
        if relay == "honest":
            result, stats = outcomes[needy]
            assert stats.outcome == "ok" and np.allclose(result, 1.0)
        else:  # the forged part is refused: the round fails for the needy member, nothing forged is kept
            assert "never arrived" in str(outcomes[needy]), outcomes[needy]
        nursery.cancel_scope.cancel()


def valid_spec_wire():
    members = sorted(ID.from_pubkey(create_new_key_pair().public_key).to_base58() for _ in range(2))
    return {"group": "g", "members": members, "addrs": [[], []], "bounds": [0, 256, 512], "codec": "int8",
            "send": 0, "order": []}


@pytest.mark.parametrize("change", [
    {"members": ["not a peer id", "zzz"]},
    {"bounds": [0, 256, math.inf]},
    {"bounds": [0, 256.0, 512]},
    {"bounds": [0, True, 512]},
    {"send": math.nan},
    {"order": [[0, math.inf]]},
    {"order": [[0]]},
    {"codec": "nonsense"},
    {"addrs": [["/ip4/1.2.3.4/tcp/1"] * 1000, []]},
    {"members": "ab"},
])
def test_a_malformed_group_spec_is_a_spec_error(change):
    GroupSpec.from_wire(valid_spec_wire())  # the unchanged spec is fine
    with pytest.raises(SpecError):
        GroupSpec.from_wire({**valid_spec_wire(), **change})


@pytest.mark.parametrize("upload", [math.inf, -3.0, math.nan, "fast", True, None, [1]])
def test_a_matchmaking_entry_with_a_wrong_bandwidth_counts_as_undeclared(upload):
    entry = _declaration({"addrs": [], "total": 512, "codec": "int8", "upload_mbps": upload})
    assert entry["upload_mbps"] is None
    bounds = partition_bounds(1 << 20, [10.0, entry["upload_mbps"], 1e300])
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert bounds[-1] == 1 << 20 and max(sizes) <= 4.01 * min(sizes)  # nobody takes the whole vector


async def test_only_the_leader_a_peer_derives_may_invite_it_and_a_bad_spec_frees_it_again():
    async with trio.open_nursery() as nursery:
        seed, follower, outsider = await start_peers(nursery, 3)
        averager = Averager(follower, target_group_size=2, matchmaking_budget=30)
        key = "k"
        finding = trio.CancelScope()

        async def seek():
            with finding:
                await averager.matchmaker.find_group(key, 512, "int8", trio.current_time() + 60)

        nursery.start_soon(seek)
        with trio.fail_after(10):
            while not averager.matchmaker._seekings or not next(iter(averager.matchmaker._seekings.values())).seen:
                await trio.sleep(0.05)
        seeking = next(iter(averager.matchmaker._seekings.values()))
        full_key = averager.matchmaker._key(key)[0]

        async def invite(inviter, spec_wire):
            stream = await inviter.host.new_stream(follower.peer_id, [MATCHMAKING_PROTOCOL])
            await write_frame(stream, {"t": "invite", "key": full_key, "leader": inviter.peer_id.to_base58()})
            answer, _ = await read_frame(stream, 0)
            if answer.get("t") == "accept":
                await write_frame(stream, {"t": "begin", "spec": spec_wire})
                await trio.sleep(0.3)
            await stream.close()
            return answer.get("t")

        # a peer that does not seek under the key (and so cannot be this peer's leader) is refused
        assert await invite(outsider, valid_spec_wire()) == "reject"
        assert not seeking.committed
        # an accepted invitation whose spec is malformed leaves the peer free for the next one
        seeking.leader = outsider.peer_id.to_base58()
        spec = valid_spec_wire()
        spec["bounds"] = [0, math.inf, 512]
        assert await invite(outsider, spec) == "accept"
        assert not seeking.committed and not seeking.found.is_set()
        finding.cancel()
        nursery.cancel_scope.cancel()


# ----- checkpoints: bombs, unbounded sets, malformed manifests and states

import msgpack  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

from bootstrap.chunk_protocol import MAX_CANCELLED, PROTOCOL as CHUNK_PROTOCOL, ChunkServer  # noqa: E402
from bootstrap.chunk_store import ChunkError, ChunkStore, decompress_chunk  # noqa: E402
from bootstrap.manifest import ChunkRef, ManifestError, build_manifest, open_envelope  # noqa: E402
from bootstrap.rate_limit import RateLimiter  # noqa: E402
from optim.base import StateError, check_optimizer_tensors  # noqa: E402

SIGNER = create_new_key_pair()


def test_a_chunk_declaring_a_huge_size_is_refused_before_anything_is_allocated():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(120 << 20))  # ~4 KB on the wire
    assert len(bomb) < 8192
    ref = ChunkRef(b"\0" * 32, 1 << 20, len(bomb))
    with pytest.raises(ChunkError, match="declares"):
        decompress_chunk(ref, bomb)
    honest = zstandard.ZstdCompressor(level=1).compress(b"x" * 5000)
    import hashlib
    assert decompress_chunk(ChunkRef(hashlib.sha256(b"x" * 5000).digest(), 5000, len(honest)), honest) == b"x" * 5000


async def test_cancels_a_client_sends_are_bounded_per_stream(tmp_path, monkeypatch):
    held = []
    original = ChunkServer._read_requests

    async def watched(self, stream, send, cancelled):
        held.append(cancelled)
        await original(self, stream, send, cancelled)

    monkeypatch.setattr(ChunkServer, "_read_requests", watched)
    async with trio.open_nursery() as nursery:
        seeder, client = await start_peers(nursery, 2)
        store = ChunkStore(tmp_path)
        server = ChunkServer(store, RateLimiter(None), RateLimiter(None), idle_timeout=5)
        seeder.host.set_stream_handler(CHUNK_PROTOCOL, server.handle)
        stream = await client.host.new_stream(seeder.peer_id, [CHUNK_PROTOCOL])
        for i in range(3000):
            await write_frame(stream, {"t": "cancel", "id": i.to_bytes(32, "big")})
        await write_frame(stream, {"t": "get", "id": b"\1" * 32})
        reply, _ = await read_frame(stream, 1 << 20)
        assert reply["t"] == "missing"  # still served
        assert len(held[0]) <= MAX_CANCELLED
        await stream.close()
        nursery.cancel_scope.cancel()


def signed_body(fields):
    body = msgpack.packb(fields, use_bin_type=True)
    return msgpack.packb([body, ID.from_pubkey(SIGNER.public_key).to_bytes(),
                          SIGNER.private_key.sign(b"legion-manifest-v1" + body)])


def test_manifests_that_would_fail_later_are_refused_when_opened():
    manifest = build_manifest({"w": torch.zeros(3)}, "run", 1, lambda cid, raw: len(raw))
    fields = msgpack.unpackb(manifest.body())
    cases = {
        "zero-size tensor beside huge dimensions": [*fields[:4], [["z", "float32", [0, 1 << 39, 1 << 39]]], [], None],
        "round of 2^63": [fields[0], fields[1], 1 << 63, *fields[3:]],
        "round that is a bool": [fields[0], fields[1], True, *fields[3:]],
    }
    for name, bad in cases.items():
        with pytest.raises(ManifestError):
            open_envelope(signed_body(bad), max_bytes=1 << 30)
    body, signer, signature = msgpack.unpackb(manifest.sign(SIGNER))
    for envelope in (msgpack.packb(["not bytes", signer, signature]), msgpack.packb([7, signer, signature]),
                     msgpack.packb([body, signer, "sig"])):
        with pytest.raises(ManifestError):
            open_envelope(envelope, max_bytes=1 << 30, expected_id=manifest.id)
    from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_key_pair
    other = secp256k1_key_pair()
    with pytest.raises(ManifestError, match="Ed25519"):
        open_envelope(msgpack.packb([body, ID.from_pubkey(other.public_key).to_bytes(),
                                     other.private_key.sign(b"legion-manifest-v1" + body)]), max_bytes=1 << 30)


@pytest.mark.parametrize("name,value", [("inner.\u00b2.exp_avg", torch.zeros(3)),  # a non-ASCII digit
                                        ("inner.0.exp_avg", torch.zeros(3, dtype=torch.int64))])
def test_optimizer_state_with_odd_names_or_dtypes_is_a_state_error(name, value):
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param])
    with pytest.raises(StateError):
        check_optimizer_tensors(optimizer, "inner", {name: value})


# ----- run configurations from the network

from swarm.local import start_training_swarm, training_summary  # noqa: E402
from swarm.run_config import RunConfig, RunConfigError  # noqa: E402


@pytest.mark.parametrize("values", [
    {1: "tiny"},  # a key that is not a name
    {"n_layer": 10_000},
    {"n_embd": 1 << 20, "n_head": 1},
    {"model": "gpt2", "n_layer": 256, "n_embd": 4096, "n_head": 16},  # 51 billion parameters
    {"batch_size": 1 << 30},
    {"inner_lr": math.inf},
    {"outer_lr": math.nan},
    {"seed": 1 << 70},
    {"rounds": 1 << 62},
    {"name": "x" * 10_000},
])
def test_a_run_configuration_from_a_peer_is_bounded_everywhere(values):
    with pytest.raises(RunConfigError):
        RunConfig.from_dict(values, "a peer's run")


def test_a_joiner_never_reads_a_data_path_it_took_from_the_network(tmp_path):
    secret = tmp_path / "secret.txt"  # stands for any file on the joiner's disk
    secret.write_text("not to be read by a peer that only joined\n" * 2000)
    run = tmp_path / "run.toml"
    run.write_text(f'model = "tiny"\ninner_steps = 5\nbatch_size = 4\nrounds = 2\ndata = "{secret}"\n')
    processes = start_training_swarm(2, ["--run", str(run)], tmp_path)
    try:
        summaries = [training_summary(p, 180) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert all(s["round"] == 2 for s in summaries)
    seed_log, joiner_log = (p.log_path.read_text() for p in processes)
    assert "secret.txt" in joiner_log and "trains on its own --data or the default corpus" in joiner_log
    assert "corpus " + str(secret) in seed_log and "corpus " + str(secret) not in joiner_log


# ----- shards: inflated bids, forged momentum

from shards.assignment import assign  # noqa: E402
from shards.bids import Bid, MAX_MEMORY, MAX_UPLOAD_MBIT, SEEN_ID_CHARS, believed_uploads  # noqa: E402
from shards.layout import ShardLayout  # noqa: E402


def test_a_bid_of_100_gbits_and_a_pebibyte_does_not_win_every_shard():
    now = time.time()
    honest = [Bid(f"peer{i}", 1 << 30, 20.0, now - 3600, now) for i in range(7)]
    greedy = Bid("greedy", MAX_MEMORY, MAX_UPLOAD_MBIT, now - 86400, now)
    layout = ShardLayout(total=1 << 20, count=64)
    owners = assign([*honest, greedy], layout, 2, state_bytes_per_value=4, salt="run")
    held = len(owners.shards_of("greedy"))
    assert held < 64 and held <= 4 * max(len(owners.shards_of(b.peer_id)) for b in honest)


def test_an_upload_above_the_median_counts_only_as_far_as_other_bidders_measured_it():
    """A peer that declares ten times the median upload is believed as far as twice what another
    bidder measured of it: a fast peer measured fast keeps its claim; a liar measured at home-line
    speed, or vouching for itself, counts the median and owns no more than an honest peer."""
    from dataclasses import replace

    now = time.time()
    honest = [Bid(f"12D3KooWhonest{i}", 1 << 30, 20.0, now - 3600, now) for i in range(6)]
    fast = Bid("12D3KooWfastandreal", 1 << 30, 200.0, now - 3600, now)
    liar = Bid("12D3KooWliar", 1 << 30, 200.0, now - 3600, now, seen=(("12D3KooWliar"[-SEEN_ID_CHARS:], 1e4),))
    honest[0] = replace(honest[0], seen=((fast.peer_id[-SEEN_ID_CHARS:], 150.0), (liar.peer_id[-SEEN_ID_CHARS:], 8.0)))
    believed = {b.peer_id: b.upload_mbit for b in believed_uploads([*honest, fast, liar])}
    assert believed[fast.peer_id] == 200.0 and believed[liar.peer_id] == 20.0
    assert all(believed[b.peer_id] == 20.0 for b in honest)
    owners = assign([*honest, liar], ShardLayout(total=1 << 20, count=64), 2, state_bytes_per_value=4, salt="run")
    assert len(owners.shards_of(liar.peer_id)) <= max(len(owners.shards_of(b.peer_id)) for b in honest)


def test_one_owner_that_saw_a_liar_fast_does_not_make_its_claim_believed():
    """An owner slow to read (a loaded machine) sees a contribution's buffered bytes come at once:
    on 10 Mbit/s links one owner measured a liar at 13.2 Mbit/s while the others saw ~2. What the
    other bidders measured counts by its median, not its largest."""
    now = time.time()
    liar = Bid("12D3KooWliar", 1 << 30, 1e5, now - 3600, now)
    seen = [13.2, 2.1, 1.9, 2.4, 1.5, 2.2, 1.8]
    honest = [Bid(f"12D3KooWhonest{i}", 1 << 30, 10.0, now - 3600, now,
                  seen=((liar.peer_id[-SEEN_ID_CHARS:], mbit),)) for i, mbit in enumerate(seen)]
    believed = {b.peer_id: b.upload_mbit for b in believed_uploads([*honest, liar])}
    assert believed[liar.peer_id] == 10.0  # twice the median seen (2.1) is below the median declared
    assert all(believed[b.peer_id] == 10.0 for b in honest)


async def test_momentum_of_absurd_size_from_a_non_owner_is_not_adopted():
    from optim.base import weights_digest
    from shards.outer import ShardedOuter
    layout = ShardLayout(total=4096, count=2)
    async with trio.open_nursery() as nursery:
        owner, hostile = await start_peers(nursery, 2)
        me = owner.peer_id.to_base58()
        assignment = assign([Bid(me, 1 << 30, 10.0, time.time() - 60, time.time())], layout, 1,
                            state_bytes_per_value=4, salt="r")
        outers = [ShardedOuter(p.host, layout, lr=0.7, momentum=0.9, run_id="r", assignment=lambda: assignment,
                               peers=lambda: [hostile.peer_id.to_base58()], digest=weights_digest, timeout=3)
                  for p in (owner, hostile)]
        for outer in outers:
            outer.register()
        outers[1].history[0] = {(5, "w"): torch.full((layout.size(0),), 1e30)}  # the hostile peer "holds" shard 0
        momentum = await outers[0]._momentum((5, "w"), 0)
        assert float(momentum.abs().max()) == 0.0 and outers[0].stats.momentum_lost == 1
        nursery.cancel_scope.cancel()


async def test_momentum_from_a_peer_that_does_not_own_the_shard_is_checked_against_a_second_holder():
    """A new owner whose shard's other holders are former owners takes the momentum from them; the
    first to answer is hostile (its copy inflated, within the bound on values). The owner asks on
    for a second copy, and of two that differ it takes the smaller: the honest one."""
    from optim.base import weights_digest
    from shards.outer import ShardedOuter
    layout = ShardLayout(total=4096, count=2)
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 3)
        owner = peers[0]
        hostile, honest = sorted(peers[1:], key=lambda p: p.peer_id.to_base58())  # the hostile one is asked first
        me = owner.peer_id.to_base58()
        assignment = assign([Bid(me, 1 << 30, 10.0, time.time() - 60, time.time())], layout, 1,
                            state_bytes_per_value=4, salt="r")
        others = sorted(p.peer_id.to_base58() for p in peers[1:])
        outers = {p: ShardedOuter(p.host, layout, lr=0.7, momentum=0.9, run_id="r", assignment=lambda: assignment,
                                  peers=lambda: others, digest=weights_digest, timeout=3) for p in peers}
        for outer in outers.values():
            outer.register()
        size = layout.size(0)
        outers[hostile].history[0] = {(5, "w"): torch.full((size,), 1e6)}
        outers[honest].history[0] = {(5, "w"): torch.full((size,), 0.01)}
        momentum = await outers[owner]._momentum((5, "w"), 0)
        assert torch.equal(momentum, torch.full((size,), 0.01)) and outers[owner].stats.momentum_lost == 0
        nursery.cancel_scope.cancel()


# ----- one hostile process in a real training swarm

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from swarm.local import READY, start_process  # noqa: E402

ATTACKER = Path(__file__).resolve().parents[1] / "bench" / "attacker.py"


def test_honest_peers_train_on_beside_a_peer_that_forges_inflates_and_sprays_garbage(tmp_path):
    """Three honest peers and one that claims a round a million ahead and serves random weights
    at it, declares a weight of 1e11, and sends garbage on every protocol and oversized DHT
    entries: the honest peers finish the run, none crashes, none adopts the forged state, and
    they learn as they would alone."""
    rounds = 4
    processes = start_training_swarm(3, ["--model", "tiny", "--inner-steps", "5", "--batch-size", "8",
                                         "--rounds", str(rounds)], tmp_path, extra=["--wait-peers", "4"])
    attacker = None
    try:
        attacker = start_process([sys.executable, str(ATTACKER), "--attack", "forged-round", "--attack",
                                  "inflate-weight", "--attack", "garbage", "--attack", "oversized", "--",
                                  "--bootstrap", processes[0].addrs[0], "--listen", "/ip4/127.0.0.1/tcp/0",
                                  "--heartbeat", "2", "--threads", "1", "--wait-peers", "4"], READY,
                                 log_dir=tmp_path / "logs")
        summaries = [training_summary(p, 300) for p in processes]
    finally:
        for p in [*processes, *([attacker] if attacker else [])]:
            p.kill()
    for process, summary in zip(processes, summaries):
        log = process.log_path.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]
        assert summary["round"] == rounds < 1000
        assert summary["val_loss"] < summary["initial_val_loss"] - 1.0
        # averaged with the swarm (exit 0 and a done line are checked above); on 2 loaded cores the
        # attacker's garbage streams can make some rounds time out (2 of 4 averaged, once, in CI)
        assert summary["rounds_averaged"] >= 1
    for i in range(3):
        states = [json.loads(line) for line in (tmp_path / f"peer{i}" / "metrics.jsonl").read_text().splitlines()
                  if '"state"' in line]
        assert all(s["round"] < 1000 for s in states)


@pytest.mark.parametrize("others", ["a lone trainer and a peer about to start", "a lone trainer", "two trainers"])
def test_a_state_is_taken_on_one_peers_word_only_when_no_other_peer_is_in_the_run(others):
    """At a run's start a peer that trains at once and claims round 1,000,000 was the only one
    shown training, and honest peers about to start took its state on its word (in CI, all three
    honest peers of the test above). Peers that joined count as witnesses too: with two honest
    peers held at a start barrier that the claim ends, the forged state was adopted in every run
    before this rule and in none after."""
    from types import SimpleNamespace

    from swarm.run_board import Progress
    from swarm.trainer import Trainer

    entries = {"a lone trainer and a peer about to start": [("forger", True), ("honest", False)],
               "a lone trainer": [("forger", True)], "two trainers": [("a", True), ("b", True)]}[others]
    board = [Progress("run", 4, round=10**6, training=training, peer_id=peer) for peer, training in entries]
    trainer = SimpleNamespace(_run_peers=lambda: board)
    assert Trainer._witnesses(trainer) == (1 if others == "a lone trainer" else 2)


async def test_a_peer_opening_many_silent_streams_holds_a_bounded_number(tmp_path):
    from bootstrap.chunk_protocol import MAX_STREAMS_PER_PEER
    async with trio.open_nursery() as nursery:
        seeder, client = await start_peers(nursery, 2)
        server = ChunkServer(ChunkStore(tmp_path), RateLimiter(None), RateLimiter(None), idle_timeout=30)
        seeder.host.set_stream_handler(CHUNK_PROTOCOL, server.handle)
        streams = []
        for _ in range(3 * MAX_STREAMS_PER_PEER):
            with trio.move_on_after(5):
                try:
                    streams.append(await client.host.new_stream(seeder.peer_id, [CHUNK_PROTOCOL]))
                except Exception:  # the server resets the streams over its limit
                    pass
        await trio.sleep(1.0)
        assert server.streams._open.get(client.peer_id) == MAX_STREAMS_PER_PEER
        nursery.cancel_scope.cancel()


def test_a_claimed_day_of_uptime_in_a_young_swarm_does_not_double_a_bid():
    """Uptime is self-declared and a day of it doubles a bid's worth: a liar claiming one among
    peers up for minutes held 7 of 32 replicas where its fair share was 4 (10 Mbit/s links). It
    counts up to twice the median uptime plus an hour; a long-running swarm keeps its bonus."""
    now = time.time()
    young = [Bid(f"12D3KooWhonest{i}", 1 << 30, 10.0, now - 600, now) for i in range(7)]
    liar = Bid("12D3KooWliar", 1 << 30, 10.0, now - 86400, now)
    owners = assign([*young, liar], ShardLayout(total=1 << 20, count=16), 2, state_bytes_per_value=4, salt="run")
    assert len(owners.shards_of(liar.peer_id)) <= 5  # 32 / 8 = 4, give or take the rounding
    old = [Bid(f"12D3KooWhonest{i}", 1 << 30, 10.0, now - 86400, now) for i in range(4)]
    newcomers = [Bid(f"12D3KooWnew{i}", 1 << 30, 10.0, now - 600, now) for i in range(3)]
    owners = assign([*old, *newcomers], ShardLayout(total=1 << 20, count=16), 2, state_bytes_per_value=4, salt="run")
    assert min(len(owners.shards_of(b.peer_id)) for b in old) > max(len(owners.shards_of(b.peer_id)) for b in newcomers)
