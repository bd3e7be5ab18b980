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


def test_a_full_bundle_drops_its_largest_entries_so_no_writer_pushes_the_others_out():
    now, key = time.time(), "/legion/test/blobs"  # a kind without its own cap: entries up to 64 KiB
    entries = {}
    for i in range(12):  # long-lived large entries: ~9 of them used to erase every other entry
        e = sign_entry(key, create_new_key_pair(), b"x" * 60_000, ttl=600, now=now)
        entries[e.subkey] = e
    honest = [sign_entry(key, create_new_key_pair(), {"addrs": ["/ip4/198.18.0.10/tcp/4001"]}, ttl=10, now=now)
              for _ in range(200)]
    entries.update({e.subkey: e for e in honest})
    data, kept_entries = fit_bundle(entries)
    assert len(data) <= MAX_BUNDLE_BYTES
    kept = {e.subkey for e in decode_bundle_strict(key, data, now=now)}
    assert kept == {e.subkey for e in kept_entries}
    assert {e.subkey for e in honest} <= kept
    assert 0 < len(kept - {e.subkey for e in honest}) < 12


def test_entries_over_their_kinds_cap_or_lifetime_are_refused():
    kp = create_new_key_pair()
    with pytest.raises(RecordError, match="exceeds"):
        sign_entry(KEY, kp, b"x" * 9000, ttl=10)  # members entries: 8 KiB at most
    with pytest.raises(RecordError, match="ttl"):
        sign_entry(KEY, kp, "v", ttl=24 * 3600)
    forged = wire(sign_entry("/legion/test/blobs", kp, b"x" * 9000, ttl=10))
    with pytest.raises(RecordError, match="exceeds"):
        verify_entry(KEY, forged)


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


@pytest.mark.parametrize("key_type", ["rsa", "secp256k1"])
def test_only_ed25519_writers_are_believed(key_type):
    if key_type == "rsa":
        from libp2p.crypto.rsa import create_new_key_pair as other_key_pair
    else:
        from libp2p.crypto.secp256k1 import create_new_key_pair as other_key_pair
    with pytest.raises(RecordError, match="Ed25519"):
        verify_entry(KEY, wire(sign_entry(KEY, other_key_pair(), "v", ttl=10)))


async def test_the_merging_store_caps_keys_and_the_keys_one_writer_holds(monkeypatch):
    from libp2p.records.record import make_signed_put_record

    import dht.store
    from dht.store import MergingValueStore
    from swarm.network import build_host

    monkeypatch.setattr(dht.store, "MAX_KEYS", 6)
    monkeypatch.setattr(dht.store, "MAX_KEYS_PER_WRITER", 3)
    host = build_host(create_new_key_pair())
    store = MergingValueStore(host=host, local_peer_id=host.get_id())
    greedy, honest = create_new_key_pair(), create_new_key_pair()

    def put(key, key_pair):
        store.put_record(key.encode(), make_signed_put_record(
            key.encode(), encode_bundle([sign_entry(key, key_pair, "v", ttl=10)]), key_pair.private_key))

    for i in range(10):
        put(f"/legion/test/k{i}", greedy)
    assert sorted(store.get_keys()) == [f"/legion/test/k{i}".encode() for i in range(3)]
    for i in range(3, 10):  # other writers fill the store up to its cap; further keys are refused
        put(f"/legion/test/k{i}", create_new_key_pair())
    assert len(store.get_keys()) == 6
    put("/legion/test/k0", honest)  # a key held still takes new writers' entries
    assert len(decode_bundle_strict("/legion/test/k0", store.get(b"/legion/test/k0").value)) == 2


def test_a_writers_expired_entries_do_not_count_against_its_keys(monkeypatch):
    """A peer writes new matchmaking keys every round and nobody reads old rounds' keys again:
    its expired entries under them must not fill its cap (they did, and after ~14 rounds of a
    fast swarm every new entry of every peer was dropped)."""
    from libp2p.records.record import make_signed_put_record

    import dht.store
    from dht.store import MergingValueStore
    from swarm.network import build_host

    monkeypatch.setattr(dht.store, "MAX_KEYS_PER_WRITER", 3)
    host = build_host(create_new_key_pair())
    store = MergingValueStore(host=host, local_peer_id=host.get_id())
    writer = create_new_key_pair()

    def put(key, ttl):
        entry = sign_entry(key, writer, "v", ttl=ttl)
        store.put_record(key.encode(), make_signed_put_record(key.encode(), encode_bundle([entry]), writer.private_key))

    for i in range(3):
        put(f"/legion/test/round{i}", ttl=1)
    assert len(store.get_keys()) == 3
    time.sleep(1.2)  # they expire; nobody reads their keys
    for i in range(3, 6):
        put(f"/legion/test/round{i}", ttl=60)
    assert {k.decode() for k in store.get_keys() if store.get(k)} == {f"/legion/test/round{i}" for i in range(3, 6)}
    put("/legion/test/round6", ttl=60)  # three live keys: a fourth is refused
    assert store.get(b"/legion/test/round6") is None
