"""Which weights the peers of a run settle on, when it ends and while it runs.

Peers whose last rounds averaged in different groups, or failed, end a run with different weights.
Each finished peer publishes a digest of its final weights on the run board; once the others have
finished too (or a deadline passed), every peer picks the same digest from what it sees and the
peers that hold another fetch the chosen weights.

While it runs, peers can part into lineages that each average successfully (peers that missed a
round and averaged among themselves from then on), and a successful round never makes a peer
refetch. So each training peer publishes the digest of the weights it holds at its round, and the
peers of the smaller lineage take the weights the others hold (``outnumbering``).
"""

from __future__ import annotations

from collections import Counter


def agreed_digest(own: str, others: dict[str, str]) -> str:
    """The final weights' digest to keep: the one most peers hold, this peer included, ties going
    to the smaller digest, so peers that see the same digests choose alike. ``others`` maps
    other peers to their digests. Another digest than ``own`` needs the word of two other peers
    (of one, when only one other peer finished): a single peer cannot make the others adopt
    weights it made up."""
    votes = Counter(others.values())
    witnesses = min(2, len(others))
    held = Counter({digest: count for digest, count in votes.items() if count >= witnesses})
    held[own] = votes[own] + 1
    return _most_held(held)


def outnumbering(own: dict[int, str], others: dict[str, tuple[int, str]], me: str) -> list[str]:
    """The other peers holding other weights than this peer, where they are at least two and more
    than the peers holding this peer's (itself, ``me``, included), else none. ``own``: this peer's
    weights' digests at its last rounds; ``others``: each other peer's latest (round, digest);
    those at other rounds than ``own``'s are not compared. Each peer counts once, at its latest
    entry: the board shows the others spread over two rounds or more, and a count at one round
    was a sample that at times showed a lineage that had just moved (its old entries)
    outnumbering the one it had moved to. In a tie with one other lineage, the lineage holding
    the smallest peer id stays and the other moves: both sides choose alike whatever the rounds
    they compare at (digests, unlike at the end of a run, ``agreed_digest``, differ round to
    round). Without it, two pairs that a healed partition left apart averaged in pairs to the
    end of the run (``bench/chaos.py --kinds partition``)."""
    compared = {peer: own[round_] == digest for peer, (round_, digest) in others.items() if round_ in own}
    apart = sorted(peer for peer, alike in compared.items() if not alike)
    holding_own = [me, *(peer for peer, alike in compared.items() if alike)]
    if len(apart) < 2 or len(apart) < len(holding_own):
        return []
    if len(apart) > len(holding_own):
        return apart
    one_lineage = len({others[peer] for peer in apart}) == len({others[peer][0] for peer in apart})
    return apart if one_lineage and min(apart) < min(holding_own) else []


def settled_digest(others: dict[str, str]) -> str | None:
    """The final weights a peer starting after the run ended takes: the digest most of ``others``
    hold among those at least two of them hold (ties to the smaller, as ``agreed_digest``), or
    None. One peer's word is never enough: it would hand every latecomer weights it made up."""
    held = Counter({digest: count for digest, count in Counter(others.values()).items() if count >= 2})
    return _most_held(held) if held else None


def _most_held(held: Counter) -> str:
    return min(held, key=lambda digest: (-held[digest], digest))
