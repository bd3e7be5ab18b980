"""Lanes: direct encrypted TCP connections set up through libp2p (averaging/lanes.py)."""

import os

import pytest
import trio

from averaging.lanes import CountedStream, Lane, LaneError
from averaging.wire import FrameError, read_frame, read_frame_within, stream_peer, write_frame, write_frame_within
from swarm.peer import Peer, PeerConfig
from tests.peer_helpers import LOOPBACK, start_peers

ECHO = "/legion/test-echo/1.0.0"


def serve_echo(peer: Peer, seen: list, served: list | None = None) -> None:
    async def echo(stream) -> None:
        seen.append((type(stream), stream_peer(stream)))
        if served is not None:
            served.append(stream)
        header, payload = await read_frame(stream, 64 << 20)
        await write_frame(stream, header, payload[::-1])
        await stream.close()

    peer.lanes.serve(ECHO, echo)


async def test_a_lane_carries_frames_both_ways_and_names_the_dialing_peer():
    async with trio.open_nursery() as nursery:
        a, b = await start_peers(nursery, 2)
        seen, served = [], []
        serve_echo(b, seen, served)
        payload = os.urandom(5 << 20)  # several 1 MiB encrypted frames
        stream = await a.lanes.open_stream(b.peer_id, ECHO)
        assert isinstance(stream, Lane)
        await write_frame(stream, {"n": 1}, payload)
        header, back = await read_frame(stream, 64 << 20)
        await stream.close()
        assert header == {"n": 1} and back == payload[::-1]
        assert seen == [(Lane, a.peer_id)]
        assert stream.bytes_sent > len(payload)  # it went over the lane, not libp2p

        # both sides ended that stream cleanly: the next stream to b reuses the connection
        for n in (2, 3):
            again = await a.lanes.open_stream(b.peer_id, ECHO)
            assert again is stream
            await write_frame(again, {"n": n}, payload[:1000])
            assert await read_frame(again, 64 << 20) == ({"n": n}, payload[:1000][::-1])
            await again.close()
        assert seen == [(Lane, a.peer_id)] * 3

        # closed before reading everything: the rest is dropped, not read by the next stream
        again = await a.lanes.open_stream(b.peer_id, ECHO)
        await write_frame(again, {"n": 4}, payload[:1000])
        await trio.sleep(0.2)
        await again.close()
        fresh = await a.lanes.open_stream(b.peer_id, ECHO)
        assert fresh is stream
        await write_frame(fresh, {"n": 5}, b"xyz")
        assert await read_frame(fresh, 16) == ({"n": 5}, b"zyx")
        await fresh.close()

        # the other end dropped the idle lane (as a killed or restarted peer does): a new lane is dialed
        served[-1].abort()
        await trio.sleep(0.2)
        replacement = await a.lanes.open_stream(b.peer_id, ECHO)
        assert isinstance(replacement, Lane) and replacement is not stream
        await write_frame(replacement, {"n": 6}, b"uvw")
        assert await read_frame(replacement, 16) == ({"n": 6}, b"wvu")
        await replacement.close()
        nursery.cancel_scope.cancel()


async def test_a_peer_without_lanes_is_reached_over_libp2p():
    async with trio.open_nursery() as nursery:
        [a] = await start_peers(nursery, 1)
        b = await nursery.start(Peer(PeerConfig(listen=LOOPBACK, bootstrap=[str(a.addrs[0])], heartbeat=1,
                                                lanes=False)).run)
        seen = []
        serve_echo(b, seen)
        for _ in range(2):  # the second time it does not try a lane again
            stream = await a.lanes.open_stream(b.peer_id, ECHO)
            assert not isinstance(stream, Lane)
            await write_frame(stream, {}, b"abc")
            assert (await read_frame(stream, 16))[1] == b"cba"
            await stream.close()
        assert [peer for _, peer in seen] == [a.peer_id, a.peer_id]
        assert b.peer_id.to_base58() in a.lanes._no_lane  # remembered: no lane is tried for a while
        nursery.cancel_scope.cancel()


