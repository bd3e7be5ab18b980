"""A training state as a signed manifest plus content-addressed chunks.

The state's tensors are laid end to end and cut into fixed-size chunks; a chunk's id is the
SHA-256 of its raw bytes, so a chunk that did not change between versions (or that two peers hold
alike) has one id and moves once. Chunking restarts at each *segment*, the run of tensors whose
names share the part before the first ``.``: a segment that differs between peers (their own
inner-optimizer moments, say) then never shares a chunk with one they hold alike (the weights).

The manifest lists the tensors (name, dtype, shape) and the chunks (id, raw size, stored size).
Its id is the SHA-256 of its body; the body travels in an envelope signed by the peer that made
it. Nothing here is ever unpickled, and every size is checked before anything is allocated.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Iterator

import msgpack
import torch
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from dht.records import RecordError, ed25519_key

VERSION = 1
CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
MAX_TENSORS = 100_000
MAX_ENVELOPE = 16 << 20
MAX_META = 64 * 1024
MAX_ROUND = 1 << 40  # rounds of seconds each: far beyond any run, far below what overflows anything
ID_BYTES = 32
_DOMAIN = b"legion-manifest-v1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8}
_ITEM_SIZE = {name: torch.empty(0, dtype=dtype).element_size() for name, dtype in DTYPES.items()}


class ManifestError(ValueError):
    """A manifest or envelope that is malformed, forged, or does not fit its limits."""


def chunk_id(raw: bytes | memoryview) -> bytes:
    return hashlib.sha256(raw).digest()


def max_stored_size(raw_size: int) -> int:
    """zstd's worst case for incompressible input (its ZSTD_COMPRESSBOUND), plus a frame header."""
    return raw_size + raw_size // 255 + 128


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ITEM_SIZE[self.dtype]

    @property
    def segment(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class ChunkRef:
    id: bytes
    size: int  # raw bytes
    stored: int  # compressed bytes on disk and on the wire


@dataclass(frozen=True)
class Manifest:
    run_id: str
    round: int
    tensors: tuple[TensorSpec, ...]
    chunks: tuple[ChunkRef, ...]
    chunk_size: int = CHUNK_SIZE
    meta: Any = None  # anything msgpack-able the producer wants to say (e.g. the run config)

    def body(self) -> bytes:
        return msgpack.packb([VERSION, self.run_id, self.round, self.chunk_size,
                              [[t.name, t.dtype, list(t.shape)] for t in self.tensors],
                              [[c.id, c.size, c.stored] for c in self.chunks], self.meta], use_bin_type=True)

    @cached_property
    def id(self) -> bytes:
        return hashlib.sha256(self.body()).digest()

    def unique_chunks(self) -> dict[bytes, ChunkRef]:
        return {c.id: c for c in self.chunks}

    def segment_digest(self, segment: str) -> bytes | None:
        """A digest of ``segment``'s tensors and bytes (its layout and chunk ids), None if the
        manifest has no such segment: peers holding the same weights give the same digest
        whatever else their states hold, so independent peers can attest a state."""
        first = 0
        for group, length in segment_sizes(self.tensors):
            count = -(-length // self.chunk_size)
            if group[0].segment == segment:
                layout = msgpack.packb([[t.name, t.dtype, list(t.shape)] for t in group])
                return hashlib.sha256(layout + b"".join(c.id for c in self.chunks[first:first + count])).digest()
            first += count
        return None

    def sign(self, key_pair: KeyPair) -> bytes:
        """The envelope: body, signer's peer id and signature, all msgpack."""
        body = self.body()
        signer = ID.from_pubkey(key_pair.public_key).to_bytes()
        return msgpack.packb([body, signer, key_pair.private_key.sign(_DOMAIN + body)], use_bin_type=True)


@dataclass(frozen=True)
class SignedManifest:
    manifest: Manifest
    signer: str
    envelope: bytes

    @property
    def id(self) -> bytes:
        return self.manifest.id


def segment_sizes(tensors: tuple[TensorSpec, ...]) -> list[tuple[list[TensorSpec], int]]:
    """Consecutive tensors grouped by segment, with each group's byte length."""
    groups: list[tuple[list[TensorSpec], int]] = []
    for spec in tensors:
        if groups and groups[-1][0][-1].segment == spec.segment:
            groups[-1][0].append(spec)
            groups[-1] = (groups[-1][0], groups[-1][1] + spec.nbytes)
        else:
            groups.append(([spec], spec.nbytes))
    return groups


def _chunk_sizes(tensors: tuple[TensorSpec, ...], chunk_size: int) -> list[int]:
    sizes = []
    for _, length in segment_sizes(tensors):
        full, rest = divmod(length, chunk_size)
        sizes += [chunk_size] * full + ([rest] if rest else [])
    return sizes


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _raw_chunks(tensors: dict[str, torch.Tensor], specs: tuple[TensorSpec, ...], chunk_size: int) -> Iterator[bytes]:
    """The raw chunks of ``tensors`` (described by ``specs``) in manifest order."""
    for group, _ in segment_sizes(specs):
        buffer = bytearray()
        for spec in group:
            view = _raw_bytes(tensors[spec.name])
            while len(view):
                take = chunk_size - len(buffer)
                buffer += view[:take]
                view = view[take:]
                if len(buffer) == chunk_size:
                    yield bytes(buffer)
                    buffer.clear()
        if buffer:
            yield bytes(buffer)


def build_manifest(tensors: dict[str, torch.Tensor], run_id: str, round_: int,
                   put: Callable[[bytes, bytes], int], *, chunk_size: int = CHUNK_SIZE, meta: Any = None) -> Manifest:
    """Cut ``tensors`` into chunks, hand each ``(id, raw)`` to ``put`` (which stores it if new and
    returns its stored size), and return the manifest. CPU-heavy: call it from a worker thread."""
    for name, tensor in tensors.items():
        if str(tensor.dtype).removeprefix("torch.") not in DTYPES:
            raise ManifestError(f"tensor {name}: dtype {tensor.dtype} cannot be checkpointed")
    specs = tuple(TensorSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in tensors.items())
    chunks = []
    for raw in _raw_chunks(tensors, specs, chunk_size):
        cid = chunk_id(raw)
        chunks.append(ChunkRef(cid, len(raw), put(cid, raw)))
    return Manifest(run_id, round_, specs, tuple(chunks), chunk_size, meta)


def _parse_body(body: bytes, max_bytes: int) -> Manifest:
    try:
        fields = msgpack.unpackb(body, raw=False, strict_map_key=False, max_bin_len=MAX_ENVELOPE,
                                 max_str_len=MAX_ENVELOPE, max_array_len=1 << 22)
    except Exception as exc:
        raise ManifestError(f"manifest body is not msgpack: {exc}") from exc
    if not (isinstance(fields, list) and len(fields) == 7):
        raise ManifestError("manifest body is not a list of 7 fields")
    version, run_id, round_, chunk_size, tensors, chunks, meta = fields
    if version != VERSION:
        raise ManifestError(f"manifest version {version!r}, this peer reads {VERSION}")
    if not (isinstance(run_id, str) and 0 < len(run_id) <= 128 and type(round_) is int and 0 <= round_ < MAX_ROUND):
        raise ManifestError("manifest run id or round malformed")
    if not (isinstance(chunk_size, int) and 4096 <= chunk_size <= MAX_CHUNK_SIZE):
        raise ManifestError(f"chunk size {chunk_size!r} outside [4096, {MAX_CHUNK_SIZE}]")
    if len(msgpack.packb(meta, use_bin_type=True)) > MAX_META:
        raise ManifestError("manifest metadata too large")
    if not isinstance(tensors, list) or len(tensors) > MAX_TENSORS:
        raise ManifestError("manifest tensor list malformed")
    specs, total = [], 0
    for item in tensors:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                and isinstance(item[1], str) and item[1] in DTYPES
                and isinstance(item[2], list) and len(item[2]) <= 8
                and all(type(d) is int and 0 <= d < 1 << 40 for d in item[2])
                and math.prod(d for d in item[2] if d) < 1 << 40):  # also with a zero among them
            raise ManifestError(f"malformed tensor entry {item!r:.100}")
        spec = TensorSpec(item[0], item[1], tuple(item[2]))
        total += spec.nbytes
        if total > max_bytes:
            raise ManifestError(f"state larger than the {max_bytes} bytes allowed")
        specs.append(spec)
    if len({s.name for s in specs}) != len(specs):
        raise ManifestError("manifest names a tensor twice")
    expected = _chunk_sizes(tuple(specs), chunk_size)
    if not isinstance(chunks, list) or len(chunks) != len(expected):
        raise ManifestError(f"manifest lists {len(chunks) if isinstance(chunks, list) else '?'} chunks, "
                            f"its layout needs {len(expected)}")
    refs = []
    for item, size in zip(chunks, expected):
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], bytes) and len(item[0]) == ID_BYTES
                and item[1] == size and isinstance(item[2], int) and 0 < item[2] <= max_stored_size(size)):
            raise ManifestError(f"malformed chunk entry {item!r:.100}")
        refs.append(ChunkRef(item[0], size, item[2]))
    return Manifest(run_id, round_, tuple(specs), tuple(refs), chunk_size, meta)


