"""A custom swarm from Legion's parts: your own model, data and training loop, averaged with DiLoCo.

Start a first peer, then as many others as you like (other terminals or machines):

    python examples/custom_swarm.py --seed --peers 2
    python examples/custom_swarm.py --bootstrap /ip4/127.0.0.1/tcp/PORT/p2p/PEER_ID --peers 2

Each peer fits the same linear regression on its own private samples; every 20 local steps the
peers average their pseudo-gradients (int8, error feedback) and take an outer Nesterov step.
"""

import argparse
import logging

import torch
import trio

from averaging.averager import Averager
from optim.diloco import DiLoCo
from swarm.members import live_members
from swarm.peer import Peer, PeerConfig
from swarm.reducer import SwarmReducer

TRUE_WEIGHTS = torch.arange(1.0, 11.0)


def training_loop(model: torch.nn.Module, optimizer: DiLoCo, steps: int, seed: int) -> None:
    """An ordinary torch loop; it runs in a worker thread, the network stays on the trio side."""
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.randn(32, 10, generator=generator)
        y = x @ TRUE_WEIGHTS + 0.1 * torch.randn(32, generator=generator)
        loss = torch.nn.functional.mse_loss(model(x).squeeze(-1), y)
        loss.backward()
        if optimizer.step(samples=len(x)):
            print(f"round {optimizer.round}: loss {loss.item():.4f}, group of {optimizer.stats.last_group_size}")
        optimizer.zero_grad()
    optimizer.finish()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", action="store_true")
    parser.add_argument("--bootstrap", action="append", default=[])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--peers", type=int, default=2, help="start training once this many peers are up")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # it logs routine stream resets as warnings

    peer = Peer(PeerConfig(seed=args.seed, bootstrap=args.bootstrap, swarm="regression", heartbeat=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(peer.run)
        print("listening on", peer.addrs[-1])
        members = [1]

        async def count_members() -> None:  # how many peers a round should wait for
            while True:
                members[0] = max(1, (await live_members(peer.dht, "regression")).estimate)
                await trio.sleep(2)

        nursery.start_soon(count_members)
        while members[0] < args.peers:
            await trio.sleep(0.5)
        torch.manual_seed(0)  # every peer starts from the same weights
        model = torch.nn.Linear(10, 1)
        reducer = SwarmReducer(Averager(peer, matchmaking_budget=5), "regression-v1", lambda: members[0])
        optimizer = DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=0.05), reducer,
                           inner_steps=20, codec="int8", nursery=nursery)
        await trio.to_thread.run_sync(training_loop, model, optimizer, args.steps, hash(str(peer.peer_id)) % 2**31)
        print("learned weights:", [round(w, 2) for w in model.weight.detach().reshape(-1).tolist()])
        peer.stop()
        await peer.stopped.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
