"""Throughput of a lane against a libp2p stream (TCP + Noise + yamux) between two peers.

    python bench/lanes.py [--size-mb 256] [--json]

Both peers run in this one process (one core does both ends, so the figures are the CPU cost of a
byte more than link speed); each way of moving the data is timed on the same peers in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from averaging.lanes import Lane  # noqa: E402
from averaging.wire import read_exactly  # noqa: E402
from swarm.peer import Peer, PeerConfig  # noqa: E402

SINK = "/legion/bench-sink/1.0.0"
PIECE = 1 << 20


async def sink(stream) -> None:
    expected = int.from_bytes(await read_exactly(stream, 8), "big")
    received = 0
    while received < expected:
        data = await stream.read(min(PIECE, expected - received))
        if not data:
            break
        received += len(data)
    await stream.write(received.to_bytes(8, "big"))
    await stream.close()


async def send(stream, size: int) -> float:
    piece = os.urandom(PIECE)
    total = size // PIECE * PIECE
    began = trio.current_time()
    await stream.write(total.to_bytes(8, "big"))
    for _ in range(size // PIECE):
        await stream.write(piece)
    reply = await read_exactly(stream, 8)
    seconds = trio.current_time() - began
    await stream.close()
    assert int.from_bytes(reply, "big") == total, "the sink missed bytes"
    return seconds


async def main(args: argparse.Namespace) -> None:
    listen = ["/ip4/127.0.0.1/tcp/0"]
    async with trio.open_nursery() as nursery:
        a = await nursery.start(Peer(PeerConfig(listen=listen, seed=True)).run)
        b = await nursery.start(Peer(PeerConfig(listen=listen, bootstrap=[str(a.addrs[0])])).run)
        b.lanes.serve(SINK, sink)
        size = int(args.size_mb * 1e6)
        lane = await a.lanes.open_stream(b.peer_id, SINK)
        assert isinstance(lane, Lane)
        lane_seconds = await send(lane, size)
        libp2p_seconds = await send(await a.host.new_stream(b.peer_id, [SINK]), size)
        result = {"size_mb": args.size_mb, "lane_mb_per_s": round(size / lane_seconds / 1e6, 1),
                  "libp2p_mb_per_s": round(size / libp2p_seconds / 1e6, 1),
                  "speedup": round(libp2p_seconds / lane_seconds, 2)}
        print(json.dumps(result) if args.json else
              f"{args.size_mb:g} MB, both ends in one process: lane {result['lane_mb_per_s']} MB/s, "
              f"libp2p stream {result['libp2p_mb_per_s']} MB/s ({result['speedup']}x)")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=float, default=256)
    parser.add_argument("--json", action="store_true")
    trio.run(main, parser.parse_args())
