"""NAT-PMP answers are untrusted input: a router that answers nonsense, refuses or stays silent
ends the attempt with an error, never a crash or a hang (``swarm.port_mapping``)."""

import socket
import struct

import pytest
import trio

from swarm.port_mapping import NATPMP_PORT, NatPmp, RouterError, default_gateway


async def fake_router(answer, task_status=trio.TASK_STATUS_IGNORED):
    """A NAT-PMP 'router' on 127.0.0.1 that answers each request with ``answer(request)`` (None: silence)."""
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", NATPMP_PORT))
        task_status.started()
        while True:
            request, source = await sock.recvfrom(64)
            reply = answer(request)
            if reply is not None:
                await sock.sendto(reply, source)


def external_address_reply(request, code=0, address="203.0.113.9"):
    return struct.pack("!BBHI", 0, 128, code, 77) + socket.inet_aton(address)


@pytest.mark.parametrize("answer, error", [
    (lambda r: b"\x00\x80\x00", None),  # too short to be an answer: ignored as noise until the deadline
    (lambda r: external_address_reply(r)[:10], "malformed"),
    (lambda r: external_address_reply(r, code=3), "result code 3"),
    (lambda r: None, "no answer"),
])
async def test_a_router_answering_nonsense_or_nothing_is_an_error(answer, error, monkeypatch):
    from swarm import port_mapping
    from swarm.port_mapping import _natpmp_request

    monkeypatch.setattr(port_mapping, "NATPMP_TRIES", 2)  # 0.75 s of silence, not 3.75

    async with trio.open_nursery() as nursery:
        await nursery.start(fake_router, answer)
        with trio.fail_after(10), pytest.raises(RouterError, match=error or "no answer"):
            await _natpmp_request("127.0.0.1", struct.pack("!BB", 0, 0), 12)
        nursery.cancel_scope.cancel()


async def test_a_router_offering_another_outside_port_is_refused_and_released():
    """The lane port a peer hands out must be the port outside too."""
    requests = []

    def answer(request):
        requests.append(request)
        if request[1] == 0:
            return external_address_reply(request)
        _, _, _, internal, _, lifetime = struct.unpack("!BBHHHI", request)
        return struct.pack("!BBHIHHI", 0, 130, 0, 77, internal, internal + 1 if lifetime else 0, lifetime)

    async with trio.open_nursery() as nursery:
        await nursery.start(fake_router, answer)
        router = NatPmp("127.0.0.1", "203.0.113.9")
        with pytest.raises(RouterError, match="not the same port"):
            await router.forward(4001)
        assert struct.unpack("!BBHHHI", requests[-1])[5] == 0  # the odd mapping was released
        nursery.cancel_scope.cancel()


def test_the_default_gateway_is_read_from_the_routing_table(tmp_path):
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\n"
                     "eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n"
                     "eth0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\n")
    assert default_gateway(table) == "192.168.2.1"
    table.write_text("Iface\tDestination\tGateway\tFlags\n")
    assert default_gateway(table) is None
    assert default_gateway(tmp_path / "missing") is None
