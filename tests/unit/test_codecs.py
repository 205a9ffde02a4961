"""qcow2 codecs: every deflate stream we write inflates with a 4 KiB window (what QEMU uses), and
decompression stops at exactly one cluster whatever follows."""
from __future__ import annotations

import os
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers import codecs


def _samples():
    rng = random.Random(3)
    words = [rng.randbytes(6).hex().encode() for _ in range(2000)]
    return {
        "words": b" ".join(rng.choice(words) for _ in range(9000))[:65536],
        # repeats at a distance beyond the 4 KiB window: must not be referenced
        "far-repeats": (rng.randbytes(5000) * 14)[:65536],
        "zeros": bytes(65536),
        "random": rng.randbytes(65536),
        "runs": b"".join(bytes([i % 7]) * (i % 5000 + 1) for i in range(200))[:65536],
    }


SAMPLES = _samples()


@pytest.mark.parametrize("data", list(SAMPLES.values()), ids=list(SAMPLES))
@pytest.mark.parametrize("codec", ["zlib", "zstd"])
def test_roundtrip_with_qemu_window(codec, data):
    out = codecs.compress(codec, data, len(data))
    if out is None:
        assert len(zlib.compress(data)) >= len(data) - 64  # only incompressible data may be refused
        return
    if codec == "zlib":
        assert zlib.decompressobj(-12).decompress(out) == data  # QEMU: inflateInit2(&strm, -12)
    assert codecs.decompress(codec, out + os.urandom(100), len(data)) == data


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=1, max_size=65536), st.sampled_from([512, 4096, 65536]))
def test_any_data_inflates_with_a_4k_window(data, cs):
    data = (data * (cs // len(data) + 1))[:cs]
    out = codecs.compress("zlib", data, cs)
    if out is not None:
        assert zlib.decompressobj(-12).decompress(out) == data


def test_corrupt_stream_is_a_value_error():
    with pytest.raises(ValueError):
        codecs.decompress("zlib", b"\xff" * 40, 65536)
    with pytest.raises(ValueError):
        codecs.decompress("zstd", b"\x28\xb5\x2f\xfd" + b"\xff" * 40, 65536)
