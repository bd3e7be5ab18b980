"""Which final weights the peers of a run settle on when it ends.

Peers whose last rounds averaged in different groups, or failed, end a run with different weights.
Each finished peer publishes a digest of its final weights on the run board; once the others have
finished too (or a deadline passed), every peer picks the same digest from what it sees and the
peers that hold another fetch the chosen weights.
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
    return min(held, key=lambda digest: (-held[digest], digest))
