"""qcow2's compression codecs: raw deflate (window bits -12, as QEMU writes) and zstd.

Layer: workers.  Pure functions over bytes.  Deflate uses ISA-L (PyPI ``isal``) when it is installed: about
10x faster than zlib here and no larger.  Its streams use a 4 KiB window, so QEMU's ``inflateInit2(-12)``
reads them; tests/unit/test_codecs.py proves that with zlib's own -12 inflater.
"""
from __future__ import annotations

import zlib
from typing import Any

# isal and zstandard are imported on first use: an uncompressed convert never pays for them (every
# worker is a fork of the coordinator, so what the coordinator imports is start-up time of the CLI)
_fast_deflate: Any = None
_zstd: Any = None


def _isal() -> Any:
    global _fast_deflate
    if _fast_deflate is None:
        found: Any = False
        try:
            from isal import isal_zlib as found
        except ImportError:  # pragma: no cover - isal is a declared dependency; zlib stays correct without it
            pass
        _fast_deflate = found
    return _fast_deflate


def _zstandard() -> Any:
    global _zstd
    if _zstd is None:
        import zstandard

        _zstd = zstandard
    return _zstd


def _deflate(data: bytes) -> bytes:
    fast = _isal()
    if fast:
        c = fast.compressobj(1, fast.DEFLATED, -12, 9)
    else:
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9)
    return c.compress(data) + c.flush()


def compress(codec: str, data: bytes, limit: int) -> bytes | None:
    """Compress ``data``; return None when the result would not be shorter than ``limit`` bytes."""
    if codec == "zlib":
        out = _deflate(data)
    elif codec == "zstd":
        out = _zstandard().ZstdCompressor(level=3, write_content_size=False).compress(data)
    else:
        raise ValueError(f"unknown compression codec '{codec}'")
    if len(out) >= limit:
        return None
    return out


def decompress(codec: str, data: bytes, out_len: int) -> bytes:
    """Produce exactly ``out_len`` bytes from ``data``; stop there and ignore the rest.

    Raises ValueError when the stream is corrupt or ends early.
    """
    if codec == "zlib":
        d = zlib.decompressobj(-15)
        try:
            out = d.decompress(data, out_len)
        except zlib.error as exc:
            raise ValueError(f"corrupt deflate stream: {exc}") from None
    elif codec == "zstd":
        zstandard = _zstandard()
        out = b""
        buf = data
        try:
            while len(out) < out_len and buf[:4] == b"\x28\xb5\x2f\xfd":
                d = zstandard.ZstdDecompressor().decompressobj()
                out += d.decompress(buf)
                buf = d.unused_data
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt zstd stream: {exc}") from None
        out = out[:out_len]
    else:
        raise ValueError(f"unknown compression codec '{codec}'")
    if len(out) != out_len:
        raise ValueError("compressed cluster decompressed to fewer bytes than a cluster")
    return out
