"""Pure parts: size parsing/rendering and qcow2 on-disk structures."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.errors import ImageOpenError, InvalidArgument
from engine.formats import qcow2_layout as L
from engine.units import human_size, parse_size


@pytest.mark.parametrize("text,value", [("512", 512), ("4k", 4096), ("4K", 4096), ("64M", 64 << 20),
                                        ("1.5G", 3 << 29), ("2T", 2 << 40), ("10b", 10), ("0", 0)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-5", "5X", "1..5G", "4kk"])
def test_parse_size_rejects(text):
    with pytest.raises(InvalidArgument):
        parse_size(text)


@pytest.mark.parametrize("n,text", [(0, "0 B"), (512, "512 B"), (65536, "64 KiB"), (67108864, "64 MiB"),
                                    (1610612736, "1.5 GiB"), (200704, "196 KiB"), (1000448, "977 KiB"),
                                    (1023 * 1024, "0.999 MiB")])
def test_human_size_matches_qemu(n, text):
    assert human_size(n) == text


@given(order=st.integers(0, 6), data=st.data())
def test_refcount_packing_roundtrip(order, data):
    cbits = 9
    n = L.refcounts_per_block(cbits, order)
    block = bytearray(1 << cbits)
    model = {}
    for _ in range(20):
        i = data.draw(st.integers(0, n - 1))
        v = data.draw(st.integers(0, (1 << (1 << order)) - 1))
        L.set_refcount(block, i, v, order)
        model[i] = v
    for i, v in model.items():
        assert L.get_refcount(block, i, order) == v


def test_sub_byte_refcounts_are_lsb_first():
    block = bytearray(4)
    L.set_refcount(block, 0, 1, 0)
    assert block[0] == 0x01
    L.set_refcount(block, 1, 3, 1)
    assert block[0] == 0x01 | (3 << 2)


def _header(**kw):
    h = L.Qcow2Header(cluster_bits=16, size=1 << 20, l1_size=1, l1_table_offset=3 << 16,
                      refcount_table_offset=1 << 16, refcount_table_clusters=1, **kw)
    return h


def test_header_roundtrip_keeps_unknown_extension_and_fields():
    h = _header(backing_file="base.img", backing_format="raw", header_length=120,
                extra_fields=b"\0\0\0\0\0\0\0\x07\x07\x07\x07\x07\x07\x07\x07")
    h.unknown_exts.append((0x12345678, b"hello"))
    raw = L.serialize_header(h)
    g = L.parse_header(raw + bytes(65536 - len(raw)))
    assert g.backing_file == "base.img" and g.backing_format == "raw"
    assert g.unknown_exts == [(0x12345678, b"hello")]
    assert g.header_length == 120 and g.extra_fields[:7] == bytes(7)
    assert L.serialize_header(g) == raw


def test_unknown_incompatible_bit_is_refused():
    h = _header(incompatible_features=1 << 5)
    raw = L.serialize_header(h)
    with pytest.raises(ImageOpenError, match="Unknown incompatible feature: 20"):
        L.parse_header(raw + bytes(65536 - len(raw)))


def test_feature_table_dropped_when_cluster_zero_is_small():
    h = L.Qcow2Header(cluster_bits=9, size=1 << 20, l1_size=32, l1_table_offset=3 * 512,
                      refcount_table_offset=512, refcount_table_clusters=1)
    raw = L.serialize_header(h)
    assert len(raw) <= 512
    assert L.parse_header(raw + bytes(512 - len(raw))).had_feature_table is False


@given(offset=st.integers(0, (1 << 40)) , clen=st.integers(1, 65535), cbits=st.integers(9, 21))
def test_compressed_descriptor_roundtrip(offset, clen, cbits):
    clen = min(clen, (1 << cbits) - 1)
    entry = L.encode_compressed(offset, clen, cbits)
    off, readlen = L.decode_compressed(entry, cbits)
    assert off == offset
    assert readlen >= clen
    start, end = L.compressed_host_range(entry, cbits)
    assert start <= offset and end >= offset + clen


@given(st.binary(min_size=0, max_size=600))
def test_parse_header_never_crashes_on_garbage(buf):
    head = b"QFI\xfb\x00\x00\x00\x03" + buf
    try:
        L.parse_header(head)
    except ImageOpenError:
        pass


def test_every_registered_format_is_loadable_by_name():
    """engine.formats imports driver modules on demand: every module that registers a format must be
    listed in DRIVER_MODULES under that format's name, or ``-f NAME`` would not find it."""
    import re
    from pathlib import Path

    import engine.formats as F

    root = Path(F.__file__).parent
    found = {}
    for path in root.glob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"@register\s+class \w+\(.*?\):.*?format_name = \"(\w+)\"", text, re.S):
            found[m.group(1)] = path.stem
    assert found and found == F.DRIVER_MODULES
