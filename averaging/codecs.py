"""Tensor codecs for the all-reduce: each turns a float32 vector into bytes and back.

Every ``decode`` validates what it is given (exact size, finite values, sane scales and indices) and
raises ``CodecError`` rather than return something wrong. Lossy codecs are paired with error
feedback (``encode_with_feedback``): what compression loses in one round is added to the next.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 256  # values per scale block of the blockwise codecs; chunk sizes are multiples of it


class CodecError(ValueError):
    """A payload that does not decode to a finite vector of the announced size."""


def _blocks(x: np.ndarray) -> np.ndarray:
    """``x`` zero-padded to whole blocks, shaped (blocks, BLOCK)."""
    pad = (-len(x)) % BLOCK
    if pad:
        x = np.concatenate([x, np.zeros(pad, np.float32)])
    return x.reshape(-1, BLOCK)


def _check_finite(values: np.ndarray, what: str) -> None:
    if not np.isfinite(values).all():
        raise CodecError(f"{what} holds NaN or infinity")


class Codec:
    name = "abstract"
    lossy = True

    def encoded_size(self, size: int) -> int:
        raise NotImplementedError

    def encode(self, x: np.ndarray) -> bytes:
        raise NotImplementedError

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        raise NotImplementedError

    def decode(self, data: bytes, size: int) -> np.ndarray:
        """The values in ``data`` (possibly a read-only view of it)."""
        if len(data) != self.encoded_size(size):
            raise CodecError(f"{self.name}: {len(data)} bytes for {size} values, expected {self.encoded_size(size)}")
        values = self._decode(data, size)
        _check_finite(values, self.name)
        return values


class NoCompression(Codec):
    name, lossy = "none", False

    def encoded_size(self, size: int) -> int:
        return 4 * size

    def encode(self, x: np.ndarray) -> bytes:
        return np.ascontiguousarray(x, np.float32).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        return np.frombuffer(data, np.float32)


class Float16(Codec):
    name = "fp16"
    _MAX = float(np.finfo(np.float16).max)

    def encoded_size(self, size: int) -> int:
        return 2 * size

    def encode(self, x: np.ndarray) -> bytes:
        return np.clip(x, -self._MAX, self._MAX).astype(np.float16).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        return np.frombuffer(data, np.float16).astype(np.float32)


class BFloat16(Codec):
    """bfloat16 by rounding the float32 bit pattern to its top 16 bits (nearest, ties to even)."""

    name = "bf16"

    def encoded_size(self, size: int) -> int:
        return 2 * size

    def encode(self, x: np.ndarray) -> bytes:
        # Finite inputs cannot overflow uint32 here: the largest finite pattern is 0xFF7FFFFF.
        bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
        return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)


class _Blockwise(Codec):
    """Symmetric uniform quantization with one float32 scale (absmax / levels) per block."""

    levels = 127

    def _scales(self, blocks: np.ndarray) -> np.ndarray:
        return (np.abs(blocks).max(axis=1) / self.levels).astype(np.float32)

    def _quantize(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = _blocks(x)
        scales = self._scales(blocks)
        safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
        q = np.rint(blocks / safe[:, None]).clip(-self.levels, self.levels).astype(np.int8)
        return scales, q

    def _scales_from(self, data: bytes, nblocks: int) -> np.ndarray:
        scales = np.frombuffer(data, np.float32, count=nblocks)
        _check_finite(scales, f"{self.name} scales")
        if (scales < 0).any():
            raise CodecError(f"{self.name}: negative scale")
        return scales


class Int8Blockwise(_Blockwise):
    name = "int8"

    def encoded_size(self, size: int) -> int:
        return 4 * math.ceil(size / BLOCK) + size

    def encode(self, x: np.ndarray) -> bytes:
        scales, q = self._quantize(x)
        return scales.tobytes() + q.reshape(-1)[: len(x)].tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        nblocks = math.ceil(size / BLOCK)
        scales = self._scales_from(data, nblocks)
        q = np.frombuffer(data, np.int8, offset=4 * nblocks).astype(np.float32)
        if (q == -128).any():
            raise CodecError("int8: value -128 is outside the code range")
        return q * np.repeat(scales, BLOCK)[:size]


class Int4Blockwise(_Blockwise):
    name, levels = "int4", 7

    def encoded_size(self, size: int) -> int:
        return 4 * math.ceil(size / BLOCK) + math.ceil(size / 2)

    def encode(self, x: np.ndarray) -> bytes:
        scales, q = self._quantize(x)
        nibbles = (q.reshape(-1)[: len(x) + len(x) % 2] + 8).astype(np.uint8)
        return scales.tobytes() + ((nibbles[0::2] << 4) | nibbles[1::2]).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        nblocks = math.ceil(size / BLOCK)
        scales = self._scales_from(data, nblocks)
        packed = np.frombuffer(data, np.uint8, offset=4 * nblocks)
        nibbles = np.empty(2 * len(packed), np.uint8)
        nibbles[0::2], nibbles[1::2] = packed >> 4, packed & 0x0F
        if (nibbles == 0).any():
            raise CodecError("int4: code 0 is outside the code range")
        return (nibbles[:size].astype(np.float32) - 8) * np.repeat(scales, BLOCK)[:size]


class SignBlockwise(_Blockwise):
    """1 bit per value (its sign) and one scale per block: the block's mean absolute value."""

    name = "sign1"

    def encoded_size(self, size: int) -> int:
        return 4 * math.ceil(size / BLOCK) + math.ceil(size / 8)

    def encode(self, x: np.ndarray) -> bytes:
        blocks = _blocks(x)
        counts = np.full(len(blocks), BLOCK, np.float32)
        if len(x) % BLOCK:
            counts[-1] = len(x) % BLOCK
        scales = (np.abs(blocks).sum(axis=1) / counts).astype(np.float32)
        return scales.tobytes() + np.packbits(x >= 0).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        nblocks = math.ceil(size / BLOCK)
        scales = self._scales_from(data, nblocks)
        bits = np.unpackbits(np.frombuffer(data, np.uint8, offset=4 * nblocks), count=size)
        return (bits.astype(np.float32) * 2 - 1) * np.repeat(scales, BLOCK)[:size]


