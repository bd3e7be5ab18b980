"""Property-based fuzzing of every parser of remote bytes and values, in-process.

The oracle everywhere: random or mutated input raises only the parser's documented error (or is
accepted as a well-typed value), within bounded time and memory. ``HYPOTHESIS_PROFILE=long`` runs
many more examples (see ``conftest.py``); the default profile keeps CI fast.
"""

import hashlib
import math
import socket
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import trio
from hypothesis import HealthCheck, example, given, settings, strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from averaging.allreduce import GroupSpec, SpecError, _take_chunk
from averaging.codecs import CODECS, CodecError, get_codec
from averaging.groups import Coordinates
from averaging.lanes import Lane, LaneError
from averaging.matchmaking import _declaration
from averaging.partition import partition_bounds
from averaging.wire import FrameError, read_frame
from bootstrap.advert import parse_holdings
from bootstrap.chunk_store import ChunkError, decompress_chunk
from bootstrap.manifest import ChunkRef, ManifestError, build_manifest, open_envelope
from dht.records import (RecordError, decode_answer, decode_bundle_lenient, decode_bundle_strict, decode_read,
                         encode_bundle, encode_read, read_answer, sign_entry)
from optim.base import StateError, check_optimizer_tensors
from shards.bids import parse_bid
from swarm.members import Announcement
from swarm.run_board import Progress
from swarm.run_config import RunConfig, RunConfigError

KEY = "/legion/fuzz/members"
KEY_PAIR = create_new_key_pair()
PEER = ID.from_pubkey(KEY_PAIR.public_key).to_base58()

# msgpack-shaped values, with the numbers that break naive code: huge ints, NaN, infinities, bools
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40), st.binary(max_size=64))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=12), inner, max_size=6)), max_leaves=30)


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """``data`` with bytes flipped, cut or inserted."""
    def mutate(draw_ops):
        out = bytearray(data)
        for op, position, byte in draw_ops:
            if not out:
                break
            position %= len(out)
            if op == 0:
                out[position] ^= byte or 1
            elif op == 1:
                del out[position:]
            else:
                out[position:position] = bytes([byte])
        return bytes(out)

    ops = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 20), st.integers(0, 255)), min_size=1, max_size=4)
    return ops.map(mutate)


class ByteSource:
    """The read side of a stream over fixed bytes (what a remote peer sent), for the frame parser."""

    def __init__(self, data: bytes) -> None:
        self.data, self.position = data, 0

    async def read(self, n: int = -1) -> bytes:
        n = len(self.data) - self.position if n is None or n < 0 else n
        chunk = self.data[self.position:self.position + n]
        self.position += len(chunk)
        return chunk


@given(st.binary(max_size=512))
async def test_frames_from_random_bytes(data):
    with pytest.raises(FrameError):
        while True:  # every frame a parser takes is a map; the bytes always run out
            header, payload = await read_frame(ByteSource(data), 1 << 16)
            assert isinstance(header, dict) and len(payload) <= 1 << 16
            data = data[12 + len(msgpack.packb(header)) + len(payload):]


VALID_BUNDLE = encode_bundle([sign_entry(KEY, KEY_PAIR, {"addrs": ["/ip4/198.18.0.10/tcp/4001"]}, ttl=60)])


@given(st.one_of(st.binary(max_size=300), mutations(VALID_BUNDLE),
                 values.map(lambda v: msgpack.packb(v, use_bin_type=True))))
def test_dht_bundles_from_random_or_mutated_bytes(data):
    for decode in (decode_bundle_strict, decode_bundle_lenient, decode_answer):
        try:
            decode(KEY, data)
        except RecordError:
            pass


VALID_ANSWER = read_answer(VALID_BUNDLE, frozenset(), None, b"t" * 8)[0]
KNOWN = encode_read(b"", decode_bundle_strict(KEY, VALID_BUNDLE))


