"""Connections to peers that stop reading: aborting one frees whoever is blocked writing to it."""

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
