"""Signed, expiring, msgpack records with per-writer subkeys on py-libp2p's Kademlia DHT.

Depends on nothing else in Legion.
"""

from dht.records import NAMESPACE, Entry, RecordError
from dht.node import RecordDHT

__all__ = ["NAMESPACE", "Entry", "RecordError", "RecordDHT"]
