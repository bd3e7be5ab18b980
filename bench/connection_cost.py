"""What an open libp2p connection costs a Legion peer: memory per idle connection, measured.

``python bench/connection_cost.py [--connections 200]`` starts one host and that many others in
this process (``swarm.network.build_host``: TCP, Noise, yamux), connects each to the first, lets
them idle, and reports the process's resident memory growth per connection (both ends of each
connection live in this process; the figure per end is half) and the CPU the idle connections
take. It sizes the connection limits (``swarm.network.MAX_CONNECTIONS`` and the watermarks)
against the DHT contacts the scale simulator counts (``bench/scale.py --only dht``:
``dht_contacts_*``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import multiaddr
import psutil
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.peerinfo import PeerInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from swarm.network import build_host  # noqa: E402

LISTEN = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


async def measure(count: int, idle_seconds: float) -> dict:
    process = psutil.Process()
    async with trio.open_nursery() as nursery:
        hub = build_host(create_new_key_pair())
        hosts = [build_host(create_new_key_pair()) for _ in range(count)]
        for host in [hub, *hosts]:
            await nursery.start(_run, host)
        hub_info = PeerInfo(hub.get_id(), hub.get_addrs())
        await trio.sleep(1)
        gc.collect()
        before = process.memory_info().rss
        for host in hosts:
            await host.connect(hub_info)
        await trio.sleep(1)
        gc.collect()
        after = process.memory_info().rss
        connected = len(hub.get_network().get_connections())
        cpu_before, started = process.cpu_times(), time.monotonic()
        await trio.sleep(idle_seconds)
        cpu_after = process.cpu_times()
        idle_cpu = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / (time.monotonic() - started)
        nursery.cancel_scope.cancel()
    return {"connections": connected, "rss_bytes_per_connection_both_ends": round((after - before) / count),
            "idle_cpu_fraction": round(idle_cpu, 4), "idle_seconds": idle_seconds}


async def _run(host, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with host.run(listen_addrs=[LISTEN]):
        task_status.started()
        await trio.sleep_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds the connections idle while CPU is measured")
    args = parser.parse_args()
    print(json.dumps(trio.run(measure, args.connections, args.idle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
