"""What each of the DHT upkeep changes of 2026-12-05 and 2026-12-06 is worth: the scale simulator's
DHT load (``dht_load.simulate``, protocol ``buckets``) with today's code, then with one change undone
at a time.

    python bench/dht_ablation.py [--peers 1000] [--undo answers refresh ...] [--json]

Changes (``--undo`` names): ``answers`` (nodes list closer peers with their signed records, as
py-libp2p does; with a stream per message, as before 2026-12-06), ``refresh`` (entries refreshed,
and the board read, every heartbeat once split), ``replicas`` (short-lived entries to 8 replicas),
``lookup`` (a key's closest nodes kept 30 s), ``probes`` (the keys a level up and down read, not
probed), ``adopt`` (member and holdings levels followed by their own reads), ``names`` (board
entries with their field names); of 2026-12-06: ``streams`` (a new stream for every message),
``lookup10`` (a key's closest nodes kept 5 minutes, not 10), ``delta`` (a reread brings the whole
bundle again, not only the entries its reader lacks); of 2026-12-07: ``rotation`` (a round's
buckets drawn by the round, its keys held at their own nodes, looked up anew every round),
``tokens`` (a reread names every entry its reader holds, not the replica's last token).
``cells`` is no change: it leaves the second
level of two-level rounds uncounted, as the simulator did until 2026-12-07. Each is undone by replacing a constant
or function for the run, then restored. Message bytes are the figures of
``bench/dht_request_cost.py`` on 2026-12-06, before answers were compacted (not measured again here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parent))

import dht.buckets as buckets  # noqa: E402
import dht_load  # noqa: E402
from dht.records import merge  # noqa: E402

# kept streams, as first measured on 2026-12-06, before answers were compacted (578-2,250 B since):
# the figures of docs/benchmarks.md's ablation
LEAN = dht_load.MessageBytes(read=899, write=1022, find_node=2530, stream=2126, kept_seconds=60)
NEW_STREAMS = dht_load.MessageBytes(read=3003, write=3157, find_node=4703)  # a stream per message, lean answers
PY_LIBP2P = dht_load.MessageBytes(read=8821, write=3156, find_node=8857)
CHANGES = ("answers", "refresh", "replicas", "lookup", "probes", "adopt", "names", "streams", "lookup10", "delta", "rotation", "tokens", "cells")


async def _bucket_read_without_probes(dht, key, me, level, read):
    """``dht.buckets._bucket_at`` before 2026-12-05: the keys a level up and down read, not probed."""
    read.update(await buckets._read_keys(dht, key, me, list(range(max(0, level - 1), level + 1)), known=read))
    if level > 0 or sum(map(len, read.values())) >= buckets.BUCKET_ENTRIES:
        read.update(await buckets._read_keys(dht, key, me, [level + 1], both_halves=True, known=read))
    return merge(*(entries.values() for entries in read.values()))


def _named_board_entry() -> dict:
    value = dht_load._board_value(with_config=True, with_group=False)
    del value["config"]
    return value


UNDO = {  # change -> (module or class, attribute, value before the change)
    "refresh": [(buckets, "SPLIT_REFRESH_BEATS", 1), (dht_load, "SPLIT_REFRESH_BEATS", 1)],
    "replicas": [(dht_load, "SHORT_LIVED_REPLICAS", 8)],
    "lookup": [(dht_load, "LOOKUP_SECONDS", 30.0)],
    "lookup10": [(dht_load, "LOOKUP_SECONDS", 300.0)],
    "probes": [(buckets, "_bucket_at", _bucket_read_without_probes)],
    "adopt": [(buckets.BucketPlace, "adopt", lambda self, level: None)],
    "names": [(dht_load, "VALUES", {**dht_load.VALUES, "board": _named_board_entry})],
    "delta": [(dht_load, "DELTA_READS", False)],
    "rotation": [(dht_load, "ROTATION", False)],
    "tokens": [(dht_load, "TOKEN_READS", False)],
    "cells": [(dht_load, "CELL_LEVEL", False)],  # (not a change: the second level left uncounted, as until 2026-12-07)
}


def simulate_without(change: str | None, peers: int, costs: dht_load.Costs, beats: int) -> dict:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in UNDO.get(change, [])]
    for owner, name, value in UNDO.get(change, []):
        setattr(owner, name, value)
    try:
        legion = {"answers": PY_LIBP2P, "streams": NEW_STREAMS}.get(change, LEAN)
        messages = {"py-libp2p": PY_LIBP2P, "legion": legion}
        result = dht_load.simulate("buckets", peers, 0.2, costs, messages, beats, seed=0)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    figures = ("peer_background_kbps", "peer_matchmaking_kbps", "peer_cells_kbps", "peer_requests_per_second",
               "busiest_node_mbps", "busiest_node_cpu")
    return {"undone": change or "nothing", **{figure: result[figure] for figure in figures}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--undo", nargs="*", choices=CHANGES, default=list(CHANGES))
    parser.add_argument("--beats", type=int, default=12)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    costs = dht_load.calibrate()
    results = [simulate_without(change, args.peers, costs, args.beats) for change in [None, *args.undo]]
    print(json.dumps(results) if args.json else "\n".join(map(str, results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
