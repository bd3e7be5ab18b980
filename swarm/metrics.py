"""Prometheus metrics of one peer (``--metrics HOST:PORT`` serves them at ``/metrics``).

Counters and gauges are read from the peer's own state when scraped (the optimizer's round counts,
the lanes' byte counts, the checkpoint limiters' totals), so nothing is counted twice; the two
histograms (all-reduce phases, DHT requests served) are fed as events happen. Each peer has its
own registry: several peers can run in one process.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from swarm.peer import VERSION
from swarm.reducer import RoundReport

if TYPE_CHECKING:
    from swarm.peer import Peer
    from swarm.trainer import Trainer

PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
DHT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class PeerMetrics:
    """The metrics of ``peer``, and of its trainer once ``watch`` is given one."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.trainer: Trainer | None = None
        self.registry = CollectorRegistry()
        self.phase_seconds = Histogram(
            "legion_allreduce_phase_seconds", "Seconds each phase of a round took (matchmaking, exchange, repair)",
            ["phase"], buckets=PHASE_BUCKETS, registry=self.registry)
        self.dht_request_seconds = Histogram(
            "legion_dht_request_seconds", "DHT requests this peer served, by seconds to serve one",
            buckets=DHT_BUCKETS, registry=self.registry)
        peer.dht.on_served = self.dht_request_seconds.observe
        self.registry.register(_PeerState(self))

    def watch(self, trainer: Trainer) -> None:
        self.trainer = trainer
        trainer.round_listeners.append(self._on_round)

    def _on_round(self, report: RoundReport) -> None:
        for phase, seconds in report.phase_seconds.items():
            self.phase_seconds.labels(phase).observe(seconds)


class _PeerState(Collector):
    """Counters and gauges read from the peer and its trainer at scrape time."""

    def __init__(self, metrics: PeerMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        peer, trainer = self.metrics.peer, self.metrics.trainer
        info = GaugeMetricFamily("legion_peer_info", "This peer: id, role and version", labels=["peer_id", "role", "version"])
        info.add_metric([str(peer.peer_id), "seed" if peer.config.seed else "peer", VERSION], 1)
        yield info
        yield GaugeMetricFamily("legion_uptime_seconds", "Seconds since this peer started",
                                value=time.time() - peer.started_at)
        yield GaugeMetricFamily("legion_connected_peers", "Peers with an open libp2p connection",
                                value=len(peer.host.get_connected_peers()))
        yield GaugeMetricFamily("legion_dht_routing_table_peers", "Peers in the DHT routing table",
                                value=peer.dht.routing_table_size())
        sent = CounterMetricFamily("legion_transport_bytes_sent", "Bytes of bulk protocols (all-reduce, checkpoint "
                                   "chunks) sent, by transport: lane (direct TCP) or libp2p", labels=["transport"])
        received = CounterMetricFamily("legion_transport_bytes_received", "Bytes of bulk protocols received, "
                                       "by transport: lane (direct TCP) or libp2p", labels=["transport"])
        for transport, traffic in peer.lanes.traffic.items():
            sent.add_metric([transport], traffic.sent)
            received.add_metric([transport], traffic.received)
        yield sent
        yield received
        yield from self._training(trainer)

    @staticmethod
    def _training(trainer: Trainer | None) -> Iterator[Metric]:
        optimizer = trainer.optimizer if trainer else None
        rounds = CounterMetricFamily("legion_rounds", "Rounds that ended, by outcome: averaged with others, alone "
                                     "(no other peer trains), failed (others train, nothing averaged)", labels=["outcome"])
        sent = CounterMetricFamily("legion_bytes_sent", "Bytes sent, by protocol", labels=["protocol"])
        received = CounterMetricFamily("legion_bytes_received", "Bytes received, by protocol", labels=["protocol"])
        stats = optimizer.stats if optimizer else None
        for outcome in ("averaged", "alone", "failed"):
            rounds.add_metric([outcome], getattr(stats, f"rounds_{outcome}") if stats else 0)
        sent.add_metric(["allreduce"], stats.bytes_sent if stats else 0)
        received.add_metric(["allreduce"], stats.bytes_received if stats else 0)
        sent.add_metric(["checkpoint"], trainer.checkpoints.upload_limit.total if trainer else 0)
        received.add_metric(["checkpoint"], trainer.checkpoints.download_limit.total if trainer else 0)
        yield from (rounds, sent, received)
        progress = trainer.progress if trainer else None
        if progress is None:
            return
        yield GaugeMetricFamily("legion_round", "The swarm round this peer is in", value=progress.round)
        yield CounterMetricFamily("legion_samples", "Training sequences this peer processed", value=progress.samples)
        yield GaugeMetricFamily("legion_tokens_per_second", "Training throughput over the last round",
                                value=progress.tokens_per_second)
        yield GaugeMetricFamily("legion_group_size", "Members of the last round's group (1: alone)",
                                value=progress.group_size)
        if progress.loss is not None:
            yield GaugeMetricFamily("legion_loss", "Training loss of the last step, nats per byte", value=progress.loss)
        if progress.val_loss is not None:
            yield GaugeMetricFamily("legion_validation_loss", "Validation loss of the last evaluation, nats per byte",
                                    value=progress.val_loss)
