"""What a hostile or buggy remote peer sends cannot crash, hang or take over an honest peer."""

import re
import socket
import struct
import time

import trio

from swarm.local import status_json


def lane_port(process, timeout: float = 20.0) -> int:
    """The lane listener's port, from the peer's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"lane listener on \S+:(\d+)", process.log_path.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        time.sleep(0.1)
    raise AssertionError(f"no lane listener in the log:\n{process.log_tail()}")


def reset_connection(port: int, send: bytes = b"") -> None:
    """Connect to 127.0.0.1:``port``, send ``send``, then reset the connection (RST, not FIN)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if send:
            sock.sendall(send)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_connections_reset_at_the_lane_listener_do_not_end_the_peer(seed):
    port = lane_port(seed)
    for send in (b"", b"\x01" * 7, b"\x02" * 16, b"\x03" * 40):  # no id, part of one, a wrong one, more
        reset_connection(port, send)
    await trio.sleep(1.0)
    assert seed.proc.poll() is None, f"the peer died:\n{seed.log_tail()}"
    listed = await trio.to_thread.run_sync(status_json, seed.addrs[0])
    assert [p["peer_id"] for p in listed] == seed.peer_ids
    log = seed.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert log.count("presented no valid lane id") + log.count("lane connection from") >= 4
