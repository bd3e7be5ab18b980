"""Signed entries, bundles, the validator and the merging store, without a network."""

import math
import time

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from dht.records import (MAX_BUNDLE_BYTES, MAX_ENTRY_BYTES, RecordError, decode_bundle_lenient,
                         decode_bundle_strict, encode_bundle, fit_bundle, merge, sign_entry, verify_entry)
from dht.validator import LegionValidator

KEY = "/legion/test/members"


def wire(entry):
    return msgpack.unpackb(encode_bundle([entry]))[0]


def test_signed_entry_round_trips():
    kp = create_new_key_pair()
    entry = sign_entry(KEY, kp, {"a": 1, "b": [1.5, "x"]}, ttl=10)
    back = verify_entry(KEY, wire(entry))
    assert back.subkey == ID.from_pubkey(kp.public_key).to_base58()
    assert back.value == {"a": 1, "b": [1.5, "x"]}


def test_entry_signed_by_another_peer_is_rejected_as_forged():
    victim, forger = create_new_key_pair(), create_new_key_pair()
    forged = wire(sign_entry(KEY, forger, "evil", ttl=10))
    forged[0] = ID.from_pubkey(victim.public_key).to_bytes()  # claim the victim's subkey
    with pytest.raises(RecordError, match="signature does not match"):
        verify_entry(KEY, forged)


def test_tampered_value_and_replay_under_another_key_are_rejected():
    kp = create_new_key_pair()
    tampered = wire(sign_entry(KEY, kp, "honest", ttl=10))
    tampered[1] = msgpack.packb("changed")
    with pytest.raises(RecordError, match="signature"):
        verify_entry(KEY, tampered)
    with pytest.raises(RecordError, match="signature"):
        verify_entry("/legion/other/key", wire(sign_entry(KEY, kp, "honest", ttl=10)))


def test_unsigned_entry_is_rejected():
    entry = wire(sign_entry(KEY, create_new_key_pair(), "v", ttl=10))
    entry[4] = b""
    with pytest.raises(RecordError, match="signature"):
        verify_entry(KEY, entry)


def test_expired_entry_is_rejected():
    old = sign_entry(KEY, create_new_key_pair(), "v", ttl=5, now=time.time() - 10)
    with pytest.raises(RecordError, match="expired"):
        verify_entry(KEY, wire(old))


def test_entry_from_the_future_is_rejected():
    future = sign_entry(KEY, create_new_key_pair(), "v", ttl=5, now=time.time() + 3600)
    with pytest.raises(RecordError, match="future"):
        verify_entry(KEY, wire(future))


def test_oversized_entry_and_bundle_are_rejected():
    kp = create_new_key_pair()
    with pytest.raises(RecordError, match="exceeds"):
        sign_entry(KEY, kp, b"x" * MAX_ENTRY_BYTES, ttl=10)
    with pytest.raises(RecordError, match="exceeds"):
        decode_bundle_strict(KEY, b"\x90" + b"x" * MAX_BUNDLE_BYTES)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"not msgpack at all \xff\xfe", msgpack.packb({"a": 1}), msgpack.packb([]),
    msgpack.packb([[1, 2, 3]]), msgpack.packb([["str", b"v", 1.0, 2.0, b"sig"]]),
    msgpack.packb([[b"\x00\x01junk", msgpack.packb(1), time.time(), time.time() + 5, b"s" * 64]]),
])
def test_malformed_bundles_are_rejected(data):
    with pytest.raises(RecordError):
        decode_bundle_strict(KEY, data)


def test_non_finite_times_are_rejected():
    entry = wire(sign_entry(KEY, create_new_key_pair(), "v", ttl=10))
    entry[3] = math.inf
    with pytest.raises(RecordError, match="finite"):
        verify_entry(KEY, entry)


def test_keys_outside_the_legion_namespace_are_rejected():
    with pytest.raises(RecordError, match="key"):
        sign_entry("/pk/whatever", create_new_key_pair(), "v", ttl=10)


def test_merge_keeps_newest_entry_per_subkey_and_drops_expired():
    a, b = create_new_key_pair(), create_new_key_pair()
    now = time.time()
    a_old = sign_entry(KEY, a, "old", ttl=10, now=now - 2)
    a_new = sign_entry(KEY, a, "new", ttl=10, now=now - 1)
    b_gone = sign_entry(KEY, b, "gone", ttl=1, now=now - 5)
    merged = merge([a_new], [a_old, b_gone], now=now)
    assert list(merged) == [a_new.subkey]
    assert merged[a_new.subkey].value == "new"


def test_lenient_decode_keeps_good_entries_and_reports_bad_ones():
    good = sign_entry(KEY, create_new_key_pair(), "good", ttl=10)
    bad = wire(sign_entry(KEY, create_new_key_pair(), "bad", ttl=10))
    bad[4] = b"\x00" * 64
    data = msgpack.packb([wire(good), bad])
    entries, problems = decode_bundle_lenient(KEY, data)
    assert [e.value for e in entries] == ["good"] and len(problems) == 1
    with pytest.raises(RecordError):
        decode_bundle_strict(KEY, data)


def test_validator_prefers_an_offer_with_any_fresher_entry():
    validator = LegionValidator()
    a, b = create_new_key_pair(), create_new_key_pair()
    stored = encode_bundle([sign_entry(KEY, a, "a", ttl=10), sign_entry(KEY, b, "b1", ttl=10)])
    assert validator.select(KEY, [stored, encode_bundle([sign_entry(KEY, b, "b2", ttl=10)])]) == 1
    assert validator.select(KEY, [stored, encode_bundle([sign_entry(KEY, create_new_key_pair(), "c", ttl=10)])]) == 1
    assert validator.select(KEY, [stored, stored]) == 0
    with pytest.raises(RecordError):
        validator.validate(KEY, b"garbage")


def test_fit_bundle_drops_soonest_expiring_entries_to_stay_under_the_limit():
    now = time.time()
    entries = {}
    for i in range(20):
        e = sign_entry(KEY, create_new_key_pair(), b"x" * 40_000, ttl=100 + i, now=now)
        entries[e.subkey] = e
    data = fit_bundle(entries)
    assert len(data) <= MAX_BUNDLE_BYTES
    kept = decode_bundle_strict(KEY, data, now=now)
    assert 0 < len(kept) < 20
    assert min(e.expiration for e in kept) > max(e.expiration for e in entries.values() if e not in kept)


async def test_merging_store_keeps_every_writers_entry_and_prunes_expired_ones():
    from libp2p.records.record import make_signed_put_record

    from dht.store import MergingValueStore
    from swarm.network import build_host

    host = build_host(create_new_key_pair())
    store = MergingValueStore(host=host, local_peer_id=host.get_id())
    a, b = create_new_key_pair(), create_new_key_pair()

    def put(entry):
        store.put_record(KEY.encode(), make_signed_put_record(KEY.encode(), encode_bundle([entry]), a.private_key))

    short = sign_entry(KEY, b, "b", ttl=0.3)
    put(sign_entry(KEY, a, "a1", ttl=10))
    put(short)
    put(sign_entry(KEY, a, "a2", ttl=10))
    held = decode_bundle_strict(KEY, store.get(KEY.encode()).value)
    assert sorted(e.value for e in held) == ["a2", "b"]
    time.sleep(0.4)
    held = decode_bundle_strict(KEY, store.get(KEY.encode()).value)
    assert [e.value for e in held] == ["a2"]
    assert store.get(b"/legion/absent") is None
