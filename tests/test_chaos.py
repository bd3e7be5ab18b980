"""A training swarm under faults of every kind, on hosts in network namespaces, with the chaos
controller's oracles (``bench/chaos.py``): group members hold bit-identical weights after every
round, no peer prints a traceback or hangs, restarted peers rejoin, survivors end alike."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
import chaos  # noqa: E402

needs_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="network namespaces need root, iproute2 and iptables (CI runs as root; .ci/run installs them)")


def _check(result: dict, rounds: int) -> None:
    assert result["violations"] == [], result
    assert result["tracebacks"] == [] and result["hung"] == [], result
    assert result["identical_after_every_round"] and result["groups_checked"] > rounds, result
    assert result["survivors_same_weights"], result
    assert result["rounds_completed"] == rounds and result["survivors"] >= 3, result
    assert result["not_rejoined"] == 0, result
    assert result["val_loss"] < 4.0, result  # it learned (5.37 at the start)


@needs_namespaces
@pytest.mark.timeout(360)  # 82-125 s until 2026-12-05; 125-157 s and once over 180 s since peers that
#                            lose sight of the others wait for them (swarm.reducer), on a loaded machine;
#                            114-122 s here with shorter deadlines (2026-12-07)
def test_a_swarm_survives_one_fault_of_every_kind(tmp_path):
    kinds = [*chaos.KINDS, "partition"]
    # The seven faults, each waiting for the last to heal, must fit before the peers finish: with
    # 16 rounds of 5 steps 6 of 7 once did (in CI), and with 20 only 4 once DHT streams were kept
    # open (2026-12-06: 20 rounds in 52 s); 30 rounds of 10 steps once ran in 50 s, before all
    # of its faults were applied (2026-12-06 evening), so rounds are 20 steps. Each fault costs the
    # swarm a round deadline or two, so the deadlines are short: a 6 s round, a 7 s stop, 4 s cuts
    rounds = 24
    args = chaos.parser().parse_args([
        "--peers", "4", "--rounds", str(rounds), "--churn", str(len(kinds) * 10 / (4 * rounds)), "--partition",
        "--inner-steps", "20", "--round-timeout", "6", "--stop-seconds", "7", "--network-seconds", "4",
        "--watchdog", "60", "--timeout", "600", "--seed", "1"])
    result = chaos.run(args, tmp_path, faults=True)
    assert result["fault_kinds"] == {kind: 1 for kind in kinds}, result
    _check(result, rounds)


@needs_namespaces
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_half_hour_soak_with_churn_and_partitions(tmp_path):
    args = chaos.parser().parse_args([
        "--peers", "6", "--rounds", "200", "--churn", "0.3", "--partition", "--aim", "averaging",
        "--inner-steps", "10", "--round-timeout", "10", "--stop-seconds", "12", "--network-seconds", "8",
        "--watchdog", "300", "--timeout", "3300", "--seed", "7"])
    result = chaos.run(args, tmp_path, faults=True)
    _check(result, 200)
    assert result["faults"] >= 30, result


def test_the_contributor_oracle_compares_members_of_one_group_not_of_one_round():
    """A peer may average a round in two groups (it adopted the swarm's state while its first
    group still averaged): only members of the same group must name the same contributors."""
    oracles = chaos.Oracles()

    def report(peer: str, group: str, members: list[str]) -> None:
        oracles.reduced(peer, {"key": "diloco-132", "outcome": "averaged", "group": group, "members": members},
                        now=1.0)

    report("a", "g1", ["a", "b"])
    report("b", "g1", ["a", "b"])
    report("a", "g2", ["a", "b", "c", "d"])
    report("b", "g2", ["a", "b", "c", "d"])
    assert oracles.violations == []
    report("c", "g2", ["a", "c", "d"])  # a member of g2 averaged without b's contribution
    assert len(oracles.violations) == 1 and oracles.violations[0].startswith("round 132")
