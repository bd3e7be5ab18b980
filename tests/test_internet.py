"""Peers on separate hosts (network namespaces), not 127.0.0.1: what they advertise and whether
they train together."""

import json
import re
import time

import multiaddr
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from swarm.local import training_summary
from swarm.network import advertised_addrs, build_host
from swarm.reducer import FAILURES_TO_WARN

RUN = ["--model", "tiny", "--inner-steps", "5", "--batch-size", "8", "--rounds", "3"]
PEER = ["--threads", "1", "--heartbeat", "2", "--wait-peers", "3"]


def status_rows(lab, seed, expected: dict, seconds: float = 60) -> dict:
    """The peers' rows of ``status`` (run on the seed's host), by peer id, once each peer's
    reachability is as ``expected`` or after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        rows = {p["peer_id"]: p for p in lab.status("pub", seed.addrs[0])}
        if {p: r["reachability"] for p, r in rows.items()} == expected or time.monotonic() > deadline:
            return rows
        time.sleep(2)


def reachability_shown(lab, seed, expected: dict, seconds: float = 60) -> dict:
    """Each peer's reachability as ``status`` shows it (``status_rows``)."""
    return {p: r["reachability"] for p, r in status_rows(lab, seed, expected, seconds).items()}


def test_a_wildcard_is_advertised_as_the_interfaces_public_first_and_announced_addresses_lead():
    addrs = [str(a) for a in advertised_addrs([multiaddr.Multiaddr("/ip4/0.0.0.0/tcp/4001"),
                                                multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4002")],
                                               [multiaddr.Multiaddr("/ip4/203.0.113.7/tcp/4001")])]
    assert addrs[0] == "/ip4/203.0.113.7/tcp/4001" and addrs[-1] == "/ip4/127.0.0.1/tcp/4002"
    assert not any("0.0.0.0" in a for a in addrs)


def test_the_peerstore_hands_out_a_peers_public_address_before_another_networks_private_one():
    """py-libp2p dials one TCP address per peer, the first its peerstore holds: a home peer's LAN
    address, learnt before its router's forwarded one, hid the forward and every dial timed out."""
    host = build_host(create_new_key_pair())
    peer = create_new_key_pair().public_key
    peer_id = ID.from_pubkey(peer)
    learnt = ["/ip4/127.0.0.1/tcp/4001", "/ip4/192.168.77.10/tcp/4001", "/ip4/11.201.0.101/tcp/4001"]
    host.get_peerstore().add_addrs(peer_id, [multiaddr.Multiaddr(a) for a in learnt], 60)
    assert [str(a) for a in host.get_peerstore().addrs(peer_id)] == [learnt[2], learnt[0], learnt[1]]


def test_three_hosts_with_the_default_listen_address_train_together(lab, tmp_path):
    """Two of them meet only through addresses learnt from the DHT and Identify: a wildcard
    advertised as is (0.0.0.0) made every round fail between separate hosts."""
    for index, name in enumerate("abc", 1):
        lab.add_host(name, index)
    seed = lab.start_peer("a", ["--seed", *RUN, *PEER, "--out", str(tmp_path / "a")], tmp_path / "logs")
    assert seed.addrs and all("/ip4/10.201.0.1/tcp/" in a for a in seed.addrs), seed.addrs  # no 0.0.0.0, no 127.*
    peers = [lab.start_peer(name, ["--bootstrap", seed.addrs[0], *PEER, "--out", str(tmp_path / name)], tmp_path / "logs")
             for name in "bc"]
    assert all(f"/ip4/10.201.0.{i}/tcp/" in a for i, p in enumerate(peers, 2) for a in p.addrs)
    summaries = [training_summary(p, 240) for p in (seed, *peers)]
    for summary in summaries:
        assert summary["round"] == 3 and summary["rounds_averaged"] >= 2 and summary["bytes_sent"] > 0
    for name in "abc":
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert max(m.get("group_size", 0) for m in metrics if m["event"] == "round") == 3


def test_peers_behind_separate_nats_that_cannot_average_say_so_and_exit_non_zero(lab, tmp_path):
    """Two home peers behind NATs that forward nothing cannot reach each other (and the seed
    relays for nobody here): nobody may end with a quiet ``done``."""
    lab.add_host("pub", 1)
    lab.add_home("home1", 1)
    lab.add_home("home2", 2)
    seed = lab.start_peer("pub", ["--seed", "--no-relay-service", *RUN, *PEER, "--out", str(tmp_path / "pub")],
                          tmp_path / "logs")
    homes = [lab.start_peer(name, ["--bootstrap", seed.addrs[0], *PEER, "--out", str(tmp_path / name)], tmp_path / "logs")
             for name in ("home1", "home2")]
    # other peers' dial-backs tell each peer whether it can be dialled; status shows it
    expected = {seed.peer_ids[0]: "public", homes[0].peer_ids[0]: "private", homes[1].peer_ids[0]: "private"}
    assert reachability_shown(lab, seed, expected) == expected
    outcomes = []
    for process in (seed, *homes):
        lines = process.output_lines(300)
        done = [json.loads(line[5:]) for line in lines if line.startswith("done ")]
        outcomes.append((process.proc.returncode, done[0], process.log_path.read_text(errors="replace")))
    alone = [(code, summary, log) for code, summary, log in outcomes if not summary["rounds_averaged"]]
    assert alone, [summary for _, summary, _ in outcomes]
    for code, summary, log in alone:
        assert code == 3 and "trained alone" in log
        # said during the run too, once FAILURES_TO_WARN rounds in a row averaged nothing (counted
        # from the reducer's lines: a round whose state was then adopted is not in rounds_failed)
        failed = len(re.findall(r"swarm\.reducer: round \S+(?::| failed:) ", log))
        assert failed >= summary["rounds_failed"]
        assert ("averaged nothing with the swarm" in log) == (failed >= FAILURES_TO_WARN)
    for code, summary, _ in outcomes:
        assert code == (3 if not summary["rounds_averaged"] else 0)


@pytest.mark.slow  # 2-3 minutes
@pytest.mark.timeout(480)
def test_two_public_and_two_home_peers_all_average_in_groups_with_one_home_peer_each(lab, tmp_path):
    """Two home peers behind NATs cannot reach each other (no relay here), so a group holding both
    failed every round for all four peers. Declared reachability keeps them in different groups. (Not every
    round averages yet: peers whose views of the matchmaking key differ compute different splits.)"""
    lab.add_host("pub1", 1)
    lab.add_host("pub2", 2)
    lab.add_home("home1", 1)
    lab.add_home("home2", 2)
    run = ["--model", "tiny", "--inner-steps", "10", "--batch-size", "8", "--rounds", "6"]
    peer = ["--threads", "1", "--heartbeat", "2", "--wait-peers", "4"]
    seed = lab.start_peer("pub1", ["--seed", "--no-relay-service", *run, *peer, "--out", str(tmp_path / "pub1")],
                          tmp_path / "logs")
    others = {name: lab.start_peer(name, ["--bootstrap", seed.addrs[0], *peer, "--out", str(tmp_path / name)],
                                   tmp_path / "logs") for name in ("pub2", "home1", "home2")}
    homes = {others["home1"].peer_ids[0], others["home2"].peer_ids[0]}
    summaries = {name: training_summary(process, 400) for name, process in {"pub1": seed, **others}.items()}
    for name, summary in summaries.items():
        assert summary["rounds_averaged"] >= 1, (name, summary)
    for name in summaries:
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for event in events:
            if event["event"] == "reduced" and event["outcome"] == "averaged":
                assert len(homes & set(event["members"])) <= 1, event


@pytest.mark.parametrize("nat", [
    "port-preserving",
    pytest.param("port-random", marks=pytest.mark.slow),  # 1-3 minutes; the default run has the other
    pytest.param("carrier-grade", marks=pytest.mark.slow),  # home2 behind a home router and the carrier's NAT
])
def test_two_peers_behind_separate_nats_average_together(lab, tmp_path, nat):
    """The seed relays (Circuit Relay v2, on by default for seeds): each home peer finds it is
    private, reserves a slot and declares a circuit address, so the two reach each other through
    the seed and all three average in one group. Behind port-preserving NATs hole punching (DCUtR)
    then gives them a direct connection; behind port-random ones (a carrier-grade NAT is one) they
    stay relayed."""
    random_ports = nat == "port-random"
    lab.add_host("pub", 1)
    lab.add_home("home1", 1, random_ports)
    lab.add_home("home2", 2, random_ports, cgnat=nat == "carrier-grade")
    run = ["--model", "tiny", "--inner-steps", "10", "--batch-size", "8", "--rounds", "6"]
    seed = lab.start_peer("pub", ["--seed", *run, *PEER, "--out", str(tmp_path / "pub")], tmp_path / "logs")
    homes = {name: lab.start_peer(name, ["--bootstrap", seed.addrs[0], *PEER, "--out", str(tmp_path / name)],
                                  tmp_path / "logs") for name in ("home1", "home2")}
    expected = {seed.peer_ids[0]: "public", **{p.peer_ids[0]: "relayed" for p in homes.values()}}
    assert reachability_shown(lab, seed, expected) == expected
    summaries = {name: training_summary(process, 300) for name, process in {"pub": seed, **homes}.items()}
    both = {p.peer_ids[0] for p in homes.values()}
    for name, summary in summaries.items():
        assert summary["rounds_averaged"] >= 1, (name, summary)
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        together = [e for e in events if e["event"] == "reduced" and e["outcome"] == "averaged"
                    and both <= set(e["members"])]
        assert together, (name, summary)
    logs = [p.log_path.read_text(errors="replace") for p in homes.values()]
    assert all("reserved a relay slot" in log and "Traceback" not in log for log in logs)
    assert any("through a relay" in log for log in logs)
    assert any("(hole punched)" in log for log in logs) == (nat == "port-preserving")


def test_a_home_peer_behind_a_upnp_router_gets_its_ports_forwarded_and_can_be_dialled(upnp_lab, tmp_path):
    """home1's router runs miniupnpd: home1 has it forward its libp2p and lane ports, announces the
    router's address, and others' dial-backs find it public. home2's router forwards nothing and the
    seed relays for nobody, so home2 averages with home1 only because home1 can now be dialled."""
    lab = upnp_lab
    lab.add_host("pub", 1)
    router = lab.add_home("home1", 1, upnp=True)
    lab.add_home("home2", 2)
    run = ["--model", "tiny", "--inner-steps", "10", "--batch-size", "8", "--rounds", "4"]
    seed = lab.start_peer("pub", ["--seed", "--no-relay-service", *run, *PEER, "--out", str(tmp_path / "pub")],
                          tmp_path / "logs")
    homes = {name: lab.start_peer(name, ["--bootstrap", seed.addrs[0], *PEER, "--out", str(tmp_path / name)],
                                  tmp_path / "logs") for name in ("home1", "home2")}
    expected = {seed.peer_ids[0]: "public", homes["home1"].peer_ids[0]: "public", homes["home2"].peer_ids[0]: "private"}
    rows = status_rows(lab, seed, expected)
    assert {p: r["reachability"] for p, r in rows.items()} == expected
    assert any(a.startswith(f"/ip4/{router}/tcp/") for a in rows[homes["home1"].peer_ids[0]]["addrs"]), rows
    summaries = {name: training_summary(process, 300) for name, process in {"pub": seed, **homes}.items()}
    everyone = {seed.peer_ids[0], *(p.peer_ids[0] for p in homes.values())}
    for name, summary in summaries.items():
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert any(e["event"] == "reduced" and e["outcome"] == "averaged" and set(e["members"]) == everyone
                   for e in events), (name, summary)
    log = homes["home1"].log_path.read_text(errors="replace")
    assert f"UPnP: router {router} forwards ports" in log and "Traceback" not in log
    assert "no router offers port forwarding" in homes["home2"].log_path.read_text(errors="replace")


@pytest.mark.slow  # 26 s; the UPnP test above covers the forward-and-announce path, test_port_mapping NAT-PMP's answers
def test_a_home_peer_behind_a_nat_pmp_router_gets_its_ports_forwarded_and_can_be_dialled(upnp_lab, tmp_path):
    """home1's router speaks NAT-PMP only (miniupnpd with UPnP off, as on Apple routers): home1
    finds no UPnP router, asks its default gateway over NAT-PMP, announces the router's address,
    and others' dial-backs find it public; home2's router forwards nothing."""
    lab = upnp_lab
    lab.add_host("pub", 1)
    router = lab.add_home("home1", 1, natpmp=True)
    lab.add_home("home2", 2)
    seed = lab.start_peer("pub", ["--seed", "--no-relay-service", "--heartbeat", "2"], tmp_path / "logs")
    homes = {name: lab.start_peer(name, ["--bootstrap", seed.addrs[0], "--heartbeat", "2"], tmp_path / "logs")
             for name in ("home1", "home2")}
    expected = {seed.peer_ids[0]: "public", homes["home1"].peer_ids[0]: "public", homes["home2"].peer_ids[0]: "private"}
    rows = status_rows(lab, seed, expected)
    assert {p: r["reachability"] for p, r in rows.items()} == expected
    assert any(a.startswith(f"/ip4/{router}/tcp/") for a in rows[homes["home1"].peer_ids[0]]["addrs"]), rows
    log = homes["home1"].log_path.read_text(errors="replace")
    assert "UPnP: no router" in log and f"NAT-PMP: router {router} forwards ports" in log, log
    assert "Traceback" not in log


@pytest.mark.slow  # ~2 minutes
@pytest.mark.timeout(480)
def test_a_home_peer_joining_late_catches_up_through_the_relay_and_averages(lab, tmp_path):
    """A peer behind NAT that joins a run two rounds in fetches the state through the seed's relay,
    joins the swarm's next round at once (fetching that round's state while it averages: fetched
    first, it came after the group had formed, round after round) and averages the rest, ending
    with the weights the others hold."""
    lab.add_host("pub", 1)
    lab.add_home("home1", 1)
    lab.add_home("home2", 2)
    run = ["--model", "tiny", "--inner-steps", "60", "--batch-size", "8", "--rounds", "10"]  # rounds of ~5 s
    peer = ["--threads", "1", "--heartbeat", "2"]
    seed = lab.start_peer("pub", ["--seed", *run, *peer, "--wait-peers", "2", "--out", str(tmp_path / "pub")],
                          tmp_path / "logs")
    early = lab.start_peer("home1", ["--bootstrap", seed.addrs[0], *peer, "--wait-peers", "2",
                                     "--out", str(tmp_path / "home1")], tmp_path / "logs")
    metrics = tmp_path / "pub" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"key": "diloco-1", "outcome": "averaged"' in metrics.read_text()):
        assert time.monotonic() < deadline, "the first two peers averaged no second round"
        time.sleep(1)
    late = lab.start_peer("home2", ["--bootstrap", seed.addrs[0], *peer, "--out", str(tmp_path / "home2")],
                          tmp_path / "logs")
    summaries = {name: training_summary(process, 360) for name, process in
                 {"pub": seed, "home1": early, "home2": late}.items()}
    events = [json.loads(line) for line in (tmp_path / "home2" / "metrics.jsonl").read_text().splitlines()]
    joined = [e for e in events if e["event"] == "state" and e["source"] == "swarm"]
    assert joined and joined[0]["round"] >= 2, joined  # it caught up: it did not start from round 0
    averaged = [e for e in events if e["event"] == "reduced" and e["outcome"] == "averaged"]
    assert len(averaged) >= 3 and all(seed.peer_ids[0] in e["members"] for e in averaged), summaries["home2"]
    finals = {}  # each peer's last swarm weights: from its last round, or adopted at the end
    for name in summaries:
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event["event"] in ("applied", "adopted"):
                finals[name] = event["digest"]
    assert len(finals) == 3 and len(set(finals.values())) == 1, finals


@pytest.mark.slow  # ~1 minute
@pytest.mark.timeout(480)
def test_sharded_rounds_in_groups_across_nats_reduce_every_shard_across_the_groups(lab, tmp_path):
    """Four peers in groups of two, two of them behind separate NATs (the seed relays; declared
    reachability puts one home peer in each group): a sharded run's two-level rounds reduce each
    shard's mean across both groups, home peers reducing theirs with each other through the relay
    or a punched hole, and every peer steps every round to the same weights."""
    lab.add_host("pub1", 1)
    lab.add_host("pub2", 2)
    lab.add_home("home1", 1)
    lab.add_home("home2", 2)
    run = ["--model", "tiny", "--inner-steps", "10", "--batch-size", "8", "--rounds", "5", "--sharded",
           "--group-size", "2"]
    peer = ["--threads", "1", "--heartbeat", "2", "--wait-peers", "4"]
    seed = lab.start_peer("pub1", ["--seed", *run, *peer, "--out", str(tmp_path / "pub1")], tmp_path / "logs")
    others = {name: lab.start_peer(name, ["--bootstrap", seed.addrs[0], *peer, "--out", str(tmp_path / name)],
                                   tmp_path / "logs") for name in ("pub2", "home1", "home2")}
    processes = {"pub1": seed, **others}
    summaries = {name: training_summary(process, 400) for name, process in processes.items()}
    digests: dict[int, set] = {}  # round -> the swarm weights' digests after it, all peers together
    for name, summary in summaries.items():
        assert summary["rounds_averaged"] >= 3, (name, summary)
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines():
            event = json.loads(line)
            if event["event"] == "applied" and event["members"]:
                digests.setdefault(event["round"], set()).add(event["digest"])
    assert len(digests) >= 3 and all(len(d) == 1 for d in digests.values()), digests
    logs = {name: p.log_path.read_text(errors="replace") for name, p in processes.items()}
    for name, log in logs.items():
        assert "Traceback" not in log and "reduced in this group only" not in log, name
        assert re.search(r"cell \d+ reduced across 2 groups", log), name
    assert "reduced across 2 groups" in logs["home1"] and "reduced across 2 groups" in logs["home2"]
