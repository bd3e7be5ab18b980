"""Chunks and manifests on disk: what a peer holds, serves, and resumes from after a restart.

``<root>/chunks/<hex id>`` holds a chunk as stored (zstd), ``<root>/manifests/<hex id>`` a signed
manifest envelope. Every file is written to a temporary name and renamed, so a crash leaves either
the whole file or none; every chunk is verified against its id when read, so a file damaged on
disk is found out (and removed) instead of being believed. One store per peer: pruning assumes
that nobody else writes into it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import zstandard

from bootstrap.manifest import ChunkRef, SignedManifest, assemble, build_manifest, chunk_id, max_stored_size, \
    open_envelope

log = logging.getLogger(__name__)

ZSTD_LEVEL = 1  # float weights compress little at any level; level 1 keeps up with the network


class ChunkError(ValueError):
    """A chunk that does not decompress to the bytes its id promises."""


def decompress_chunk(ref: ChunkRef, stored: bytes) -> bytes:
    """The raw bytes of a stored chunk, checked against ``ref``; raises ``ChunkError``."""
    if len(stored) != ref.stored:
        raise ChunkError(f"chunk {ref.id.hex()[:12]}: {len(stored)} stored bytes, manifest says {ref.stored}")
    try:
        # A frame's declared content size is what zstandard allocates, whatever max_output_size
        # says: a few KB could otherwise claim gigabytes.
        declared = zstandard.frame_content_size(stored)
        if declared not in (-1, ref.size):
            raise ChunkError(f"chunk {ref.id.hex()[:12]} declares {declared} bytes, manifest says {ref.size}")
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=ref.size)
    except zstandard.ZstdError as exc:
        raise ChunkError(f"chunk {ref.id.hex()[:12]} does not decompress: {exc}") from exc
    if len(raw) != ref.size or chunk_id(raw) != ref.id:
        raise ChunkError(f"chunk {ref.id.hex()[:12]} does not hash to its id")
    return raw


class ChunkStore:
    """Keeps ``keep`` newest complete versions per run (``prune``)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError("keep at least one version")
        self.root, self.keep = Path(root), keep
        self.chunk_dir, self.manifest_dir = self.root / "chunks", self.root / "manifests"
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        self.manifest_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # a save or a prune at a time
        self._held = {bytes.fromhex(p.name) for p in self.chunk_dir.iterdir() if len(p.name) == 64}
        self._manifests: dict[bytes, SignedManifest] = {}
        self._leases: dict[bytes, float] = {}  # manifest id -> until when pruning spares it

    # ----- chunks
    def has(self, cid: bytes) -> bool:
        return cid in self._held

    def held(self, ids: list[bytes]) -> list[bool]:
        return [cid in self._held for cid in ids]

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def put_raw(self, cid: bytes, raw: bytes) -> int:
        """Store a chunk from its raw bytes (compressing it) unless held; returns its stored size."""
        path = self.chunk_dir / cid.hex()
        if cid in self._held:
            try:
                return path.stat().st_size
            except FileNotFoundError:  # deleted behind the store's back: write it again
                self._held.discard(cid)
        stored = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
        self._write(path, stored)
        self._held.add(cid)
        return len(stored)

    def put_stored(self, ref: ChunkRef, stored: bytes) -> bytes:
        """Verify a chunk received from a peer and store it; returns its raw bytes."""
        raw = decompress_chunk(ref, stored)
        if ref.id not in self._held:
            self._write(self.chunk_dir / ref.id.hex(), stored)
            self._held.add(ref.id)
        return raw

    def read_stored(self, cid: bytes, max_size: int) -> bytes | None:
        if cid not in self._held:
            return None
        try:
            with (self.chunk_dir / cid.hex()).open("rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            self._held.discard(cid)
            return None
        return data if len(data) <= max_size else None

    def read_raw(self, ref: ChunkRef) -> bytes:
        """A held chunk's verified raw bytes; a damaged file is deleted and ``ChunkError`` raised."""
        stored = self.read_stored(ref.id, max_stored_size(ref.size))
        if stored is None:
            raise ChunkError(f"chunk {ref.id.hex()[:12]} is not held")
        try:
            return decompress_chunk(ref, stored)
        except ChunkError:
            self.discard(ref.id)
            raise

    def discard(self, cid: bytes) -> None:
        self._held.discard(cid)
        (self.chunk_dir / cid.hex()).unlink(missing_ok=True)

    # ----- manifests
    def add_manifest(self, signed: SignedManifest) -> None:
        with self._lock:
            path = self.manifest_dir / signed.id.hex()
            if not path.exists():
                self._write(path, signed.envelope)
            self._manifests[signed.id] = signed

    def manifest(self, mid: bytes, max_bytes: int = 1 << 62) -> SignedManifest | None:
        if mid in self._manifests:
            return self._manifests[mid]
        try:
            envelope = (self.manifest_dir / mid.hex()).read_bytes()
            signed = open_envelope(envelope, max_bytes=max_bytes, expected_id=mid)
        except (FileNotFoundError, ValueError) as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("manifest %s on disk is unreadable: %s", mid.hex()[:12], exc)
            return None
        self._manifests[mid] = signed
        return signed

    def lease(self, mid: bytes, seconds: float) -> None:
        """Spare version ``mid`` from pruning for ``seconds``: a peer is downloading it from here."""
        self._leases[mid] = max(self._leases.get(mid, 0.0), time.monotonic() + seconds)

    def manifests(self, run_id: str | None = None) -> list[SignedManifest]:
        """Manifests on disk (of ``run_id``), newest round first; of one round, the last saved
        first (a state adopted at the end of a run replaces the peer's own)."""
        found = []
        for path in self.manifest_dir.iterdir():
            if len(path.name) == 64 and (signed := self.manifest(bytes.fromhex(path.name))) is not None:
                if run_id is None or signed.manifest.run_id == run_id:
                    with contextlib.suppress(OSError):
                        found.append((-signed.manifest.round, -path.stat().st_mtime_ns, signed))
        return [signed for *_, signed in sorted(found, key=lambda item: item[:2])]

    def missing(self, signed: SignedManifest) -> list[ChunkRef]:
        return [ref for ref in signed.manifest.unique_chunks().values() if ref.id not in self._held]

    def complete(self, run_id: str) -> list[SignedManifest]:
        """Complete versions of ``run_id``, newest first."""
        return [s for s in self.manifests(run_id) if not self.missing(s)]

    def save(self, tensors, run_id: str, round_: int, key_pair, *, meta=None) -> SignedManifest:
        """Checkpoint ``tensors`` as a new version (chunks first, then the manifest), then prune.
        CPU-heavy: call it from a worker thread."""
        with self._lock:  # no prune between writing the chunks and the manifest naming them
            manifest = build_manifest(tensors, run_id, round_, self.put_raw, meta=meta)
            signed = open_envelope(manifest.sign(key_pair), max_bytes=1 << 62)
            self.add_manifest(signed)
            self.prune()
        return signed

    def load(self, signed: SignedManifest):
        """The tensors of a complete version (chunks verified as they are read)."""
        return assemble(signed.manifest, self.read_raw)

    def prune(self) -> None:
        """Keep the ``keep`` newest complete versions of each run (and incomplete ones newer than
        those: downloads under way) and leased ones; drop chunks no kept manifest names."""
        with self._lock:
            now = time.monotonic()
            for mid in [mid for mid, until in list(self._leases.items()) if until <= now]:
                self._leases.pop(mid, None)
            by_run: dict[str, list[SignedManifest]] = {}
            for signed in self.manifests():
                by_run.setdefault(signed.manifest.run_id, []).append(signed)
            kept: set[bytes] = set()
            for versions in by_run.values():
                complete = 0
                for signed in versions:  # newest first
                    if complete >= self.keep and signed.id not in self._leases:
                        (self.manifest_dir / signed.id.hex()).unlink(missing_ok=True)
                        self._manifests.pop(signed.id, None)
                        continue
                    complete += not self.missing(signed)
                    kept.update(signed.manifest.unique_chunks())
            for cid in self._held - kept:
                self.discard(cid)
