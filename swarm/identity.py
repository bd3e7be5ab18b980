"""Peer identity: an Ed25519 key pair, ephemeral or kept in a 0600 file."""

from __future__ import annotations

import os
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair

_MAGIC = b"legion-ed25519-v1\n"


class IdentityError(Exception):
    """The identity file cannot be read or created."""


def load_or_create_identity(path: Path | None) -> KeyPair:
    """The key pair stored at ``path``, created there (mode 0600) if the file does not exist;
    a fresh ephemeral key pair if ``path`` is None."""
    if path is None:
        return create_new_key_pair()
    path = Path(path)
    if path.exists():
        data = path.read_bytes()
        if not data.startswith(_MAGIC) or len(data) != len(_MAGIC) + 32:
            raise IdentityError(f"{path} is not a Legion identity file")
        private_key = Ed25519PrivateKey.from_bytes(data[len(_MAGIC):])
        return KeyPair(private_key, private_key.get_public_key())
    key_pair = create_new_key_pair()
    seed = key_pair.private_key.to_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise IdentityError(f"cannot create identity file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(_MAGIC + seed)
    return load_or_create_identity(path)
