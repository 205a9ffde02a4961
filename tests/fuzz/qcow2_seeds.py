"""Small valid qcow2 images made by qemu-img/qemu-io, and an independent parser that lists the offsets of
their metadata fields (header, extensions, L1/L2 entries, refcount table and blocks, snapshot table,
bitmap directory and bitmap tables), so the fuzzer can aim its mutations at them."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from tests.util import qemu_img, qemu_io

# name -> builder(dir) -> path of the image to fuzz (backing files live next to it)
SEEDS = ("v2_snap", "v3_4k_all", "compressed_64k", "extl2_16k", "backing_512", "bitmaps_64k")


def build(name: str, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.qcow2"
    if name == "v2_snap":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", str(p), "1M")
        qemu_io("-c", "write -P 0x11 0 12k", "-c", "write -P 0x22 512k 4k", str(p))
        qemu_img("snapshot", "-c", "s1", str(p))
        qemu_io("-c", "write -P 0x33 0 4k", "-c", "write -z 512k 4k", str(p))
    elif name == "v3_4k_all":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,lazy_refcounts=on", str(p), "2M")
        qemu_io("-c", "write -P 0x11 0 8k", "-c", "write -c -P 0x44 64k 8k", "-c", "write -z 1M 8k",
                "-c", "write -P 0x55 1536k 4k", str(p))
        qemu_img("snapshot", "-c", "s1", str(p))
        qemu_img("snapshot", "-c", "second", str(p))
        qemu_io("-c", "write -P 0x66 4k 4k", str(p))
        qemu_img("bitmap", "--add", str(p), "b0")
        qemu_io("-c", "write -P 0x77 1M 4k", str(p))
    elif name == "compressed_64k":
        raw = d / f"{name}.raw"
        qemu_img("create", "-q", "-f", "raw", str(raw), "1M")
        qemu_io("-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 128k 100k",
                "-c", "write -P 0 300k 64k", str(raw))
        qemu_img("convert", "-c", "-O", "qcow2", str(raw), str(p))
        raw.unlink()
    elif name == "extl2_16k":
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k", str(p), "1M")
        qemu_io("-c", "write -P 0x11 0 1k", "-c", "write -P 0x22 20k 2k", "-c", "write -z 40k 1k",
                "-c", "write -P 0x33 256k 16k", str(p))
        qemu_img("snapshot", "-c", "s1", str(p))
    elif name == "backing_512":
        base = d / f"{name}_base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=2", str(base), "256k")
        qemu_io("-c", "write -P 0xaa 0 64k", str(base))
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=2",
                 "-b", base.name, "-F", "qcow2", str(p))
        qemu_io("-c", "write -P 0xbb 4k 2k", "-c", "write -z 8k 1k", "-c", "write -P 0xcc 100k 512", str(p))
    elif name == "bitmaps_64k":
        qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
        qemu_img("bitmap", "--add", str(p), "b0")
        qemu_img("bitmap", "--add", "-g", "128k", str(p), "b1")
        qemu_io("-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 2M 64k", str(p))
        qemu_img("bitmap", "--disable", str(p), "b1")
    else:
        raise KeyError(name)
    return p


@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    width: int  # 1, 2, 4 or 8 bytes, big-endian


def fields(data: bytes) -> list[Field]:
    """Every metadata field we know how to find in ``data`` (a valid image)."""
    out: list[Field] = []
    u32 = lambda o: struct.unpack_from(">I", data, o)[0]
    u64 = lambda o: struct.unpack_from(">Q", data, o)[0]
    add = lambda n, o, w: out.append(Field(n, o, w)) if o + w <= len(data) else None
    hdr = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
           ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
           ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
           ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8)]
    version = u32(4)
    if version >= 3:
        hdr += [("incompatible_features", 72, 8), ("compatible_features", 80, 8),
                ("autoclear_features", 88, 8), ("refcount_order", 96, 4), ("header_length", 100, 4),
                ("compression_type", 104, 1)]
    for n, o, w in hdr:
        add(n, o, w)
    cs = 1 << u32(20)
    hlen = u32(100) if version >= 3 else 72
    # header extensions
    o = hlen
    bitmaps_ext = None
    while o + 8 <= min(len(data), cs):
        etype, elen = u32(o), u32(o + 4)
        add(f"ext@{o}.type", o, 4)
        add(f"ext@{o}.len", o + 4, 4)
        if etype == 0:
            break
        if etype == 0x23852875 and elen >= 24:
            bitmaps_ext = o + 8
            for n, off, w in (("nb_bitmaps", 0, 4), ("bitmap_directory_size", 8, 8),
                              ("bitmap_directory_offset", 16, 8)):
                add(f"bitmaps_ext.{n}", o + 8 + off, w)
        o += 8 + (elen + 7) // 8 * 8
    # L1 -> L2
    l1_off, l1_size = u64(40), u32(36)
    l2_entries = cs // (16 if version >= 3 and u64(72) & 16 else 8)
    ext_l2 = version >= 3 and bool(u64(72) & 16)

    def l1_l2(tag: str, l1o: int, l1n: int) -> None:
        for i in range(min(l1n, 64)):
            add(f"{tag}.l1[{i}]", l1o + 8 * i, 8)
            if l1o + 8 * i + 8 > len(data):
                break
            l2 = u64(l1o + 8 * i) & 0x00FFFFFFFFFFFE00
            if not l2:
                continue
            step = 16 if ext_l2 else 8
            for j in range(l2_entries):
                e = l2 + j * step
                if e + 8 > len(data):
                    break
                if u64(e) or (ext_l2 and u64(e + 8)):
                    add(f"{tag}.l2[{i}][{j}]", e, 8)
                    if ext_l2:
                        add(f"{tag}.l2[{i}][{j}].bitmap", e + 8, 8)
    l1_l2("active", l1_off, l1_size)
    # refcount table -> refblocks
    rt, rtc = u64(48), u32(56)
    for i in range(min(rtc * cs // 8, 64)):
        if rt + 8 * i + 8 > len(data):
            break
        rb = u64(rt + 8 * i)
        if rb or i < 2:
            add(f"reftable[{i}]", rt + 8 * i, 8)
        if rb and rb + cs <= len(data):
            for k in range(0, min(cs, 256), 8):  # the first refcounts, whatever their width
                add(f"refblock[{i}]+{k}", rb + k, 8)
    # snapshot table
    so, ns = u64(64), u32(60)
    for s in range(min(ns, 8)):
        if so + 40 > len(data):
            break
        for n, off, w in (("l1_table_offset", 0, 8), ("l1_size", 8, 4), ("id_str_size", 12, 2),
                          ("name_size", 14, 2), ("date_sec", 16, 4), ("vm_state_size", 32, 4),
                          ("extra_data_size", 36, 4)):
            add(f"snap[{s}].{n}", so + off, w)
        extra = u32(so + 36)
        if extra >= 16:
            add(f"snap[{s}].vm_state_size_large", so + 40, 8)
            add(f"snap[{s}].disk_size", so + 48, 8)
        l1_l2(f"snap[{s}]", u64(so), u32(so + 8))
        idn, nn = struct.unpack_from(">HH", data, so + 12)
        so += (40 + extra + idn + nn + 7) // 8 * 8
    # bitmap directory and bitmap tables
    if bitmaps_ext is not None:
        nb, do = u32(bitmaps_ext), u64(bitmaps_ext + 16)
        for b in range(min(nb, 8)):
            if do + 24 > len(data):
                break
            for n, off, w in (("table_offset", 0, 8), ("table_size", 8, 4), ("flags", 12, 4),
                              ("type", 16, 1), ("granularity_bits", 17, 1), ("name_size", 18, 2),
                              ("extra_data_size", 20, 4)):
                add(f"bitmap[{b}].{n}", do + off, w)
            to, tsz = u64(do), u32(do + 8)
            for t in range(min(tsz, 16)):
                add(f"bitmap[{b}].table[{t}]", to + 8 * t, 8)
            ns_, ex = struct.unpack_from(">HI", data, do + 18)
            do += (24 + ex + ns_ + 7) // 8 * 8
    return out
