"""Pre-shared keys for private swarms, in the go-libp2p/IPFS ``swarm.key`` file format."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

_HEADER = "/key/swarm/psk/1.0.0/"
_ENCODING = "/base16/"


class SwarmKeyError(Exception):
    """The swarm key file is missing or malformed."""


def read_swarm_key(path: Path) -> str:
    """The 32-byte key as 64 hex digits. Accepts the IPFS three-line format or a bare hex line."""
    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(f"cannot read swarm key {path}: {exc}") from exc
    if lines[:2] == [_HEADER, _ENCODING]:
        lines = lines[2:]
    if len(lines) != 1 or not re.fullmatch(r"[0-9a-fA-F]{64}", lines[0]):
        raise SwarmKeyError(f"{path} is not a swarm key: expected {_HEADER}, {_ENCODING} and 64 hex digits")
    return lines[0].lower()


def write_swarm_key(path: Path) -> str:
    """Create a new random swarm key file (mode 0600) and return its key."""
    key = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{_HEADER}\n{_ENCODING}\n{key}\n")
    return key
