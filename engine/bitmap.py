"""Dirty bitmaps: QEMU's BdrvDirtyBitmap (block/dirty-bitmap.c over util/hbitmap.c) as a pure object.

Layer: engine, pure (no I/O, no clock); imports only the standard library and :mod:`engine.errors`.

One bit per ``granularity`` bytes of a disk of ``size`` bytes, kept in a ``bytearray`` with bit *i* in
bit ``i % 8`` (least significant first) of byte ``i // 8``: exactly qcow2's on-disk bitmap data layout,
so serialisation is a copy.  Range updates touch only the bytes of the range; searches for the next
set or clear bit run in C (a compiled regular expression over the bytearray), so walking a sparse
bitmap of 16 M bits costs a few scans, not 16 M Python steps.

Semantics, as QEMU 7.2 has them:

- ``set(offset, length)`` dirties every granule the byte range touches (hbitmap_set rounds outwards).
- ``reset(offset, length)`` requires a granule-aligned start and a granule-aligned length, except that
  the range may end exactly at ``size`` (hbitmap_reset asserts this alignment; rounding either way
  would lose dirtiness or clear more than asked).  A misaligned range raises InvalidArgument instead
  of asserting.
- ``count()`` is QMP's ``count``: dirty granules x granularity, *not* clipped at the end of the disk
  (hbitmap_count); a dirty last granule of a 1000448-byte disk with 64 KiB granularity counts 65536.
- Bits past the last granule are always 0.

Invariants: ``len(self._bits) == ceil(ceil(size / granularity) / 8)``; no bit at or past ``nbits`` is set.
"""
from __future__ import annotations

import re
from collections.abc import Iterator

from engine.errors import BlockError, InvalidArgument

_NONZERO = re.compile(rb"[^\x00]")
_NONFULL = re.compile(rb"[^\xff]")
_MAX_NAME = 1023


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


