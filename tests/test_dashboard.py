"""The live dashboard in a real headless browser and Prometheus ``/metrics``, against a real
3-peer training swarm (one process per peer; the seed serves both), and the hostile-input side
of the view the dashboard shows."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from swarm.local import PeerProcessError, peer_command, start_process, start_training_swarm
from swarm.run_board import run_configs_key, run_key
from swarm.swarm_view import SwarmView
from swarm.web import AddressError, parse_address
from tests.peer_helpers import start_peers

ARTIFACTS = Path(os.environ.get("LEGION_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _url(process, kind: str) -> str:
    return next(line.split()[1] for line in process.pending_lines if line.startswith(f"{kind} "))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """3 peers training 40 rounds; the seed serves the dashboard and metrics on free ports."""
    out = tmp_path_factory.mktemp("dashboard-swarm")
    processes = start_training_swarm(3, ["--model", "tiny", "--rounds", "40", "--inner-steps", "10"], out,
                                     seed_extra=["--dashboard", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
    yield processes
    for process in processes:
        process.kill()


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(_get(url).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_count_rounds_and_bytes_as_the_swarm_trains(swarm):
    url = _url(swarm[0], "metrics")
    first = _scrape(url)
    assert first[("legion_peer_info", (("peer_id", swarm[0].peer_ids[0]), ("role", "seed"),
                                       ("version", first_version(first))))] == 1
    averaged = ("legion_rounds_total", (("outcome", "averaged"),))
    lane_sent = ("legion_transport_bytes_sent_total", (("transport", "lane"),))
    exchanges = ("legion_allreduce_phase_seconds_count", (("phase", "exchange"),))
    deadline = time.monotonic() + 120
    while True:
        later = _scrape(url)
        if later.get(averaged, 0) >= first.get(averaged, 0) + 2:
            break
        assert time.monotonic() < deadline, f"no 2 more averaged rounds in 120 s: {later.get(averaged)}"
        time.sleep(2)
    assert later[lane_sent] > first.get(lane_sent, 0)
    assert later[("legion_bytes_sent_total", (("protocol", "allreduce"),))] > 0
    assert later[exchanges] >= later[averaged] - 1  # every averaged round's exchange is timed (one may be in flight)
    assert later[("legion_dht_request_seconds_count", ())] > 0
    assert later[("legion_connected_peers", ())] >= 2
    assert later[("legion_group_size", ())] == 3
    assert math.isfinite(later[("legion_loss", ())])
    assert later[("legion_samples_total", ())] > first.get(("legion_samples_total", ()), 0)


def first_version(samples: dict) -> str:
    return next(dict(labels)["version"] for name, labels in samples if name == "legion_peer_info")


def test_dashboard_page_lists_peers_and_its_loss_chart_grows_without_reload(swarm):
    if BROWSER is None:
        if os.environ.get("LEGION_REQUIRE_BROWSER"):
            pytest.fail("no chromium on this machine (.ci/run installs Debian's chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    url = _url(swarm[0], "dashboard")
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=BROWSER, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#peers tbody tr').length === 3", timeout=60_000)
            listed = page.eval_on_selector_all("#peers tbody tr", "rows => rows.map(r => r.dataset.peerId)")
            assert sorted(listed) == sorted(p.peer_ids[0] for p in swarm)
            page.wait_for_function("Number(document.getElementById('loss-chart').dataset.points) >= 1", timeout=90_000)
            points = int(page.get_attribute("#loss-chart", "data-points"))
            page.evaluate("window.stillThisPage = true")  # gone if the page reloads
            page.wait_for_function(f"Number(document.getElementById('loss-chart').dataset.points) > {points}",
                                   timeout=90_000)
            assert page.evaluate("window.stillThisPage") is True
            assert page.locator("#loss-chart polyline").count() >= 1
            assert "live" in page.text_content("#connection")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            browser.close()
    assert not errors, errors
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def test_dashboard_command_serves_the_swarm_from_any_peer(swarm, tmp_path):
    """``legion-peer dashboard`` joins through a non-seed peer as a DHT client and shows all three."""
    process = start_process(peer_command("dashboard", "--bootstrap", swarm[1].addrs[0], "--listen", "127.0.0.1:0"),
                            re.compile(r"^dashboard http://"), log_dir=tmp_path)
    try:
        url = process.ready_lines[0].split()[1]
        deadline = time.monotonic() + 60
        while True:
            snapshot = json.loads(_get(url + "api/swarm"))
            if len(snapshot["peers"]) == 3 and snapshot["runs"] and snapshot["runs"][0]["curve"]:
                break
            assert time.monotonic() < deadline, snapshot
            time.sleep(1)
        assert {p["peer_id"] for p in snapshot["peers"]} == {p.peer_ids[0] for p in swarm}
        assert snapshot["runs"][0]["config"]["model"] == "tiny"
        assert b"<title>Legion swarm</title>" in _get(url)
        assert b"EventSource" in _get(url + "static/dashboard.js")
    finally:
        assert process.terminate() == 0


def test_a_dashboard_address_that_cannot_work_is_a_clear_error(tmp_path):
    for bad in ("8080", "host:", "127.0.0.1:99999", ":80"):
        with pytest.raises(AddressError):
            parse_address(bad)
    assert parse_address("[::1]:0") == ("::1", 0)
    with pytest.raises(PeerProcessError, match="exited with 2"):
        start_process(peer_command("--seed", "--no-train", "--dashboard", "localhost"),
                      re.compile(r"^seed "), log_dir=tmp_path, timeout=30)


async def test_the_view_turns_hostile_board_entries_into_json_a_browser_can_parse():
    """A peer publishes NaN and infinite losses, bytes in its run configuration and a huge group:
    the snapshot stays valid JSON (no NaN), its configuration is dropped, its group is bounded."""
    async with trio.open_nursery() as nursery:
        seed, liar = await start_peers(nursery, 2)
        value = {"run_id": "r1", "protocol": 1, "config": {"model": b"\xff" * 10}, "round": 3, "loss": math.nan,
                 "val_loss": math.inf, "tokens_per_second": -math.inf, "training": True,
                 "group_key": "diloco-3", "group": ["x" * 60] * 64}
        await liar.dht.store(run_key("default"), value, 30)
        await liar.dht.store(run_configs_key("default"), {"model": b"\xff" * 10}, 30)
        view = SwarmView(seed.dht, "default")
        await view.refresh()
        text = json.dumps(view.snapshot, allow_nan=False)
        run = view.snapshot["runs"][0]
        assert run["config"] == {} and run["curve"] == [] and run["tokens_per_second"] == 0.0
        assert len(view.snapshot["groups"]) == 1 and len(text) < 100_000
        value["group"] = ["x"] * 65  # longer than any group: the entry is dropped, the view goes on
        await liar.dht.store(run_key("default"), value, 30)
        await view.refresh()
        assert view.snapshot["runs"] == [] and view.version == 2
        nursery.cancel_scope.cancel()
