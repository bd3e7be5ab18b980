"""Fetching a training state from one peer: a snapshot of named tensors at a round boundary.

The state travels as a layout header and raw tensor bytes in checksummed frames; it is never
unpickled, and the reader checks names, dtypes, shapes and the total size before it allocates."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from averaging.wire import FrameError, read_frame, write_frame

log = logging.getLogger(__name__)

PROTOCOL = "/legion/state/1.0.0"
CHUNK = 1 << 20
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
MAX_TENSORS = 10_000

# () -> (run id, round, named tensors) of the newest snapshot, or None before there is one
SnapshotSource = Callable[[], "tuple[str, int, dict[str, torch.Tensor]] | None"]


class StateTransferError(Exception):
    """The donor refused, broke off, or sent a state that does not parse."""


def _to_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


async def serve_state(stream: INetStream, source: SnapshotSource, timeout: float = 60.0) -> None:
    peer = stream.muxed_conn.peer_id.to_base58()
    try:
        with trio.fail_after(timeout):
            request, _ = await read_frame(stream, 0)
            snapshot = source()
            if request.get("t") != "get" or snapshot is None or request.get("run") != snapshot[0]:
                await write_frame(stream, {"t": "none"})
                return
            run_id, round_, tensors = snapshot
            layout = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]
            await write_frame(stream, {"t": "state", "run": run_id, "round": round_, "layout": layout})
            for tensor in tensors.values():
                data = await trio.to_thread.run_sync(_to_bytes, tensor)
                for offset in range(0, len(data), CHUNK):
                    await write_frame(stream, {}, data[offset:offset + CHUNK])
            log.info("served round %d state to %s", round_, peer)
    except (FrameError, trio.TooSlowError) as exc:
        log.info("state transfer to %s ended: %s", peer, exc)
    finally:
        with trio.move_on_after(1), contextlib.suppress(Exception):
            await stream.close()


def _layout(header: dict, max_bytes: int) -> list[tuple[str, torch.dtype, list[int], int]]:
    layout = header.get("layout")
    if not isinstance(layout, list) or len(layout) > MAX_TENSORS or not isinstance(header.get("round"), int):
        raise StateTransferError("malformed state header")
    out, total = [], 0
    for item in layout:
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and item[1] in DTYPES
                and isinstance(item[2], list) and all(isinstance(d, int) and d >= 0 for d in item[2])):
            raise StateTransferError(f"malformed tensor entry {item!r:.100}")
        dtype = DTYPES[item[1]]
        count = 1
        for d in item[2]:
            count *= d
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        total += nbytes
        if total > max_bytes:
            raise StateTransferError(f"state larger than the {max_bytes} bytes allowed")
        out.append((item[0], dtype, item[2], nbytes))
    return out


async def fetch_state(host: IHost, peer: str, run_id: str, *, max_bytes: int,
                      timeout: float = 120.0) -> tuple[int, dict[str, torch.Tensor]]:
    """The donor's newest snapshot as ``(round, tensors)``."""
    try:
        with trio.fail_after(timeout):
            stream = await host.new_stream(ID.from_base58(peer), [PROTOCOL])
            try:
                await write_frame(stream, {"t": "get", "run": run_id})
                header, _ = await read_frame(stream, 0)
                if header.get("t") != "state" or header.get("run") != run_id:
                    raise StateTransferError(f"{peer} has no state of run {run_id}")
                tensors = {}
                for name, dtype, shape, nbytes in _layout(header, max_bytes):
                    buffer = bytearray()
                    while len(buffer) < nbytes:
                        _, payload = await read_frame(stream, CHUNK)
                        if not payload or len(buffer) + len(payload) > nbytes:
                            raise StateTransferError(f"tensor {name}: chunk overruns its {nbytes} bytes")
                        buffer += payload
                    tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(shape) if nbytes else \
                        torch.zeros(shape, dtype=dtype)
                return header["round"], tensors
            finally:
                with trio.move_on_after(1), contextlib.suppress(Exception):
                    await stream.close()
    except FrameError as exc:
        raise StateTransferError(f"state from {peer}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise StateTransferError(f"state from {peer} not complete within {timeout:g}s") from exc
    except StateTransferError:
        raise
    except Exception as exc:  # dial failures, resets: libp2p raises many kinds
        raise StateTransferError(f"state from {peer}: {type(exc).__name__}: {exc}") from exc
