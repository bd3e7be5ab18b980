"""Choosing the run to join from the run board."""

import pytest

from swarm.run_board import Progress, choose_run
from swarm.run_config import PROTOCOL as RUN_PROTOCOL, RunConfig, RunConfigError


def test_a_joiner_picks_the_run_most_peers_train_and_explains_an_incompatible_swarm():
    a, b = RunConfig(model="tiny").validate(), RunConfig(model="mini").validate()
    board = [Progress(a.run_id, RUN_PROTOCOL, a.to_dict(), peer_id="p1"),
             Progress(b.run_id, RUN_PROTOCOL, b.to_dict(), peer_id="p2"),
             Progress(b.run_id, RUN_PROTOCOL, b.to_dict(), peer_id="p3")]
    assert choose_run(board) == b
    with pytest.raises(RunConfigError, match="cannot join"):
        choose_run([Progress("x", RUN_PROTOCOL + 1, {}, peer_id="p9")])
    with pytest.raises(RunConfigError, match="no peer of this swarm publishes"):
        choose_run([])
    forged = Progress("0" * 16, RUN_PROTOCOL, a.to_dict(), peer_id="p4")
    with pytest.raises(RunConfigError, match="does not match its id"):
        choose_run([forged])
    with pytest.raises(ValueError):
        Progress.from_value("p5", {"run_id": 1, "protocol": 1, "config": {}, "bogus": True})
