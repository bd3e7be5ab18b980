"""``legion-peer``: run a peer (or a seed), inspect a swarm, make a swarm key, run the local demo."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

import trio

from bootstrap.join import BootstrapError, connect_bootstrap_peers
from dht import RecordDHT
from optim.data import DataError
from swarm.exit_guard import exit_if_stuck
from swarm.identity import IdentityError, load_or_create_identity
from swarm.members import Announcement, every_member, live_members
from swarm.network import build_host, raise_open_file_limit
from swarm.peer import ConfigError, Peer, PeerConfig
from swarm.run_config import RunConfig, RunConfigError, load_run_file
from swarm.relay import RelayLimitsConfig
from swarm.shard_ownership import fetch_shard_status, format_shard_table
from swarm.swarm_key import SwarmKeyError, read_swarm_key, write_swarm_key
from swarm.swarm_view import SwarmView
from swarm.web import AddressError, parse_address, serve_web, web_app

if TYPE_CHECKING:
    from swarm.metrics import PeerMetrics
    from swarm.trainer import Trainer

log = logging.getLogger("swarm.cli")
USER_ERRORS = (BootstrapError, ConfigError, IdentityError, SwarmKeyError, RunConfigError, DataError, AddressError)
COMMANDS = ("status", "dashboard", "new-swarm-key", "demo")
EXIT_TRAINED_ALONE = 3  # the run ended, but this peer averaged none of its rounds with the others
RUN_OPTIONS = [
    ("model", str, "model size: tiny, mini, small, medium, gpt2"),
    ("algorithm", str, "diloco (default), sync or onebit-adam"),
    ("codec", str, "codec of the averaged values: none, fp16, bf16, int8, int4, sign1, topk[:ratio]"),
    ("inner_steps", int, "DiLoCo: local steps per round (H)"),
    ("batch_size", int, "sequences per local step"),
    ("inner_lr", float, "learning rate of the inner AdamW (and of 1-bit Adam)"),
    ("lr_schedule", str, "inner learning rate over the run's rounds: constant, or cosine (to a tenth)"),
    ("outer_lr", float, "DiLoCo: outer Nesterov learning rate"),
    ("outer_momentum", float, "DiLoCo: outer Nesterov momentum"),
    ("rounds", int, "stop after this swarm round (0: train until stopped)"),
    ("group_size", int, "peers per averaging group (more DiLoCo peers than that reduce across groups)"),
]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--swarm", default="default", help="swarm name: the DHT key space the peer uses")
    parser.add_argument("--swarm-key", type=Path, help="pre-shared key file of a private swarm")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: libp2p too)")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")


def run_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legion-peer",
        description="Run a Legion peer. Other commands: legion-peer {status,dashboard,new-swarm-key,demo} --help",
    )
    parser.add_argument("--seed", action="store_true", help="start a swarm: a stable peer others bootstrap from")
    parser.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                        help="address of any peer of the swarm, /ip4/…/tcp/…/p2p/… (repeatable)")
    parser.add_argument("--listen", action="append", metavar="MULTIADDR",
                        help="address to listen on (default /ip4/0.0.0.0/tcp/0)")
    parser.add_argument("--announce", action="append", default=[], metavar="MULTIADDR",
                        help="an address to advertise first, e.g. a forwarded port or a VPS's public IP "
                             "(repeatable); listen and observed addresses follow, wildcards expanded")
    parser.add_argument("--lane-port", type=int, default=0, metavar="PORT",
                        help="TCP port of the lane listener (default: any free one); fix it to forward it")
    parser.add_argument("--upnp", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the home router (UPnP-IGD, else NAT-PMP) to forward the libp2p and lane ports, and announce its "
                             "external address (default: on, where this host has a private address)")
    parser.add_argument("--relay-service", action=argparse.BooleanOptionalAction, default=None,
                        help="relay connections for peers behind NAT (Circuit Relay v2) while this peer "
                             "is dialable (default: on for a seed, off otherwise)")
    parser.add_argument("--relay-limits", type=_relay_limits, default=RelayLimitsConfig(),
                        metavar="RESERVATIONS,CIRCUITS,SECONDS,MIB",
                        help="what this peer's relay grants: peers holding a slot, circuits at once, and each "
                             "circuit's lifetime and MiB (default 64,32,600,64)")
    parser.add_argument("--identity", type=Path, help="Ed25519 key file, created (0600) on first run")
    parser.add_argument("--heartbeat", type=float, default=5.0, help="seconds between announcements")
    parser.add_argument("--upload-mbps", type=float, help="declared upload bandwidth, Mbit/s")
    parser.add_argument("--download-mbps", type=float, help="declared download bandwidth, Mbit/s")
    parser.add_argument("--gpu", help="declared GPU name (default: detected)")
    parser.add_argument("--no-lanes", dest="lanes", action="store_false",
                        help="move bulk data (all-reduce, checkpoint chunks) on libp2p streams only, "
                             "not on direct encrypted TCP lanes")
    parser.add_argument("--dashboard", metavar="HOST:PORT",
                        help="serve the live swarm dashboard here (read-only; port 0: any free one)")
    parser.add_argument("--metrics", metavar="HOST:PORT",
                        help="serve this peer's Prometheus metrics at http://HOST:PORT/metrics")
    parser.add_argument("--count", type=int, default=1,
                        help="run this many peers in this process (simulations and tests)")
    train = parser.add_argument_group(
        "training", "A seed, or any peer given --run or a run option, publishes that run; other peers "
                    "train the run the swarm publishes (waiting for one if there is none yet).")
    train.add_argument("--run", type=Path, metavar="CONFIG.toml", help="run configuration (keys: docs/operations.md)")
    for name, kind, text in RUN_OPTIONS:
        train.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, help=text)
    train.add_argument("--no-overlap", dest="overlap", action="store_const", const=False,
                       help="DiLoCo: wait for each round's averaging instead of overlapping it")
    train.add_argument("--sharded", dest="sharded", action="store_const", const=True,
                       help="DiLoCo: the outer momentum lives only with each shard's owners (ZeRO-style)")
    train.add_argument("--data", help="text file, directory of text, or directory with nanoGPT train.bin/val.bin "
                                      "(default: the run's data, else the Python standard library's sources)")
    train.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--out", type=Path, help="directory for metrics.jsonl and the final model.pt")
    train.add_argument("--wait-peers", type=int, default=1, metavar="N",
                       help="start training once N peers (this one included) have joined the run, "
                            "or once the run is past its first round (then it catches up)")
    train.add_argument("--checkpoint-dir", type=Path, metavar="DIR",
                       help="where this peer keeps its checkpoints (default: OUT/checkpoints with --out, else a "
                            "temporary directory); a restarted peer resumes from it and fetches only what changed")
    train.add_argument("--keep-checkpoints", type=int, default=2, metavar="N", help="versions kept on disk")
    train.add_argument("--max-upload", type=float, metavar="MBIT", help="cap on this peer's checkpoint uploads, Mbit/s")
    train.add_argument("--max-download", type=float, metavar="MBIT",
                       help="cap on this peer's checkpoint downloads, Mbit/s")
    train.add_argument("--no-train", action="store_true", help="only take part in the DHT and averaging")
    _common(parser)
    return parser


def status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="legion-peer status", description="List the live peers of a swarm.")
    parser.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR")
    parser.add_argument("--json", action="store_true", help="print a JSON list of peer objects")
    parser.add_argument("--shards", action="store_true",
                        help="show shard ownership of the swarm's runs instead (owners, replicas, lease age)")
    parser.add_argument("--all", action="store_true",
                        help="every peer of a swarm of more than 64 (read bucket by bucket; else one bucket is shown)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds allowed for each network step")
    _common(parser)
    return parser


def dashboard_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="legion-peer dashboard",
        description="Serve a live, read-only web view of a swarm, read from its DHT through any of its peers.")
    parser.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR")
    parser.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT",
                        help="where to serve the page (default 127.0.0.1:8080; 0.0.0.0:PORT for everyone)")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between reads of the swarm")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds allowed for each network step")
    _common(parser)
    return parser


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for library in ("libp2p", "multiaddr"):  # (multiaddr logs every address it parses at DEBUG)
        logging.getLogger(library).setLevel(
            logging.DEBUG if verbose >= 2 else logging.WARNING if verbose else logging.CRITICAL)


async def _stop_on_signal(peers: list[Peer], trainers: list[Trainer], nursery: trio.Nursery,
                          grace: float = 5.0) -> None:
    """On SIGINT/SIGTERM stop training, ask every peer to leave gracefully, then end the process's
    nursery; whatever is still busy after ``grace`` seconds is cancelled."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            with trio.move_on_after(grace):
                for trainer in trainers:
                    trainer.stop()
                for trainer in trainers:
                    await trainer.finished.wait()
                for peer in peers:
                    peer.stop()
                for peer in peers:
                    await peer.stopped.wait()
            exit_if_stuck(grace)
            nursery.cancel_scope.cancel()
            return