async def test_a_tampered_frame_or_an_unknown_lane_id_is_refused():
    async with trio.open_nursery() as nursery:
        a, b = await start_peers(nursery, 2)
        got = []

        async def keep(stream) -> None:
            try:
                got.append(await stream.read(1 << 20))
                got.append(await stream.read(1 << 20))
            except LaneError as exc:
                got.append(exc)

        b.lanes.serve(ECHO, keep)
        stream = await a.lanes.open_stream(b.peer_id, ECHO)
        await stream.write(b"first")
        frame = stream._seal(0, b"second")
        tampered = frame[:4] + bytes([frame[4] ^ 1]) + frame[5:]  # one bit of the ciphertext
        await stream.sock.send_all(tampered)
        with trio.fail_after(10):
            while len(got) < 2:
                await trio.sleep(0.05)
        assert got[0] == b"first" and isinstance(got[1], LaneError)
        with pytest.raises(trio.BrokenResourceError):  # b closed the lane
            for _ in range(100):
                await stream.sock.send_all(b"x" * 65536)

        # a frame longer than any a lane sends
        got.clear()
        stream = await a.lanes.open_stream(b.peer_id, ECHO)
        await stream.write(b"first")
        await stream.sock.send_all((64 << 20).to_bytes(4, "big") + b"x" * 1024)
        with trio.fail_after(10):
            while len(got) < 2:
                await trio.sleep(0.05)
        assert got[0] == b"first" and isinstance(got[1], LaneError) and "frame of" in str(got[1])

        # a connection to the lane listener that presents no lane id it handed out
        intruder = await trio.open_tcp_stream("127.0.0.1", b.lanes.port)
        await intruder.send_all(os.urandom(16))
        with trio.fail_after(10):
            assert await intruder.receive_some(1) == b""
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("lanes", [True, False], ids=["lane", "libp2p stream"])
async def test_a_frame_that_trickles_in_is_slow_not_stalled_and_a_pause_is_a_stall(lanes):
    """On a lane and on a libp2p stream alike, stall timeouts count bytes moving, not whole
    frames: a 1 MiB chunk crawling through a link shared with many streams (or a relay) must not
    be taken for a dead peer."""
    async def framed(header: dict, payload: bytes) -> bytes:
        class Collect:  # the bytes write_frame would send, to send them in pieces instead
            data = bytearray()

            async def write(self, data: bytes) -> None:
                self.data.extend(data)

        out = Collect()
        await write_frame(out, header, payload)
        return bytes(out.data)

    async def trickle(stream) -> None:
        await read_frame(stream, 0)
        slow = await framed({"c": 0}, os.urandom(200_000))
        for start in range(0, len(slow), 10_000):  # 20 pieces over ~2 s: 4x the stall limit
            await stream.write(slow[start:start + 10_000])
            await trio.sleep(0.1)
        await write_frame(stream, {"c": 1}, b"x" * 1000)
        await stream.write((await framed({"c": 2}, b"y" * 1000))[:500])  # then silence
        await trio.sleep(3)
        await stream.close()

    async with trio.open_nursery() as nursery:
        a, b = await start_peers(nursery, 2, lanes=lanes)
        b.lanes.serve(ECHO, trickle)
        stream = await a.lanes.open_stream(b.peer_id, ECHO)
        assert isinstance(stream, Lane if lanes else CountedStream)
        await write_frame(stream, {"go": True})
        started = trio.current_time()
        header, payload = await read_frame_within(stream, 0.5, 1 << 20)
        assert header == {"c": 0} and len(payload) == 200_000
        assert trio.current_time() - started > 1.5  # it did take longer than the limit
        assert (await read_frame_within(stream, 0.5, 1 << 20))[0] == {"c": 1}
        with pytest.raises(FrameError, match="stalled for 0.5s"):
            await read_frame_within(stream, 0.5, 1 << 20)
        assert trio.current_time() - started < 4
        # a failure is raised as itself (callers catch FrameError), not inside an exception group
        if lanes:
            stream.abort()
        else:
            await stream.reset()
        with pytest.raises(FrameError, match="stream broke while writing"):
            await write_frame_within(stream, 0.5, {"c": 3}, b"z")
        nursery.cancel_scope.cancel()
