"""A peer gone mid-run (killed: its connections closed, its board entry left to expire) stops being
expected in the others' rounds as soon as a board read misses it, not once their memory of it ends."""

import json
import math
import threading

import trio

from optim.base import weights_digest
from peer_helpers import start_peers
from swarm.run_config import RunConfig
from swarm.trainer import Trainer
from test_final_weights import hold_round, metrics


async def test_a_killed_peer_is_no_longer_expected_once_a_board_read_misses_it(tmp_path, spawn):
    """Fault injected at a chosen point: of three peers, one (a process of its own) is killed with
    ``kill -9`` once it has applied round 1, while the other two are held at round 1. Once each
    survivor's board read misses it, its round expects 2 peers, though its board still remembers
    the third (``BOARD_MEMORY_TTLS``). Before, it expected 3 until its memory let the third go: a
    round's leader waited out its matchmaking budget for the dead peer while followers gave up on
    it (two rounds of 10 s after each kill in ``bench/chaos.py``)."""
    config = RunConfig(model="tiny", inner_steps=5, batch_size=8, rounds=4, round_timeout=10)
    survivors_go = threading.Event()
    summaries: list[dict] = [{}, {}]
    async with trio.open_nursery() as nursery:
        peers = await start_peers(nursery, 2)
        survivors = [Trainer(peer, config, out=tmp_path / f"peer{i}", wait_peers=3) for i, peer in enumerate(peers)]
        for trainer in survivors:
            hold_round(trainer, 1, survivors_go)

        async def survive(index: int) -> None:
            summaries[index] = await survivors[index].run()

        async with trio.open_nursery() as training:
            for index in range(2):
                training.start_soon(survive, index)
            doomed = await trio.to_thread.run_sync(lambda: spawn(
                ["--bootstrap", str(peers[0].addrs[0]), "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1",
                 "--out", str(tmp_path / "doomed"), "--wait-peers", "3"], train=True))
            with trio.fail_after(90):
                while not any(r["event"] == "applied" and r["round"] == 1 for r in _metrics(tmp_path / "doomed")):
                    await trio.sleep(0.05)
            doomed.kill()
            gone = doomed.peer_ids[0]
            with trio.fail_after(30):
                for trainer in survivors:  # until a board read answered without it
                    while trainer._board_read_at <= trainer._board_seen.get(gone, (-math.inf,))[0]:
                        await trio.sleep(0.05)
            remembered = [gone in {p.peer_id for p in trainer._others_training()} for trainer in survivors]
            expected = [trainer._expected_peers() for trainer in survivors]
            survivors_go.set()
        nursery.cancel_scope.cancel()
    assert remembered == [True, True]  # the board's memory still holds it: counted before the change
    assert expected == [2, 2]
    after = [[r for r in metrics(tmp_path / f"peer{i}") if r["event"] == "reduced" and r["key"] >= "diloco-2"]
             for i in range(2)]
    assert all(len(rounds) == 2 and all(len(r.get("members", [])) == 2 for r in rounds) for rounds in after), after
    assert all(s["round"] == 4 for s in summaries), summaries
    assert len({weights_digest(t.optimizer.global_weights) for t in survivors}) == 1


def _metrics(out) -> list[dict]:
    """``out``'s metrics lines so far (none before the file is there; a line being written left out)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]