@dataclass
class TrainingOptions:
    run: RunConfig | None  # None: train the run the swarm publishes
    data: str | None
    device: str
    out: Path | None
    rounds: int
    threads: int | None
    wait_peers: int
    checkpoint_dir: Path | None
    keep_checkpoints: int
    max_upload: float | None
    max_download: float | None


def _training_options(args: argparse.Namespace) -> TrainingOptions | None:
    if args.no_train:
        return None
    overrides = {name: getattr(args, name) for name, _, _ in RUN_OPTIONS}
    overrides["overlap"] = args.overlap
    overrides["sharded"] = args.sharded
    run = None
    if args.run or args.seed or any(v is not None for v in overrides.values()):
        run = (load_run_file(args.run) if args.run else RunConfig()).with_overrides(**overrides)
    if args.data and not Path(args.data).exists():
        raise DataError(f"--data {args.data}: no such file or directory")
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be at least 1")
    import torch  # the training stack loads only for peers that train

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r}: {exc}") from exc
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA GPU torch can use")
    if args.wait_peers < 1:
        raise ConfigError("--wait-peers must be at least 1")
    if args.keep_checkpoints < 1:
        raise ConfigError("--keep-checkpoints must be at least 1")
    for flag, rate in (("--max-upload", args.max_upload), ("--max-download", args.max_download)):
        if rate is not None and not 0 < rate < 1e6:
            raise ConfigError(f"{flag} {rate} Mbit/s is not a usable rate")
    return TrainingOptions(run, args.data, device, args.out, args.rounds or 0, args.threads, args.wait_peers,
                           args.checkpoint_dir, args.keep_checkpoints, args.max_upload, args.max_download)


