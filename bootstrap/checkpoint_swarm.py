"""A peer's part in checkpoint swarming: it serves the chunks it holds, advertises its versions in
the DHT, and fetches versions from every peer that holds them (partial holders included)."""

from __future__ import annotations

import contextlib
import logging
import random

import trio
from libp2p.abc import IHost

from averaging.lanes import Lanes
from averaging.wire import FrameError
from bootstrap.advert import Holding, find_holdings, holdings_place, holdings_value
from bootstrap.chunk_protocol import PROTOCOL, ChunkServer, LatestSource, ProtocolError, ask_manifest, \
    open_chunk_stream
from bootstrap.chunk_store import ChunkStore
from bootstrap.manifest import ManifestError, SignedManifest
from bootstrap.rate_limit import RateLimiter
from bootstrap.swarm_download import DownloadStats, ProgressCallback, SwarmDownload
from dht import RecordDHT

log = logging.getLogger(__name__)


class CheckpointSwarm:
    """``max_upload_mbit``/``max_download_mbit`` cap this peer's chunk traffic (None: no cap).
    Chunks move on ``lanes`` where peers run them (``averaging.lanes``), else on libp2p streams."""

    def __init__(self, host: IHost, dht: RecordDHT, swarm: str, store: ChunkStore, *,
                 max_upload_mbit: float | None = None, max_download_mbit: float | None = None,
                 latest: LatestSource | None = None, max_state_bytes: int = 4 << 30,
                 stall_timeout: float = 10.0, lanes: Lanes | None = None) -> None:
        self.host, self.dht, self.swarm, self.store = host, dht, swarm, store
        self.lanes = lanes or Lanes(host)
        self.upload_limit = RateLimiter.from_mbit(max_upload_mbit)
        self.download_limit = RateLimiter.from_mbit(max_download_mbit)
        self.server = ChunkServer(store, self.upload_limit, self.download_limit, latest=latest)
        self.max_state_bytes, self.stall_timeout = max_state_bytes, stall_timeout
        self.holdings_place = holdings_place(swarm, host.get_id().to_base58())

    def serve(self) -> None:
        self.lanes.serve(PROTOCOL, self.server.handle)

    # ----- advertising
    def holdings(self) -> list[Holding]:
        """Every version this peer holds chunks of (a download under way included), newest first."""
        me = self.host.get_id().to_base58()
        out = []
        for signed in self.store.manifests():
            total = len(signed.manifest.unique_chunks())
            held = total - len(self.store.missing(signed))
            if held:
                out.append(Holding(me, signed.manifest.run_id, signed.id, signed.manifest.round, held, total))
        return out

    async def advertise(self, ttl: float) -> None:
        """Write this peer's holdings now, for ``ttl`` seconds a heartbeat (``BucketPlace.refresh_beats``)."""
        if self.holdings_place.level is None:  # found before the first write: in a large swarm the unsplit key is empty
            await self.holdings_place.follow(self.dht)
        value = holdings_value(self.holdings())
        await self.holdings_place.write(self.dht, value, ttl, compared=value)

    async def advertise_forever(self, heartbeat: float, ttl: float) -> None:
        """Keep this peer's holdings written: refreshed every ``refresh_beats`` heartbeats, and at
        once when they change."""
        while True:
            with trio.move_on_after(max(heartbeat, ttl - heartbeat)):
                await self.holdings_place.follow(self.dht)  # the level of its bucket follows the swarm's size
                value = holdings_value(self.holdings())
                if self.holdings_place.refresh_due(value):
                    await self.holdings_place.write(self.dht, value, ttl, compared=value)
            await trio.sleep(heartbeat)

    async def holders(self, run_id: str) -> list[Holding]:
        """Peers holding any version of ``run_id`` (they may share chunks with the one wanted),
        those with most of it first, in random order among equals (so that joiners spread over
        them; of this peer's bucket, in a large swarm)."""
        found = [h for h in await find_holdings(self.dht, self.holdings_place) if h.run_id == run_id]
        random.shuffle(found)
        return sorted(found, key=lambda h: (-h.round, -h.held))

    # ----- fetching
    async def fetch_manifest(self, peer: str, *, run_id: str | None = None,
                             manifest_id: bytes | None = None, timeout: float = 30.0) -> SignedManifest | None:
        """``peer``'s manifest ``manifest_id`` (or its newest of ``run_id``), checked; None if it
        has none, cannot be reached, or sends a forged one (logged)."""
        try:
            with trio.fail_after(timeout):
                stream = await open_chunk_stream(self.lanes, peer, self.upload_limit, self.download_limit)
                try:
                    return await ask_manifest(stream, max_bytes=self.max_state_bytes, run_id=run_id,
                                              manifest_id=manifest_id)
                finally:
                    with trio.move_on_after(1), contextlib.suppress(Exception):
                        await stream.close()
        except ManifestError as exc:
            log.warning("rejected a manifest from %s: %s", peer, exc)
        except (ProtocolError, FrameError, trio.TooSlowError) as exc:
            log.info("no manifest from %s: %s", peer, exc)
        return None

    async def download(self, signed: SignedManifest, sources: list[str], *, on_progress: ProgressCallback | None = None,
                       timeout: float = 3600.0) -> DownloadStats:
        """Fetch the chunks of ``signed`` not held yet from ``sources`` and from every peer the DHT
        shows holding its run, while it downloads; raises ``DownloadError`` if they run out."""
        run_id = signed.manifest.run_id

        async def find_sources() -> list[str]:
            return [h.peer_id for h in await self.holders(run_id)]

        download = SwarmDownload(self.lanes, self.store, signed, upload=self.upload_limit, download=self.download_limit,
                                 stall_timeout=self.stall_timeout, on_progress=on_progress)
        stats = await download.run(sources, find_sources=find_sources, timeout=timeout)
        self.store.prune()
        log.info("fetched round %d (%d of %d bytes; %.1f MB received, %.1f MB duplicate) from %d peers in %.1fs",
                 signed.manifest.round, stats.size_bytes - stats.reused_bytes, stats.size_bytes,
                 stats.bytes_received / 1e6, stats.duplicate_bytes / 1e6, len(stats.per_peer), stats.seconds)
        return stats