class TopK(Codec):
    """The ``ratio`` largest-magnitude values of each chunk, as uint32 indices and float32 values."""

    name = "topk"

    def __init__(self, ratio: float = 0.01) -> None:
        if not 0 < ratio <= 1:
            raise ValueError("top-k ratio must lie in (0, 1]")
        self.ratio = ratio

    def _k(self, size: int) -> int:
        return max(1, math.ceil(self.ratio * size)) if size else 0

    def encoded_size(self, size: int) -> int:
        return 8 * self._k(size)

    def encode(self, x: np.ndarray) -> bytes:
        k = self._k(len(x))
        index = np.sort(np.argpartition(np.abs(x), len(x) - k)[len(x) - k:]).astype(np.uint32)
        return index.tobytes() + x[index].astype(np.float32).tobytes()

    def _decode(self, data: bytes, size: int) -> np.ndarray:
        k = self._k(size)
        index = np.frombuffer(data, np.uint32, count=k)
        values = np.frombuffer(data, np.float32, offset=4 * k)
        if k and int(index.max()) >= size:
            raise CodecError("topk: index out of range")
        out = np.zeros(size, np.float32)
        out[index] = values
        return out


CODECS: dict[str, type[Codec]] = {c.name: c for c in
                                  (NoCompression, Float16, BFloat16, Int8Blockwise, Int4Blockwise, SignBlockwise, TopK)}


def get_codec(name: str) -> Codec:
    """A codec by name: none, fp16, bf16, int8, int4, sign1, topk (1%) or topk:RATIO."""
    base, _, arg = name.partition(":")
    if base not in CODECS:
        raise ValueError(f"unknown codec {name!r}; choose from {', '.join(CODECS)} (topk:RATIO)")
    return TopK(float(arg)) if base == "topk" and arg else CODECS[base]()


def encode_with_feedback(codec: Codec, x: np.ndarray, residual: np.ndarray | None) -> bytes:
    """Encode ``x`` plus the carried error; leave in ``residual`` what this encoding lost."""
    if residual is None or not codec.lossy:
        return codec.encode(x)
    compensated = x + residual
    data = codec.encode(compensated)
    residual[:] = compensated - codec.decode(data, len(x))
    return data