def _peer_configs(args: argparse.Namespace) -> list[PeerConfig]:
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.count > 1 and args.identity:
        raise ConfigError("--identity names one peer; it cannot be used with --count > 1")
    listen = args.listen or ["/ip4/0.0.0.0/tcp/0"]
    if args.count > 1 and any(not a.endswith("/tcp/0") for a in listen):
        raise ConfigError("with --count > 1 every --listen address must use port 0")
    return [PeerConfig(listen=listen, bootstrap=list(args.bootstrap), seed=args.seed and i == 0,
                       identity=args.identity, swarm_key=args.swarm_key, swarm=args.swarm,
                       heartbeat=args.heartbeat, upload_mbps=args.upload_mbps,
                       download_mbps=args.download_mbps, gpu=args.gpu, lanes=args.lanes,
                       lane_port=args.lane_port if i == 0 else 0, announce=list(args.announce),
                       relay_service=args.relay_service, relay_limits=args.relay_limits, upnp=args.upnp)
            for i in range(args.count)]


def _relay_limits(text: str) -> RelayLimitsConfig:
    try:
        reservations, circuits, seconds, mib = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("four integers: RESERVATIONS,CIRCUITS,SECONDS,MIB") from None
    if not (0 < reservations <= 4096 and 0 < circuits <= 4096 and 0 < seconds <= 86400 and 0 < mib <= 1 << 20):
        raise argparse.ArgumentTypeError("relay limits out of range")
    return RelayLimitsConfig(reservations, circuits, seconds, mib << 20)


@dataclass
class WebOptions:
    dashboard: str | None  # HOST:PORT
    metrics: str | None