@given(st.one_of(mutations(VALID_ANSWER), mutations(read_answer(VALID_BUNDLE, decode_read(KNOWN)[1], None, b"t" * 8)[0]),
                 mutations(read_answer(VALID_BUNDLE, frozenset(), frozenset([b"d" * 8]), b"t" * 8)[0]),
                 values.map(lambda v: b"legion-read-v2:" + msgpack.packb(v, use_bin_type=True))))
def test_read_answers_from_mutated_or_random_deltas(data):
    """A replica's answer to a read (``dht.records.decode_answer``): entries are checked as in a
    bundle, and anything else raises ``RecordError``."""
    try:
        answer = decode_answer(KEY, data)
    except RecordError:
        return
    assert all(len(d) == 8 for d in answer.named) and all(e.subkey for e in answer.entries)
    assert answer.token == b"" or len(answer.token) == 8


@given(st.one_of(mutations(KNOWN), mutations(encode_read(b"t" * 8, ())),
                 values.map(lambda v: b"legion-read-v2:" + msgpack.packb(v, use_bin_type=True))))
def test_read_requests_from_mutated_or_random_bytes(data):
    """A reader's request, as a replica parses it: a token of 8 bytes or none and digests of 8
    bytes, or None (answered in full); the replica's answer to it reads back."""
    read = decode_read(data)
    assert read is None or (len(read[0]) in (0, 8) and all(isinstance(d, bytes) and len(d) == 8 for d in read[1]))
    token, known = read or (b"", frozenset())
    bundle = encode_bundle([sign_entry(KEY, KEY_PAIR, {"n": 1}, ttl=60)])  # (signed now: a module's entries expire)
    answer, told = read_answer(bundle, known, None, b"t" * 8)
    assert len(decode_answer(KEY, answer).entries) + len(known & told) == 1


MANIFEST = build_manifest({"weights": torch.arange(5000, dtype=torch.float32), "inner.0.step": torch.tensor(3.0)},
                          "run", 7, lambda cid, raw: len(raw) + 9)
ENVELOPE = MANIFEST.sign(KEY_PAIR)


def signed(body: bytes) -> bytes:
    return msgpack.packb([body, ID.from_pubkey(KEY_PAIR.public_key).to_bytes(),
                          KEY_PAIR.private_key.sign(b"legion-manifest-v1" + body)])


def with_a_list_for_a_dtype() -> bytes:
    """A signed manifest whose first tensor's dtype is a list: unhashable, it raised TypeError
    where a ManifestError was due (found by this test in a CI run)."""
    fields = msgpack.unpackb(MANIFEST.body(), raw=False)
    fields[4][0][1] = ["float32"]
    return signed(msgpack.packb(fields, use_bin_type=True))


@settings(suppress_health_check=[HealthCheck.too_slow])
@example(with_a_list_for_a_dtype())
@given(st.one_of(st.binary(max_size=300), mutations(ENVELOPE),
                 mutations(MANIFEST.body()).map(signed),  # validly signed, malformed bodies
                 values.map(lambda v: signed(msgpack.packb(v, use_bin_type=True)))))
def test_manifest_envelopes_from_random_mutated_or_signed_garbage(envelope):
    tracemalloc.start()
    try:
        open_envelope(envelope, max_bytes=1 << 24)
    except ManifestError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20


@given(values)
@example({"group": "g", "members": [PEER, PEER[:-1] + "x"], "addrs": [[], []], "bounds": [0, 256, 512],
          "codec": "int8", "send": 0, "order": []})
def test_group_specs_from_random_values(wire):
    try:
        spec = GroupSpec.from_wire(wire)
    except SpecError:
        return
    assert spec.total == spec.bounds[-1] and all(type(b) is int for b in spec.bounds)


MEMBERS = sorted(ID.from_pubkey(create_new_key_pair().public_key).to_base58() for _ in range(2))
VALID_SPEC = {"group": "g", "members": MEMBERS, "addrs": [[], []], "bounds": [0, 256, 512], "codec": "int8",
              "send": 0, "order": []}
numbers = st.one_of(st.integers(-(1 << 64), 1 << 64), st.floats(), st.booleans(), st.text(max_size=3))


