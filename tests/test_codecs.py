"""Codecs: round trips, validation of hostile payloads, and error feedback."""

import numpy as np
import pytest

from averaging.codecs import CODECS, CodecError, encode_with_feedback, get_codec
from averaging.wire import FrameError, read_frame, write_frame

ALL = [*CODECS, "topk:0.05"]


@pytest.mark.parametrize("name", ALL)
def test_round_trip_has_the_announced_size_and_is_finite(name):
    codec = get_codec(name)
    for size in (1, 255, 256, 1000, 4097):
        x = np.random.default_rng(size).standard_normal(size).astype(np.float32)
        data = codec.encode(x)
        assert len(data) == codec.encoded_size(size)
        y = codec.decode(data, size)
        assert y.shape == (size,) and y.dtype == np.float32 and np.isfinite(y).all()


@pytest.mark.parametrize("name", ALL)
def test_wrong_sized_payloads_are_rejected(name):
    codec = get_codec(name)
    data = codec.encode(np.ones(1000, np.float32))
    for bad in (data[:-1], data + b"\0", b""):
        with pytest.raises(CodecError):
            codec.decode(bad, 1000)


def test_nan_infinite_and_out_of_range_payloads_are_rejected():
    with pytest.raises(CodecError, match="NaN"):
        get_codec("none").decode(np.array([1, np.nan], np.float32).tobytes(), 2)
    with pytest.raises(CodecError, match="NaN"):
        get_codec("fp16").decode(np.array([np.inf, 0], np.float16).tobytes(), 2)
    int8 = get_codec("int8")
    bad_scale = np.array([np.inf], np.float32).tobytes() + bytes(10)
    with pytest.raises(CodecError):
        int8.decode(bad_scale, 10)
    negative = np.array([-1.0], np.float32).tobytes() + bytes(10)
    with pytest.raises(CodecError, match="negative"):
        int8.decode(negative, 10)
    with pytest.raises(CodecError, match="-128"):
        int8.decode(np.array([1.0], np.float32).tobytes() + b"\x80" * 10, 10)
    topk = get_codec("topk:0.5")
    index = np.array([0, 99], np.uint32).tobytes()
    with pytest.raises(CodecError, match="index"):
        topk.decode(index + np.ones(2, np.float32).tobytes(), 4)


def test_fp16_clips_instead_of_overflowing():
    y = get_codec("fp16").decode(get_codec("fp16").encode(np.array([1e9, -1e9], np.float32)), 2)
    assert np.isfinite(y).all() and y[0] > 6e4 and y[1] < -6e4


@pytest.mark.parametrize("name", ["int4", "sign1", "topk"])
def test_error_feedback_carries_the_loss_into_later_rounds(name):
    """Sending the same vector repeatedly, the mean of what arrives converges to it; without
    feedback the error stays."""
    codec = get_codec(name)
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    residual = np.zeros_like(x)
    rounds = 1000
    with_feedback = sum(codec.decode(encode_with_feedback(codec, x, residual), len(x)) for _ in range(rounds)) / rounds
    without = codec.decode(codec.encode(x), len(x))
    error_with = np.linalg.norm(with_feedback - x) / np.linalg.norm(x)
    error_without = np.linalg.norm(without - x) / np.linalg.norm(x)
    assert error_with < 0.1 * error_without, (error_with, error_without)


class _Pipe:
    """An in-memory stream with libp2p's read/write signature, to feed read_frame hostile bytes."""

    def __init__(self, data=b""):
        self.data = bytearray(data)

    async def write(self, data):
        self.data += data

    async def read(self, n):
        chunk, self.data = bytes(self.data[:n]), self.data[n:]
        if not chunk:
            raise EOFError
        return chunk


async def test_frames_round_trip_and_bad_frames_are_rejected():
    pipe = _Pipe()
    await write_frame(pipe, {"a": 1}, b"payload" * 100_000)
    header, payload = await read_frame(_Pipe(pipe.data), max_payload=1 << 20)
    assert header == {"a": 1} and payload == b"payload" * 100_000
    with pytest.raises(FrameError, match="exceeds"):
        await read_frame(_Pipe(pipe.data), max_payload=1000)
    corrupt = bytearray(pipe.data)
    corrupt[-1] ^= 0xFF
    with pytest.raises(FrameError, match="checksum"):
        await read_frame(_Pipe(corrupt), max_payload=1 << 20)
    with pytest.raises(FrameError, match="ended"):
        await read_frame(_Pipe(pipe.data[:-10]), max_payload=1 << 20)
    with pytest.raises(FrameError):
        await read_frame(_Pipe(b"\xff" * 12), max_payload=1 << 20)
