"""What a node last told each reader of each key (``dht.records.read_answer``), so that the
reader's next read of the key names only the answer's token, and the node answers with what it
dropped and gained since, not with every entry named again."""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

TOLD_READS = 4096  # (reader, key) pairs remembered, all readers together
# their digests together, each pair's counted (4 MiB; pairs told the same entries of a key share
# them: a cell's key at 10,000 peers holds 625 entries, each read by its 625 owners)
TOLD_DIGESTS = 1 << 19
TOLD_READS_PER_READER = 64  # pairs one reader can make this node remember


class ToldReaders:
    """The token and entry digests of this node's last answer to each reader about each key,
    the least recently used forgotten first beyond the caps (that reader's next read is then
    answered against the entries it names, as a first one is)."""

    def __init__(self, max_reads: int = TOLD_READS, max_digests: int = TOLD_DIGESTS,
                 per_reader: int = TOLD_READS_PER_READER) -> None:
        self.max_reads, self.max_digests, self.per_reader = max_reads, max_digests, per_reader
        self._told: OrderedDict[tuple[Hashable, bytes], tuple[bytes, frozenset[bytes]]] = OrderedDict()
        self._per_reader: dict[Hashable, int] = {}
        self._digests = 0
        self._last: dict[bytes, frozenset[bytes]] = {}  # key -> the digests last remembered for it (shared)

    def __len__(self) -> int:
        return len(self._told)

    def since(self, reader: Hashable, key: bytes, token: bytes) -> frozenset[bytes] | None:
        """The digests told ``reader`` of ``key`` with ``token``; None if that is not remembered."""
        told = self._told.get((reader, key))
        if told is None or told[0] != token:
            return None
        self._told.move_to_end((reader, key))
        return told[1]

    def remember(self, reader: Hashable, key: bytes, token: bytes, digests: frozenset[bytes]) -> None:
        self._forget((reader, key))
        if len(digests) > self.max_digests:
            return
        if self._per_reader.get(reader, 0) >= self.per_reader:
            self._forget(next(pair for pair in self._told if pair[0] == reader))
        last = self._last.get(key)
        if last == digests:
            digests = last
        self._last[key] = digests
        if len(self._last) > self.max_reads:  # (keys no pair holds any more forgotten)
            self._last = {k: d for (_, k), (_, d) in self._told.items()}
            self._last[key] = digests
        self._told[(reader, key)] = (token, digests)
        self._per_reader[reader] = self._per_reader.get(reader, 0) + 1
        self._digests += len(digests)
        while len(self._told) > self.max_reads or self._digests > self.max_digests:
            self._forget(next(iter(self._told)))

    def _forget(self, pair: tuple[Hashable, bytes]) -> None:
        told = self._told.pop(pair, None)
        if told is None:
            return
        self._digests -= len(told[1])
        left = self._per_reader[pair[0]] - 1
        if left:
            self._per_reader[pair[0]] = left
        else:
            del self._per_reader[pair[0]]
