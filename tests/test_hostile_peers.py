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

from averaging.allreduce import AllReduce, GroupSpec, SpecError  # noqa: E402
from averaging.averager import Averager  # noqa: E402
from averaging.matchmaking import _declaration  # noqa: E402
from averaging.partition import partition_bounds  # noqa: E402
from averaging.wire import read_frame, write_frame  # noqa: E402
from peer_helpers import start_peers  # noqa: E402


def group_of(peers, size, codec):
    members = tuple(sorted(p.peer_id.to_base58() for p in peers))
    by_id = {p.peer_id.to_base58(): p for p in peers}
    addrs = tuple(tuple(str(a) for a in by_id[m].addrs) for m in members)
    return GroupSpec("g" * 32, members, addrs, tuple(partition_bounds(size, [1] * len(members))), codec), by_id


@pytest.mark.parametrize("codec,members", [("none", 2), ("int8", 2), ("int8", 3)])
async def test_a_member_sending_values_near_float32s_limit_is_left_out_and_nobody_crashes(codec, members):
    size = 4096
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, members)
        spec, by_id = group_of(peers, size, codec)
        reducers = {m: AllReduce(by_id[m].host, lanes=by_id[m].lanes) for m in spec.members}
        for reducer in reducers.values():
            reducer.register_handlers()
        hostile = spec.members[1]
        vectors = {m: np.full(size, 3e38 if m == hostile else i + 1.0, np.float32) for i, m in enumerate(spec.members)}
        outcomes = {}

        async def average(member):
            outcomes[member] = await reducers[member].run(
                spec, spec.members.index(member), vectors[member], 5.0 if member == hostile else 1.0,
                deadline=trio.current_time() + 30)

        with trio.fail_after(60):
            async with trio.open_nursery() as rounds:
                for member in spec.members:
                    rounds.start_soon(average, member)
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
        spec, by_id = group_of(peers, size, "none")
        reducers = {m: AllReduce(by_id[m].host, lanes=by_id[m].lanes, max_weight=64) for m in spec.members}
        for reducer in reducers.values():
            reducer.register_handlers()
        vectors = {spec.members[0]: np.zeros(size, np.float32), spec.members[1]: np.ones(size, np.float32)}
        weights = {spec.members[0]: 64.0, spec.members[1]: 1e11}  # the second claims a huge weight
        outcomes = {}

        async def average(member):
            outcomes[member] = await reducers[member].run(spec, spec.members.index(member), vectors[member],
                                                          weights[member], deadline=trio.current_time() + 30)

        async with trio.open_nursery() as rounds:
            for member in spec.members:
                rounds.start_soon(average, member)
        for result, stats in outcomes.values():
            assert stats.outcome == "ok"
            np.testing.assert_allclose(result, 0.5)  # clipped to 64 each: the plain mean
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
            while averager.matchmaker._seeking is None or not averager.matchmaker._seeking.seen:
                await trio.sleep(0.05)
        seeking = averager.matchmaker._seeking
        full_key = averager.matchmaker._key(key)

        async def invite(inviter, spec_wire):
            stream = await inviter.host.new_stream(follower.peer_id, ["/legion/matchmaking/1.0.0"])
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