@given(st.sampled_from(sorted(VALID_SPEC)), st.one_of(values, st.lists(numbers, max_size=4),
                                                      st.lists(st.lists(numbers, max_size=3), max_size=3)))
@example("bounds", [0, 256, math.inf])
@example("members", [MEMBERS[0], "Qm" + "x" * 44])
def test_group_specs_with_one_field_replaced(field, value):
    try:
        spec = GroupSpec.from_wire({**VALID_SPEC, field: value})
    except SpecError:
        return
    spec.validate()
    assert all(type(b) is int for b in spec.bounds) and all(ID.from_base58(m) for m in spec.members)


@given(values)
def test_matchmaking_entries_from_random_values(value):
    entry = _declaration(value)
    if entry is not None:
        upload = entry["upload_mbps"]
        assert upload is None or (math.isfinite(upload) and upload > 0)
        bounds = partition_bounds(4096, [upload, 10.0])
        assert bounds[0] == 0 and bounds[-1] == 4096 and bounds == sorted(bounds)
    coords = Coordinates.from_wire(value)
    assert all(math.isfinite(c) for c in (coords.x, coords.y, coords.h))


@given(values)
def test_board_member_holding_and_bid_entries_from_random_values(value):
    for parse in (Progress.from_value, Announcement.from_value, parse_holdings, parse_bid):
        try:
            parse(PEER, value)
        except ValueError:
            pass


@given(st.dictionaries(st.one_of(st.text(max_size=20), st.integers()), values, max_size=8))
def test_run_configurations_from_random_values(config):
    try:
        RunConfig.from_dict(config, "fuzz")
    except RunConfigError:
        pass


@given(st.sampled_from(sorted(CODECS)), st.integers(0, 2048), st.binary(max_size=4096))
def test_codec_payloads_from_random_bytes(name, size, payload):
    codec = get_codec(name)
    try:
        values_ = codec.decode(payload, size)
    except CodecError:
        return
    assert values_.shape == (size,) and np.isfinite(values_).all()


@given(st.sampled_from(sorted(CODECS)), st.integers(1, 4), st.binary(min_size=1, max_size=64))
def test_all_reduce_chunks_of_the_wrong_size_or_index(name, index, payload):
    class State:  # what ``_take_chunk`` reads of a round
        codec = get_codec(name)

        class stats:
            bytes_received = 0

    with pytest.raises(FrameError):
        _take_chunk(State, {"c": index}, payload, 0, 4096, "fuzz")


RAW = b"legion" * 1000
STORED = __import__("zstandard").ZstdCompressor().compress(RAW)


@given(st.one_of(st.binary(max_size=200), mutations(STORED)))
def test_chunks_from_random_or_mutated_bytes(stored):
    ref = ChunkRef(hashlib.sha256(RAW).digest(), len(RAW), len(stored))
    try:
        assert decompress_chunk(ref, stored) == RAW
    except ChunkError:
        pass


@given(st.dictionaries(st.text(max_size=16), st.sampled_from([torch.zeros(3), torch.zeros(()), torch.zeros(2, 2),
                                                               torch.zeros(3, dtype=torch.int64)]), max_size=4))
def test_optimizer_states_with_random_names(state):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    try:
        check_optimizer_tensors(optimizer, "inner", {f"inner.{k}": v for k, v in state.items()})
    except StateError:
        pass


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096))
async def test_lane_frames_from_random_bytes(data):
    """Bytes on a lane's socket that did not come from the keyed peer: the lane reports an error
    (or an end), within a bounded time, and never decrypts them."""
    left, right = socket.socketpair()
    with left, right:
        right.sendall(data)
        right.shutdown(socket.SHUT_WR)
        lane = Lane(trio.SocketStream(trio.socket.from_stdlib_socket(left)), ID.from_base58(PEER),
                    b"k" * 32, b"k" * 32)
        with trio.fail_after(5):
            try:
                assert await lane.read() == b""  # nothing authenticates: at best a clean end
            except LaneError:
                pass