def open_envelope(envelope: bytes, *, max_bytes: int, expected_id: bytes | None = None) -> SignedManifest:
    """Check an envelope's signature (and that its manifest has ``expected_id``) and parse it."""
    if len(envelope) > MAX_ENVELOPE:
        raise ManifestError(f"manifest of {len(envelope)} bytes exceeds {MAX_ENVELOPE}")
    try:
        body, signer_bytes, signature = msgpack.unpackb(envelope, raw=False, max_bin_len=MAX_ENVELOPE)
    except Exception as exc:
        raise ManifestError(f"manifest envelope malformed: {exc}") from exc
    if not all(isinstance(part, bytes) for part in (body, signer_bytes, signature)):
        raise ManifestError("manifest envelope fields are not bytes")
    try:
        public_key = ed25519_key(signer_bytes)
    except RecordError as exc:
        raise ManifestError(f"manifest signer: {exc}") from exc
    signer = ID(signer_bytes)
    if expected_id is not None and hashlib.sha256(body).digest() != expected_id:
        raise ManifestError("manifest does not hash to the id asked for")
    try:
        valid = public_key.verify(_DOMAIN + body, signature)
    except Exception:
        valid = False
    if not valid:
        raise ManifestError(f"manifest signature does not match its signer {signer.to_base58()}")
    manifest = _parse_body(body, max_bytes)
    if manifest.body() != body:  # else the id asked for and the id it is stored under would differ
        raise ManifestError("manifest body is not in canonical msgpack form")
    return SignedManifest(manifest, signer.to_base58(), envelope)


def assemble(manifest: Manifest, read_raw: Callable[[ChunkRef], bytes]) -> dict[str, torch.Tensor]:
    """The tensors of ``manifest`` from its chunks (``read_raw`` returns a verified chunk's bytes)."""
    chunks = iter(manifest.chunks)
    out: dict[str, torch.Tensor] = {}
    for group, length in segment_sizes(manifest.tensors):
        buffer = bytearray(length)
        filled = 0
        while filled < length:
            raw = read_raw(next(chunks))
            buffer[filled:filled + len(raw)] = raw
            filled += len(raw)
        offset = 0
        for spec in group:
            dtype = DTYPES[spec.dtype]
            try:
                out[spec.name] = (torch.frombuffer(buffer, dtype=dtype, count=spec.nbytes // _ITEM_SIZE[spec.dtype],
                                                   offset=offset).reshape(spec.shape)
                                  if spec.nbytes else torch.zeros(spec.shape, dtype=dtype))
            except RuntimeError as exc:  # a layout torch refuses: the manifest's fault, not this peer's
                raise ManifestError(f"tensor {spec.name[:80]}: {exc}") from exc
            offset += spec.nbytes
    return out