class DirtyBitmap:
    """A dirty bitmap over a disk of ``size`` bytes.

    Fields: ``name``, ``granularity`` (bytes per bit, a power of two >= 512), ``size``, ``persistent``,
    ``enabled`` (QMP's ``recording``), ``busy`` (in use by an operation), ``inconsistent`` (loaded from an
    image that was not closed cleanly: its content is meaningless), ``readonly`` (loaded from a read-only
    image).
    """

    __slots__ = ("name", "granularity", "size", "persistent", "enabled", "busy", "inconsistent", "readonly",
                 "_shift", "_nbits", "_bits")

    def __init__(self, size: int, granularity: int = 65536, name: str | None = None, persistent: bool = False,
                 enabled: bool = True) -> None:
        """Raises InvalidArgument for a bad granularity (QEMU: a power of two, at least 512), a negative
        size or a name longer than 1023 bytes."""
        if granularity < 512 or granularity & (granularity - 1):
            raise InvalidArgument("Granularity must be power of 2 and at least 512")
        if size < 0:
            raise InvalidArgument("Bitmap size must not be negative")
        if name is not None and len(name.encode("utf-8")) > _MAX_NAME:
            raise InvalidArgument("Bitmap name is too long")
        self.name = name
        self.granularity = granularity
        self.size = size
        self.persistent = persistent
        self.enabled = enabled
        self.busy = False
        self.inconsistent = False
        self.readonly = False
        self._shift = granularity.bit_length() - 1
        self._nbits = _div_up(size, granularity)
        self._bits = bytearray(_div_up(self._nbits, 8))

    def __repr__(self) -> str:
        return (f"DirtyBitmap(name={self.name!r}, size={self.size}, granularity={self.granularity}, "
                f"count={self.count()}, persistent={self.persistent}, enabled={self.enabled})")

    # ------------------------------------------------------------------------------------------------
    # bit-level helpers (granule indices, half-open ranges)
    # ------------------------------------------------------------------------------------------------
    def _set_bits(self, a: int, b: int) -> None:
        if a >= b:
            return
        bits = self._bits
        fa, lb = a >> 3, (b - 1) >> 3
        lo = (0xFF << (a & 7)) & 0xFF
        hi = (1 << (((b - 1) & 7) + 1)) - 1
        if fa == lb:
            bits[fa] |= lo & hi
            return
        bits[fa] |= lo
        if lb > fa + 1:
            bits[fa + 1:lb] = b"\xff" * (lb - fa - 1)
        bits[lb] |= hi

    def _clear_bits(self, a: int, b: int) -> None:
        if a >= b:
            return
        bits = self._bits
        fa, lb = a >> 3, (b - 1) >> 3
        lo = (0xFF << (a & 7)) & 0xFF
        hi = (1 << (((b - 1) & 7) + 1)) - 1
        if fa == lb:
            bits[fa] &= ~(lo & hi) & 0xFF
            return
        bits[fa] &= ~lo & 0xFF
        if lb > fa + 1:
            bits[fa + 1:lb] = bytes(lb - fa - 1)
        bits[lb] &= ~hi & 0xFF

    def _find(self, a: int, b: int, want: int) -> int:
        """The first granule index in [a, b) whose bit equals ``want``; -1 if none."""
        if a >= b:
            return -1
        bits = self._bits
        i = a >> 3
        v = bits[i] if want else bits[i] ^ 0xFF
        v >>= a & 7
        if v:
            k = a + ((v & -v).bit_length() - 1)
            return k if k < b else -1
        end_byte = ((b - 1) >> 3) + 1
        if i + 1 >= end_byte:
            return -1
        m = (_NONZERO if want else _NONFULL).search(bits, i + 1, end_byte)
        if m is None:
            return -1
        j = m.start()
        v = bits[j] if want else bits[j] ^ 0xFF
        k = (j << 3) + ((v & -v).bit_length() - 1)
        return k if k < b else -1

    def _granules(self, offset: int, length: int | None) -> tuple[int, int]:
        """Granule range [a, b) touched by the byte range, clipped to the bitmap."""
        if length is None:
            length = self.size - offset
        if offset < 0 or length < 0:
            raise InvalidArgument(f"Invalid bitmap range {offset}+{length}")
        end = min(offset + length, self.size)
        if offset >= end:
            return 0, 0
        return offset >> self._shift, ((end - 1) >> self._shift) + 1

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(f"Bitmap range {offset}+{length} is beyond the end of the bitmap "
                                  f"({self.size} bytes)")

    # ------------------------------------------------------------------------------------------------
    # QEMU's bdrv_*_dirty_bitmap operations
    # ------------------------------------------------------------------------------------------------
    def set(self, offset: int, length: int) -> None:
        """Dirty every granule touched by [offset, offset+length).  Raises InvalidArgument past the end."""
        self._check_range(offset, length)
        if length:
            self._set_bits(offset >> self._shift, ((offset + length - 1) >> self._shift) + 1)

    def reset(self, offset: int, length: int) -> None:
        """Clean the granules of [offset, offset+length), which must be granule-aligned (its end may also
        be the end of the bitmap).  Raises InvalidArgument for a misaligned range or one past the end."""
        self._check_range(offset, length)
        g = self.granularity
        if offset % g or (length % g and offset + length != self.size):
            raise InvalidArgument(f"Bitmap reset range {offset}+{length} is not aligned to the granularity "
                                  f"({g})")
        if length:
            self._clear_bits(offset >> self._shift, _div_up(offset + length, g))

    def is_dirty(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty (False past the end)."""
        if offset < 0 or offset >= self.size:
            return False
        k = offset >> self._shift
        return bool((self._bits[k >> 3] >> (k & 7)) & 1)

    def count(self) -> int:
        """Dirty bytes as QMP reports them: dirty granules x granularity (the last granule not clipped)."""
        return int.from_bytes(self._bits, "little").bit_count() << self._shift

    def granule_count(self) -> int:
        """The number of dirty granules."""
        return int.from_bytes(self._bits, "little").bit_count()

    def next_dirty(self, offset: int, end: int | None = None) -> int:
        """The first dirty byte offset in [offset, end), rounded down to nothing below ``offset``
        (QEMU's bdrv_dirty_bitmap_next_dirty: the result is max(offset, granule start)); -1 if none."""
        end = self.size if end is None else min(end, self.size)
        if offset < 0 or offset >= end:
            return -1
        k = self._find(offset >> self._shift, ((end - 1) >> self._shift) + 1, 1)
        return -1 if k < 0 else max(offset, k << self._shift)

    def next_clean(self, offset: int, end: int | None = None) -> int:
        """The first clean byte offset in [offset, end); -1 if the whole range is dirty."""
        end = self.size if end is None else min(end, self.size)
        if offset < 0 or offset >= end:
            return -1
        k = self._find(offset >> self._shift, ((end - 1) >> self._shift) + 1, 0)
        return -1 if k < 0 else max(offset, k << self._shift)

    def dirty_extents(self, offset: int = 0, length: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal dirty runs (offset, length) in bytes within [offset, offset+length), clipped to the range
        and to the disk's end.  Lazily generated; each run costs two C-level scans."""
        a, b = self._granules(offset, length)
        lo = max(offset, 0)
        hi = self.size if length is None else min(offset + length, self.size)
        shift = self._shift
        while a < b:
            s = self._find(a, b, 1)
            if s < 0:
                return
            e = self._find(s, b, 0)
            if e < 0:
                e = b
            start = max(lo, s << shift)
            stop = min(hi, e << shift)
            if stop > start:
                yield start, stop - start
            a = e

    def clear(self) -> None:
        """Clean the whole bitmap (block-dirty-bitmap-clear)."""
        self._bits[:] = bytes(len(self._bits))

    def fill(self) -> None:
        """Dirty the whole bitmap."""
        self._set_bits(0, self._nbits)

    def merge_from(self, other: "DirtyBitmap") -> None:
        """Union ``other`` into this bitmap (block-dirty-bitmap-merge).  Granularities may differ: a dirty
        granule of ``other`` dirties every granule of ours it overlaps.  Raises BlockError when the sizes
        differ (QEMU: incompatible bitmaps) or either bitmap cannot be used."""
        self.check_usable(modify=True)
        other.check_usable(modify=False)
        if other.size != self.size:
            raise BlockError("Bitmaps are incompatible and can't be merged")
        if other.granularity == self.granularity:
            if not self._bits:
                return
            merged = int.from_bytes(self._bits, "little") | int.from_bytes(other._bits, "little")
            self._bits[:] = merged.to_bytes(len(self._bits), "little")
            return
        for off, n in other.dirty_extents():
            self.set(off, n)

    def copy(self, name: str | None = None) -> "DirtyBitmap":
        """An independent copy (same flags, except ``busy``), optionally renamed."""
        c = DirtyBitmap(self.size, self.granularity, self.name if name is None else name, self.persistent,
                        self.enabled)
        c._bits[:] = self._bits
        c.inconsistent = self.inconsistent
        c.readonly = self.readonly
        return c

    def resize(self, size: int) -> None:
        """Follow a disk resize (hbitmap_truncate): new granules are clean, bits past a shrunk end go."""
        if size < 0:
            raise InvalidArgument("Bitmap size must not be negative")
        nbits = _div_up(size, self.granularity)
        nbytes = _div_up(nbits, 8)
        if nbytes < len(self._bits):
            del self._bits[nbytes:]
        elif nbytes > len(self._bits):
            self._bits.extend(bytes(nbytes - len(self._bits)))
        if nbits & 7 and nbits < self._nbits:
            self._bits[-1] &= (1 << (nbits & 7)) - 1
        self._nbits = nbits
        self.size = size

    def check_usable(self, modify: bool) -> None:
        """QEMU's bdrv_dirty_bitmap_check: raise BlockError when the bitmap is busy, inconsistent or (for a
        modification) read-only."""
        if self.busy:
            raise BlockError(f"Bitmap '{self.name}' is currently in use by another operation and cannot be "
                             "used")
        if modify and self.readonly:
            raise BlockError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if self.inconsistent:
            raise BlockError(f"Bitmap '{self.name}' is inconsistent and cannot be used")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return (self.size, self.granularity, bytes(self._bits)) == (other.size, other.granularity,
                                                                    bytes(other._bits))

    __hash__ = None  # type: ignore[assignment]

    # ------------------------------------------------------------------------------------------------
    # serialisation (qcow2 bitmap data)
    # ------------------------------------------------------------------------------------------------
    def serialized_size(self) -> int:
        """Bytes of the on-disk form: ceil(ceil(size / granularity) / 8) (get_bitmap_bytes_needed)."""
        return len(self._bits)

    def to_disk_bytes(self) -> bytes:
        """The bitmap in qcow2's layout: bit i of the disk is bit i % 8 of byte i // 8; tail bits 0."""
        return bytes(self._bits)

    def load_disk_bytes(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        """Overwrite serialised bytes starting at byte ``offset`` of the on-disk form (one bitmap cluster
        at a time); bytes past the end are ignored and tail bits past the last granule are dropped."""
        n = max(0, min(len(data), len(self._bits) - offset))
        if n:
            self._bits[offset:offset + n] = data[:n]
        self._mask_tail()

    def fill_disk_range(self, offset: int, length: int) -> None:
        """Set every bit of serialised bytes [offset, offset+length) (a qcow2 'all ones' table entry)."""
        end = min(offset + length, len(self._bits))
        if end > offset:
            self._bits[offset:end] = b"\xff" * (end - offset)
        self._mask_tail()

    def _mask_tail(self) -> None:
        if self._nbits & 7 and self._bits:
            self._bits[-1] &= (1 << (self._nbits & 7)) - 1

    @classmethod
    def from_disk_bytes(cls, data: bytes | bytearray | memoryview, size: int, granularity: int = 65536,
                        name: str | None = None, persistent: bool = False,
                        enabled: bool = True) -> "DirtyBitmap":
        """Build a bitmap from its qcow2 form; short data means clean tail granules."""
        bm = cls(size, granularity, name, persistent, enabled)
        bm.load_disk_bytes(data, 0)
        return bm
