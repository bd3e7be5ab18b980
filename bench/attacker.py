"""A hostile Legion peer: a real training peer process with attacks patched into it.

    python bench/attacker.py --attack NAME [--attack NAME ...] -- LEGION-PEER-ARGS...

It runs ``legion-peer`` (``swarm.cli``) with the named attacks applied, so it joins, matches and
averages like any peer and misbehaves only where the attack says. Used by ``bench/attack.py`` and
the hostile-peer tests; nothing here is part of the library.

Attacks (``ATTACKS``):
  inflate-weight   declares a contribution weight of 1e11 (honest: samples in the round)
  scale            sends its pseudo-gradient times 50 (inside the owners' 100x norm filter)
  sign-flip        sends its pseudo-gradient times -20
  forged-round     claims a round a million ahead and serves a state of random weights at it
  hijack           invites every peer it sees seeking a group, as if it led them all
  grief            joins every group, then sends nothing (the others wait out their timeouts)
  bid-inflate      bids 100 Gbit/s and 1 PiB for shards, vouching for itself (sharded runs)
  garbage          sends random bytes on every Legion protocol and to every lane listener it learns of
  oversized        writes the largest entries the DHT takes, and larger forged ones, under every key
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import trio  # noqa: E402

log = logging.getLogger("attacker")

FORGED_ROUND = 1_000_000
SCALES = {"scale": 50.0, "sign-flip": -20.0}


def inflate_weight() -> None:
    from averaging.allreduce import AllReduce

    run = AllReduce.run

    async def inflated(self, spec, me, flat, weight, **kwargs):
        self.max_weight = 1e12  # its own clip off
        return await run(self, spec, me, flat, 1e11, **kwargs)

    AllReduce.run = inflated


def scaled(factor: float) -> None:
    from averaging.averager import Averager

    all_reduce = Averager.all_reduce

    async def scaled_all_reduce(self, tensors, **kwargs):
        return await all_reduce(self, [t * factor for t in tensors], **kwargs)

    Averager.all_reduce = scaled_all_reduce


def forged_round() -> None:
    from swarm.run_board import WIRE_NAMES, Progress
    from swarm.trainer import Trainer

    to_value = Progress.to_value

    def claimed(self):
        return {**to_value(self), WIRE_NAMES["round"]: self.round + FORGED_ROUND}

    Progress.to_value = claimed
    latest = Trainer._latest_checkpoint

    async def forged(self, run_id):
        honest = await latest(self, run_id)
        if honest is None or self.optimizer is None or self.optimizer.snapshot is None:
            return honest
        round_, tensors = self.optimizer.snapshot
        tensors = {**tensors, "weights": torch.randn_like(tensors["weights"]) * 10}
        return await trio.to_thread.run_sync(lambda: self.store.save(
            tensors, run_id, round_ + FORGED_ROUND, self.peer.key_pair, meta={"config": self.config.to_dict()}))

    Trainer._latest_checkpoint = forged


def hijack() -> None:
    import averaging.matchmaking as matchmaking

    def everyone_is_mine(names, distance, target, min_size, key, mix_every, private=frozenset()):
        me = matchmaking.HIJACKER
        return [[me, *sorted(n for n in names if n != me)]]

    init = matchmaking.Matchmaker.__init__

    def remember(self, host, *args, **kwargs):
        init(self, host, *args, **kwargs)
        matchmaking.HIJACKER = host.get_id().to_base58()

    matchmaking.Matchmaker.__init__ = remember
    matchmaking.plan_groups = everyone_is_mine


def grief() -> None:
    from averaging.allreduce import AllReduce

    async def silent(self, state, owner, deadline):
        await trio.sleep_until(deadline)

    AllReduce._exchange_with_owner = silent


def bid_inflate() -> None:
    import swarm.trainer
    from shards.bids import MAX_MEMORY, MAX_UPLOAD_MBIT, Bid, seen_of

    def greedy(peer_id, started_at, upload_mbit, free_memory, measured=None):
        import time  # and it vouches for its own upload, as if measured
        return Bid(peer_id, MAX_MEMORY, MAX_UPLOAD_MBIT, started_at - 86400, time.time(),
                   seen_of({**(measured or {}), peer_id: MAX_UPLOAD_MBIT}))

    swarm.trainer.own_bid = greedy


def _protocols() -> list[str]:
    from averaging import allreduce, lanes, matchmaking
    from bootstrap import chunk_protocol
    from shards import outer

    return [allreduce.PROTOCOL, allreduce.REPAIR_PROTOCOL, lanes.PROTOCOL, matchmaking.PROTOCOL,
            matchmaking.PING_PROTOCOL, chunk_protocol.PROTOCOL, outer.PROTOCOL]


async def _spray_garbage(peer) -> None:
    """Every few seconds: random bytes (and absurd frame headers) on every protocol to every
    connected peer, and a reset connection to every lane listener learnt from a lane offer."""
    from averaging.lanes import PROTOCOL as LANE_PROTOCOL
    from averaging.wire import read_frame, write_frame

    protocols = _protocols()
    while True:
        for target in list(peer.host.get_connected_peers()):
            for protocol in protocols:
                with trio.move_on_after(2):
                    try:
                        stream = await peer.host.new_stream(target, [protocol])
                        await stream.write(random.choice([os.urandom(random.randint(1, 4096)),
                                                          b"\xff\xff\xff\xff" * 3, b"\x00\x00\x00\x10" * 3]))
                        if protocol == LANE_PROTOCOL:  # a real lane offer, then a reset at its port
                            await stream.close()
                            stream = await peer.host.new_stream(target, [protocol])
                            await write_frame(stream, {"proto": protocols[0], "key": os.urandom(32)})
                            answer, _ = await read_frame(stream, 0)
                            address = stream.get_remote_address()
                            if answer.get("t") == "ok" and address:
                                sock = await trio.open_tcp_stream(address[0], answer["port"])
                                await sock.send_all(os.urandom(7))
                                sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                                sock.socket.close()
                        await stream.reset()
                    except Exception as exc:  # the point is to provoke errors at the other end
                        log.debug("garbage to %s on %s: %s", target, protocol, exc)
        await trio.sleep(3)


async def _oversize(peer) -> None:
    """The largest entries each key takes, refreshed, plus forged ones over the caps."""
    from dht.records import KIND_ENTRY_BYTES, MAX_TTL, sign_entry
    from libp2p.records.record import make_signed_put_record

    swarm = peer.config.swarm
    while True:
        for kind, limit in KIND_ENTRY_BYTES.items():
            key = f"/legion/{swarm}/{kind}"
            with trio.move_on_after(5):
                try:
                    await peer.dht.store(key, os.urandom(limit - 300), MAX_TTL)
                except Exception as exc:
                    log.debug("oversized store under %s: %s", key, exc)
            # forged: an entry past the cap and past the lifetime, signed (sign_entry refuses it)
            entry = sign_entry(f"/legion/{swarm}/blobs", peer.key_pair, os.urandom(60_000), ttl=MAX_TTL)
            wire = [entry.to_wire()[0], entry.value_bytes, entry.timestamp, entry.timestamp + 86400, entry.signature]
            bundle = msgpack.packb([wire], use_bin_type=True)
            record = make_signed_put_record(key.encode(), bundle, peer.key_pair.private_key)
            for target in list(peer.host.get_connected_peers())[:20]:
                with trio.move_on_after(3):
                    try:
                        await peer.dht.kad.value_store._store_at_peer(target, key.encode(), bundle, record=record)
                    except Exception as exc:
                        log.debug("forged store at %s: %s", target, exc)
        await trio.sleep(3)


def background(task) -> None:
    """Run ``task(peer)`` beside the peer's own work for as long as it runs."""
    from swarm.peer import Peer

    run = Peer.run

    async def with_task(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            await nursery.start(run, self)
            task_status.started(self)
            nursery.start_soon(task, self)

    Peer.run = with_task


ATTACKS = {
    "inflate-weight": inflate_weight,
    "scale": lambda: scaled(SCALES["scale"]),
    "sign-flip": lambda: scaled(SCALES["sign-flip"]),
    "forged-round": forged_round,
    "hijack": hijack,
    "grief": grief,
    "bid-inflate": bid_inflate,
    "garbage": lambda: background(_spray_garbage),
    "oversized": lambda: background(_oversize),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attack", action="append", choices=sorted(ATTACKS), required=True)
    parser.add_argument("peer_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    for name in args.attack:
        ATTACKS[name]()
    np.seterr(all="ignore")
    from swarm.cli import main as peer_main

    peer_args = args.peer_args[1:] if args.peer_args[:1] == ["--"] else args.peer_args
    return peer_main(peer_args)


if __name__ == "__main__":
    sys.exit(main())
