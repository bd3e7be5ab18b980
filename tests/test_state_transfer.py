"""Fetching a training state from a peer over real libp2p hosts; hostile donors and run boards."""

import pytest
import torch
import trio

from bootstrap.state_transfer import PROTOCOL, StateTransferError, _layout, fetch_state, serve_state
from averaging.wire import write_frame
from swarm.peer import Peer, PeerConfig
from swarm.run_board import Progress, choose_run
from swarm.run_config import PROTOCOL as RUN_PROTOCOL, RunConfig, RunConfigError

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def two_peers(nursery):
    donor = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, seed=True, heartbeat=1)).run)
    joiner = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(donor.addrs[0])], heartbeat=1)).run)
    return donor, joiner


async def test_a_state_arrives_bit_identical_and_a_wrong_run_is_refused():
    state = {"weights": torch.randn(3_000_000), "momentum": torch.randn(7, 5).to(torch.bfloat16),
             "inner.0.step": torch.tensor(12.0), "empty": torch.zeros(0)}
    async with trio.open_nursery() as nursery:
        donor, joiner = await two_peers(nursery)
        donor.host.set_stream_handler(PROTOCOL, lambda s: serve_state(s, lambda: ("run-a", 7, state)))
        round_, got = await fetch_state(joiner.host, donor.peer_id.to_base58(), "run-a", max_bytes=1 << 30)
        assert round_ == 7 and set(got) == set(state)
        for name, tensor in state.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
        with pytest.raises(StateTransferError, match="no state of run"):
            await fetch_state(joiner.host, donor.peer_id.to_base58(), "run-b", max_bytes=1 << 30)
        with pytest.raises(StateTransferError, match="larger than"):
            await fetch_state(joiner.host, donor.peer_id.to_base58(), "run-a", max_bytes=1 << 20)
        nursery.cancel_scope.cancel()


async def test_a_donor_that_lies_about_sizes_or_breaks_off_is_an_error_not_a_crash():
    async def liar(stream):
        await stream.read(1 << 16)
        await write_frame(stream, {"t": "state", "run": "r", "round": 1, "layout": [["w", "float32", [4]]]})
        await write_frame(stream, {}, b"\0" * 32)  # twice the announced bytes
        await stream.close()

    async def quitter(stream):
        await stream.read(1 << 16)
        await write_frame(stream, {"t": "state", "run": "r", "round": 1, "layout": [["w", "float32", [1 << 20]]]})
        await write_frame(stream, {}, b"\0" * 1000)
        await stream.reset()

    async with trio.open_nursery() as nursery:
        donor, joiner = await two_peers(nursery)
        for handler, message in ((liar, "overruns"), (quitter, "ended")):
            donor.host.set_stream_handler(PROTOCOL, handler)
            with pytest.raises(StateTransferError, match=message):
                await fetch_state(joiner.host, donor.peer_id.to_base58(), "r", max_bytes=1 << 30, timeout=10)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("layout", [
    "nonsense", [["w", "float64", [3]]], [["w", "float32", [-1]]], [["w", "float32", [1 << 40]]], [[1, 2, 3]],
])
def test_malformed_layouts_are_rejected_before_allocating(layout):
    with pytest.raises(StateTransferError):
        _layout({"round": 1, "layout": layout}, max_bytes=1 << 30)


def test_a_joiner_picks_the_run_most_peers_train_and_explains_an_incompatible_swarm():
    a, b = RunConfig(model="tiny").validate(), RunConfig(model="mini").validate()
    board = [Progress(a.run_id, RUN_PROTOCOL, a.to_dict(), peer_id="p1"),
             Progress(b.run_id, RUN_PROTOCOL, b.to_dict(), peer_id="p2"),
             Progress(b.run_id, RUN_PROTOCOL, b.to_dict(), peer_id="p3")]
    assert choose_run(board) == b
    with pytest.raises(RunConfigError, match="cannot join"):
        choose_run([Progress("x", RUN_PROTOCOL + 1, {}, peer_id="p9")])
    with pytest.raises(RunConfigError, match="no peer of this swarm publishes"):
        choose_run([])
    forged = Progress("0" * 16, RUN_PROTOCOL, a.to_dict(), peer_id="p4")
    with pytest.raises(RunConfigError, match="does not match its id"):
        choose_run([forged])
    with pytest.raises(ValueError):
        Progress.from_value("p5", {"run_id": 1, "protocol": 1, "config": {}, "bogus": True})
