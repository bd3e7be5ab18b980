"""A peer process that only holds, seeds and fetches checkpoints: for the tests and ``bench/join.py``.

    python -m swarm.state_node --seed --dir D --make-state 100      # seed a synthetic 100 MB state
    python -m swarm.state_node --bootstrap MADDR --dir D --fetch    # fetch the newest version, then seed it

Prints ``{"ready": PEER_ID, "addr": MADDR, "digest": ...}`` once it serves, and after a fetch one
line ``{"fetched": {...stats...}, "digest": ...}``; the digest is the SHA-256 of every tensor's bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
import trio

from bootstrap.checkpoint_swarm import CheckpointSwarm
from bootstrap.chunk_store import ChunkStore
from bootstrap.manifest import SignedManifest
from bootstrap.swarm_download import DownloadError
from swarm.cli import setup_logging
from swarm.exit_guard import exit_if_stuck
from swarm.peer import Peer, PeerConfig
from swarm.progress_bar import ProgressBar

RUN_ID = "synthetic"


def synthetic_state(megabytes: float, seed: int) -> dict[str, torch.Tensor]:
    """Weights and momentum of ``megabytes`` in all, like a DiLoCo state, drawn from ``seed``."""
    half = int(megabytes * (1 << 20) / 8)
    generator = torch.Generator().manual_seed(seed)
    return {"weights": torch.randn(half, generator=generator),
            "outer_momentum": torch.randn(half, generator=generator) * 1e-3}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name, tensor in tensors.items():
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return h.hexdigest()


def corrupt_chunks(store: ChunkStore, signed: SignedManifest, count: int) -> None:
    """Flip bytes in the middle of ``count`` stored chunks (size unchanged): a seeder serving bad data."""
    for ref in list(signed.manifest.unique_chunks().values())[:count]:
        path = store.chunk_dir / ref.id.hex()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


async def fetch_newest(checkpoints: CheckpointSwarm, run_id: str, timeout: float,
                       min_holders: int = 1) -> tuple[SignedManifest, dict]:
    """Wait for ``min_holders`` holders of ``run_id`` in the DHT, take the newest version one of
    them offers, download it."""
    with trio.fail_after(timeout):
        while True:
            holders = await checkpoints.holders(run_id)
            for holding in holders if len(holders) >= min_holders else []:
                signed = await checkpoints.fetch_manifest(holding.peer_id, manifest_id=holding.manifest_id)
                if signed is not None:
                    break
            else:
                await trio.sleep(0.5)
                continue
            break
    bar = ProgressBar(f"round {signed.manifest.round}")
    try:
        stats = await checkpoints.download(signed, [h.peer_id for h in holders], on_progress=bar, timeout=timeout)
    finally:
        bar.close()
    return signed, {"seconds": stats.seconds, "size_bytes": stats.size_bytes, "reused_bytes": stats.reused_bytes,
                    "bytes_received": stats.bytes_received, "duplicate_bytes": stats.duplicate_bytes,
                    "bad_chunks": stats.bad_chunks, "per_peer": stats.per_peer}


async def run(args: argparse.Namespace) -> None:
    peer = Peer(PeerConfig(listen=[args.listen], bootstrap=args.bootstrap, seed=args.seed, heartbeat=args.heartbeat,
                           lanes=args.lanes))
    store = ChunkStore(args.dir)
    checkpoints = CheckpointSwarm(peer.host, peer.dht, peer.config.swarm, store, max_upload_mbit=args.max_upload,
                                  max_download_mbit=args.max_download, stall_timeout=args.stall_timeout,
                                  lanes=peer.lanes)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        checkpoints.serve()
        ready = {"ready": peer.peer_id.to_base58(), "addr": str(peer.addrs[-1])}
        if args.make_state:
            tensors = synthetic_state(args.make_state, args.state_seed)
            signed = await trio.to_thread.run_sync(store.save, tensors, RUN_ID, args.round, peer.key_pair)
            if args.corrupt:
                corrupt_chunks(store, signed, args.corrupt)
            ready["digest"] = digest(tensors)
        await checkpoints.advertise(peer.ttl)
        nursery.start_soon(checkpoints.advertise_forever, peer.config.heartbeat, peer.ttl)
        print(json.dumps(ready), flush=True)
        if args.fetch:
            try:
                signed, stats = await fetch_newest(checkpoints, RUN_ID, args.timeout, args.min_holders)
            except (DownloadError, trio.TooSlowError) as exc:
                print(json.dumps({"error": str(exc) or "no holder found in time"}), flush=True)
                sys.exit(1)
            tensors = await trio.to_thread.run_sync(store.load, signed)
            print(json.dumps({"fetched": stats, "digest": digest(tensors)}), flush=True)
            if args.exit_after_fetch:
                exit_if_stuck(10.0)
                nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", action="store_true")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--dir", type=Path, required=True, help="the checkpoint store")
    parser.add_argument("--heartbeat", type=float, default=2.0)
    parser.add_argument("--make-state", type=float, metavar="MB", help="save a synthetic state of MB megabytes")
    parser.add_argument("--state-seed", type=int, default=0)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--corrupt", type=int, default=0, metavar="N", help="damage N of the saved chunks on disk")
    parser.add_argument("--fetch", action="store_true", help="fetch the newest synthetic version held in the swarm")
    parser.add_argument("--min-holders", type=int, default=1, help="wait until this many peers hold the run")
    parser.add_argument("--exit-after-fetch", action="store_true")
    parser.add_argument("--max-upload", type=float, metavar="MBIT")
    parser.add_argument("--max-download", type=float, metavar="MBIT")
    parser.add_argument("--stall-timeout", type=float, default=10.0)
    parser.add_argument("--no-lanes", dest="lanes", action="store_false", help="libp2p streams only")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose, args.quiet)
    trio.run(run, args)


if __name__ == "__main__":
    main()