async def _serve_web(peer: Peer, web: WebOptions, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """The peer's dashboard and metrics servers, printing their URLs, until the peer stops;
    ``task_status`` gets the ``PeerMetrics`` (None without ``--metrics``)."""
    from swarm.metrics import PeerMetrics  # prometheus_client loads only where metrics are served

    metrics = PeerMetrics(peer) if web.metrics else None
    async with trio.open_nursery() as nursery:
        if web.dashboard:
            view = SwarmView(peer.dht, peer.config.swarm, timeout=peer.config.network_timeout)
            nursery.start_soon(view.watch)
            url = await nursery.start(serve_web, web_app(view), web.dashboard)
            print(f"dashboard {url}", flush=True)
        if metrics is not None:
            url = await nursery.start(serve_web, web_app(registry=metrics.registry), web.metrics)
            print(f"metrics {url}metrics", flush=True)
        task_status.started(metrics)
        await peer.stopped.wait()
        nursery.cancel_scope.cancel()


async def _run_peer(config: PeerConfig, training: TrainingOptions | None, web: WebOptions, index: int,
                    peers: list[Peer], trainers: list[Trainer], untrained: list[Peer], *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run one peer; with ``training`` it trains, then leaves when its run is done (added to
    ``untrained`` if it never averaged with the peers it trained beside). The first peer of the
    process serves ``web``."""
    peer = Peer(config)
    peers.append(peer)
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        metrics: PeerMetrics | None = None
        if index == 0:
            metrics = await nursery.start(_serve_web, peer, web)
        print(f"{'seed' if config.seed else 'peer'} {peer.peer_id} listening on "
              f"{' '.join(str(a) for a in peer.addrs)}", flush=True)
        if config.seed:
            print("others join this swarm with:", flush=True)
            for addr in peer.addrs:
                print(f"  legion-peer --bootstrap {addr}", flush=True)
        task_status.started(peer)
        if training is None:
            return
        out = training.out / f"peer-{index}" if training.out and index else training.out
        if out:
            out.mkdir(parents=True, exist_ok=True)
        checkpoints = training.checkpoint_dir / f"peer-{index}" if training.checkpoint_dir and index \
            else training.checkpoint_dir
        from swarm.trainer import Trainer

        trainer = Trainer(peer, training.run, data=training.data, device=training.device, out=out,
                          rounds=training.rounds, wait_peers=training.wait_peers, checkpoint_dir=checkpoints,
                          keep_checkpoints=training.keep_checkpoints, max_upload_mbit=training.max_upload,
                          max_download_mbit=training.max_download)
        trainers.append(trainer)
        if metrics is not None:
            metrics.watch(trainer)
        summary = await trainer.run()
        print("done " + json.dumps({"peer_id": str(peer.peer_id), **summary}), flush=True)
        if summary["rounds_failed"] and not summary["rounds_averaged"]:
            print(f"legion-peer: error: peer {peer.peer_id} trained alone: none of its {summary['rounds_failed']} "
                  "rounds with other peers averaged (see the log for why; peers behind NAT need a port "
                  "others can dial)", file=sys.stderr, flush=True)
            untrained.append(peer)
        peer.stop()
        if all(t.finished.is_set() for t in trainers):  # the process's work is done: it ends now
            exit_if_stuck(15.0)


async def _run_peers(configs: list[PeerConfig], training: TrainingOptions | None, web: WebOptions) -> int:
    """Run the peers until a signal or until their training is done; the first starts alone, the
    others join through it at once. Returns how many trained alone although others trained too."""
    peers: list[Peer] = []
    trainers: list[Trainer] = []
    untrained: list[Peer] = []
    raise_open_file_limit()
    if training and training.threads:
        import torch

        torch.set_num_threads(training.threads)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, peers, trainers, nursery)
        async with trio.open_nursery() as running:
            first = await running.start(_run_peer, configs[0], training, web, 0, peers, trainers, untrained)
            for index, config in enumerate(configs[1:], 1):
                config.bootstrap = [str(first.addrs[-1]), *config.bootstrap]
                running.start_soon(_run_peer, config, training, web, index, peers, trainers, untrained)
        nursery.cancel_scope.cancel()
    return len(untrained)


@asynccontextmanager
async def dht_client(bootstrap: list[str], psk: str | None, timeout: float) -> AsyncIterator[RecordDHT]:
    """A DHT client with a throwaway identity, joined through ``bootstrap``: it reads, stores nothing."""
    key_pair = load_or_create_identity(None)
    host = build_host(key_pair, psk=psk, dial_timeout=timeout)
    dht = RecordDHT(host, key_pair, server=False, timeout=timeout)
    async with host.run([]), dht.running():
        for peer_id in await connect_bootstrap_peers(host, bootstrap, timeout):
            await dht.add_peer(peer_id)
        yield dht


async def fetch_status(bootstrap: list[str], swarm: str, psk: str | None, timeout: float, shards: bool = False,
                       every: bool = False):
    """Read the swarm's live members, a bucket of them in a large swarm unless ``every`` (with
    ``shards``: the shard ownership of its runs)."""
    async with dht_client(bootstrap, psk, timeout) as dht:
        if shards:
            return await fetch_shard_status(dht, swarm)
        return await (every_member(dht, swarm) if every else live_members(dht, swarm))


async def serve_dashboard(bootstrap: list[str], swarm: str, psk: str | None, timeout: float, listen: str,
                          interval: float) -> None:
    """``legion-peer dashboard``: serve the swarm's live view until SIGINT/SIGTERM."""
    async with dht_client(bootstrap, psk, timeout) as dht, trio.open_nursery() as nursery:
        view = SwarmView(dht, swarm, interval=interval, timeout=timeout)
        nursery.start_soon(view.watch)
        url = await nursery.start(serve_web, web_app(view), listen)
        print(f"dashboard {url}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _dashboard(argv: list[str]) -> int:
    args = dashboard_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    parse_address(args.listen)
    if not 0.2 <= args.interval <= 600:
        raise ConfigError("--interval must lie in [0.2, 600] seconds")
    psk = read_swarm_key(args.swarm_key) if args.swarm_key else None
    trio.run(serve_dashboard, args.bootstrap, args.swarm, psk, args.timeout, args.listen, args.interval)
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_table(members: list[Announcement], now: float | None = None) -> str:
    rows = [("PEER ID", "ROLE", "VERSION", "UPTIME", "CPU", "RAM", "GPU", "UP/DOWN Mbit/s", "REACH", "ADDRESS")]
    for m in members:
        info = m.as_json(now)
        bandwidth = "-" if m.bandwidth_source == "unknown" else (
            f"{m.upload_mbps or '?'}/{m.download_mbps or '?'} ({m.bandwidth_source})")
        rows.append((m.peer_id, m.role, m.version, _duration(info["uptime_seconds"]), str(m.cpu_cores),
                     f"{m.ram_bytes / 2**30:.1f} GiB", m.gpu or "none", bandwidth, m.reachability,
                     m.addrs[0] if m.addrs else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + [f"{len(members)} live peer(s)"])


def _status(argv: list[str]) -> int:
    args = status_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    psk = read_swarm_key(args.swarm_key) if args.swarm_key else None
    if args.shards:
        runs = trio.run(fetch_status, args.bootstrap, args.swarm, psk, args.timeout, True)
        print(json.dumps(runs, indent=2) if args.json else format_shard_table(runs))
        return 0
    members = trio.run(fetch_status, args.bootstrap, args.swarm, psk, args.timeout, False, args.all)
    if args.json:
        print(json.dumps([m.as_json() for m in members.entries], indent=2))
    else:
        print(format_table(members.entries))
        if members.level > 0 and not args.all:
            print(f"about {members.estimate} peers in the swarm; these {len(members.entries)} are one bucket of "
                  "them (--all lists every one)")
    return 0


def _new_swarm_key(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="legion-peer new-swarm-key",
                                     description="Write a new pre-shared key file for a private swarm.")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        write_swarm_key(args.path)
    except FileExistsError:
        raise ConfigError(f"{args.path} exists; not overwriting a swarm key") from None
    print(f"wrote {args.path}; give it to every peer of the private swarm with --swarm-key")
    return 0


def _run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    web = WebOptions(args.dashboard, args.metrics)
    for address in (web.dashboard, web.metrics):
        if address is not None:
            parse_address(address)
    untrained = trio.run(_run_peers, _peer_configs(args), _training_options(args), web)
    return EXIT_TRAINED_ALONE if untrained else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else "run"
    try:
        if command == "status":
            return _status(argv[1:])
        if command == "dashboard":
            return _dashboard(argv[1:])
        if command == "new-swarm-key":
            return _new_swarm_key(argv[1:])
        if command == "demo":
            from swarm.demo import main as demo_main
            return demo_main(argv[1:])
        return _run(argv)
    except (*USER_ERRORS, BaseExceptionGroup) as exc:
        errors = _leaves(exc)
        if not all(isinstance(e, USER_ERRORS) for e in errors):
            raise
        for error in errors:
            print(f"legion-peer: error: {error}", file=sys.stderr)
        return 2


def _leaves(exc: BaseException) -> list[BaseException]:
    if not isinstance(exc, BaseExceptionGroup):
        return [exc]
    return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]


if __name__ == "__main__":
    sys.exit(main())
