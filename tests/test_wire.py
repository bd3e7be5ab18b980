"""Connections to peers that stop reading: aborting one frees whoever is blocked writing to it."""

import contextlib
import random

import trio
from libp2p.custom_types import TProtocol

from averaging.wire import abort_connection
from peer_helpers import start_peers

DEAF = TProtocol("/legion/test/deaf/1.0.0")


async def test_aborting_a_connection_fails_a_blocked_write_and_the_peer_can_reconnect():
    async with trio.open_nursery() as nursery:
        writer, deaf = await start_peers(nursery, 2)
        deaf.host.set_stream_handler(DEAF, lambda stream: trio.sleep_forever())  # accepts, never reads
        stream = await writer.host.new_stream(deaf.peer_id, [DEAF])
        outcome = {}

        async def write_too_much():
            try:
                await stream.write(b"x" * (32 << 20))  # far beyond the stream's window
                outcome["result"] = "written"
            except Exception as exc:
                outcome["result"] = type(exc).__name__

        nursery.start_soon(write_too_much)
        await trio.sleep(0.5)
        assert outcome == {}, "the write should be blocked on a peer that does not read"
        assert abort_connection(stream)
        with trio.fail_after(2):  # py-libp2p itself would give up only ~5 s after the window closed
            while not outcome:
                await trio.sleep(0.05)
        assert outcome["result"] != "written"
        with trio.fail_after(10):  # a live peer is reached again on a fresh connection
            while True:
                try:
                    again = await writer.host.new_stream(deaf.peer_id, [DEAF])
                    break
                except Exception:  # the aborted connection is still being torn down
                    await trio.sleep(0.2)
            await again.write(b"hello")
        nursery.cancel_scope.cancel()


SINK = TProtocol("/legion/test/sink/1.0.0")


async def test_writes_cancelled_at_any_moment_leave_the_connection_intact():
    """py-libp2p 0.8.1 left a frame half-written (or its Noise nonce spent) when the writing task
    was cancelled, and the other side dropped the connection with every stream on it; unpatched,
    this loop lost its connection within a few dozen writes."""
    async with trio.open_nursery() as nursery:
        writer, reader = await start_peers(nursery, 2)

        async def sink(stream):
            with contextlib.suppress(Exception):
                while await stream.read(65536):
                    pass

        reader.host.set_stream_handler(SINK, sink)
        connection = writer.host.get_network().get_connections(reader.peer_id)[0]
        rng = random.Random(1)
        cancelled = 0
        for _ in range(300):
            stream = await writer.host.new_stream(reader.peer_id, [SINK])
            with trio.move_on_after(rng.uniform(0, 0.002)) as scope:
                for _ in range(20):
                    await stream.write(b"x" * 2000)
            cancelled += scope.cancelled_caught
            with trio.move_on_after(1), contextlib.suppress(Exception):
                await stream.reset()
        assert cancelled > 100  # most writes were cut short somewhere
        assert writer.host.get_network().get_connections(reader.peer_id) == [connection]
        assert reader.host.get_network().get_connections(writer.peer_id)  # the reader kept it too
        nursery.cancel_scope.cancel()
