"""Reader interop: for every qcow2 variant qemu-img 7.2 can make (but encryption and external data files),
an image made by qemu-img/qemu-io reads back byte-identical (against ``qemu-img convert -O raw``), and
``parablock info``/``map`` JSON equals qemu-img's on every field it prints.

Each case builds its image in ``tmp_path`` with qemu-img/qemu-io (one qemu-io invocation with many ``-c``),
then checks, from ``tmp_path`` as the working directory so that file names print the same:
  (a) ``read_all`` == ``qemu-img convert -O raw``;
  (b) ``parablock map --output=json`` == ``qemu-img map --output=json`` (full lists);
  (c) ``parablock info --output=json`` (``--backing-chain`` for chains) == qemu-img's, ``actual-size``
      included (both outputs are also compared as exact text);
  (d) every internal snapshot read through ``load_snapshot_readonly`` == ``qemu-img convert -l NAME``;
  (e) reading never modifies the image file.
"""
from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from tests.util import needs_qemu, open_node, parablock, qemu_img, qemu_io, read_all

pytestmark = needs_qemu

K = 1024
M = 1024 * 1024


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    path: str  # relative to the test's directory
    chain: bool = False  # compare info --backing-chain too
    snapshots: list[str] = field(default_factory=list)
    expect_dirty: bool | None = None
    expect_corrupt: bool | None = None


def create(tmp: Path, name: str, size: int | str | None, opts: str = "", backing: str | None = None,
           bfmt: str | None = None) -> None:
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    if backing:
        args += ["-b", backing, "-F", bfmt or "raw"]
    args.append(name)
    if size is not None:
        args.append(str(size))
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    qemu_img(*args, cwd=tmp)


def qio(tmp: Path, name: str, cmds: list[str], fmt: str = "qcow2", check: bool = True) -> None:
    args = ["-f", fmt]
    for c in cmds:
        args += ["-c", c]
    qemu_io(*args, name, cwd=tmp, check=check)


def fill_cmds(size: int, cs: int) -> list[str]:
    """qemu-io pattern writes at several offsets, partial clusters included."""
    return [
        "write -P 0xa1 0 3k",
        f"write -P 0xa2 {3 * cs + 1000} 5000",
        f"write -P 0xa3 {size // 4} 192k",
        f"write -P 0xa4 {size // 2 + 100} 100",
        f"write -P 0xa5 {size - 7000} 7000",
    ]


def fill(tmp: Path, name: str, size: int, cs: int = 64 * K, extra: list[str] | None = None) -> None:
    qio(tmp, name, fill_cmds(size, cs) + (extra or []))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def semi_compressible(size: int, cs: int, seed: int = 1) -> bytes:
    """Clusters of mixed content: half random/half text, fully random, all zero, a byte pattern."""
    rng = random.Random(seed)
    out = bytearray()
    i = 0
    while len(out) < size:
        kind = i % 5
        if kind in (0, 3):
            half = cs // 2
            out += rng.randbytes(half) + (b"parablock qcow2 " * (cs // 16))[:cs - half]
        elif kind == 1:
            out += rng.randbytes(cs)
        elif kind == 2:
            out += bytes(cs)
        else:
            out += bytes([i & 0xFF]) * cs
        i += 1
    return bytes(out[:size])


def pb_json(tmp: Path, *args: str):
    p = parablock(*args, "--output=json", cwd=tmp)
    return json.loads(p.stdout)


# header patching -------------------------------------------------------------------------------------
def _exts(buf: bytes, start: int) -> tuple[list[tuple[int, bytes]], int]:
    """Header extensions from ``start``; returns (list, offset just past the terminator)."""
    out = []
    off = start
    while True:
        t, n = struct.unpack_from(">II", buf, off)
        off += 8
        if t == 0:
            return out, off
        out.append((t, bytes(buf[off:off + n])))
        off += (n + 7) & ~7


def _pack_exts(exts: list[tuple[int, bytes]]) -> bytes:
    b = b""
    for t, d in exts:
        b += struct.pack(">II", t, len(d)) + d + bytes((-len(d)) % 8)
    return b + bytes(8)


def patch_header(p: Path, *, incompat: int = 0, compat: int = 0, autoclear: int = 0, clear_autoclear: int = 0,
                 add_ext: tuple[int, bytes] | None = None, header_length: int | None = None) -> None:
    """OR feature bits into a v3 header (no backing file), add an extension, or shrink header_length."""
    buf = bytearray(p.read_bytes()[:65536])
    inc, com, auto = struct.unpack_from(">QQQ", buf, 72)
    struct.pack_into(">QQQ", buf, 72, inc | incompat, com | compat, (auto | autoclear) & ~clear_autoclear)
    hl = struct.unpack_from(">I", buf, 100)[0]
    if add_ext is not None or header_length is not None:
        assert struct.unpack_from(">Q", buf, 8)[0] == 0, "no backing file expected"
        exts, end = _exts(buf, hl)
        if add_ext is not None:
            exts.append(add_ext)
        new_hl = header_length if header_length is not None else hl
        if header_length is not None:
            assert buf[104] == 0  # zlib: the compression_type byte may go
        area = _pack_exts(exts)
        lo = min(hl, new_hl)
        buf[lo:end] = bytes(end - lo)
        if new_hl > 112:  # unknown additional header fields (ignorable: no incompatible bit)
            buf[112:new_hl] = b"\xab" * (new_hl - 112)
        buf[new_hl:new_hl + len(area)] = area
        struct.pack_into(">I", buf, 100, new_hl)
    with open(p, "r+b") as f:
        f.write(bytes(buf))


# ------------------------------------------------------------------------------------------------------
# variants: each builds its image(s) in tmp and returns the Case to check
# ------------------------------------------------------------------------------------------------------
VARIANTS: dict[str, Callable[[Path], Case]] = {}


def variant(name: str):
    def deco(fn):
        VARIANTS[name] = fn
        return fn
    return deco


def simple(name: str, opts: str, size: int = 4 * M, cs: int = 64 * K, extra: list[str] | None = None) -> None:
    def build(tmp: Path) -> Case:
        create(tmp, "img.qcow2", size, opts)
        fill(tmp, "img.qcow2", size, cs, extra)
        return Case("img.qcow2")
    VARIANTS[name] = build


simple("v2", "compat=0.10")
simple("v3", "compat=1.1")
simple("v2_zero_writes", "compat=0.10", extra=["write -z 0 64k", "write -z 2m 64k", "write -z 3m 4k"])
for _cs, _size in ((512, 1 * M), (1024, 2 * M), (4096, 4 * M), (65536, 4 * M), (2 * M, 8 * M)):
    simple(f"cluster_{_cs}", f"cluster_size={_cs}", _size, _cs)
simple("cluster_512_v2", "compat=0.10,cluster_size=512", 1 * M, 512)
for _rb in (1, 2, 4, 8, 16, 32, 64):
    simple(f"refcount_bits_{_rb}", f"refcount_bits={_rb}")
simple("refcount_bits_2_cluster_1k", "refcount_bits=2,cluster_size=1024", 2 * M, 1024)
simple("lazy_refcounts_clean", "lazy_refcounts=on")
simple("size_not_cluster_multiple", "", 1000001)
simple("size_not_cluster_multiple_2m", "cluster_size=2M", 1000001)
simple("zero_clusters", "", extra=[
    "write -z 0 64k",            # over data, keeps the offset
    "write -z -u 1m 64k",        # over data, unmapped
    "write -z 2m 192k",          # over nothing
    "write -z 3m 4k",            # partial: a zeroed subrange of a data cluster
    f"write -z -u {3 * M + 64 * K} 128k",
])
simple("zero_clusters_4k", "cluster_size=4096", extra=["write -z 0 8k", "write -z -u 1m 16k",
                                                        "write -z 2m 1k"])
simple("prealloc_metadata", "preallocation=metadata")
simple("prealloc_metadata_zero", "preallocation=metadata", extra=["write -z 0 128k", "write -z -u 2m 64k"])
simple("prealloc_falloc", "preallocation=falloc", extra=["write -z 2m 64k", "discard 3m 64k"])
simple("prealloc_full", "preallocation=full", extra=["write -z 2m 64k"])
simple("prealloc_metadata_2m", "preallocation=metadata,cluster_size=2M", 8 * M, 2 * M)
simple("prealloc_metadata_extended_l2", "preallocation=metadata,extended_l2=on",
       extra=["write -z 2m 4k", "write -z -u 3m 64k"])
simple("extended_l2_no_backing", "extended_l2=on,cluster_size=32k", cs=32 * K,
       extra=["write -z 2m 1k", "write -z -u 3m 96k", "discard 1m 64k", "write -c -P 0x66 2560k 32k"])
simple("discard_v3", "", extra=["discard 0 64k", "discard 1m 128k", "discard 2m 4k"])
simple("lazy_refcounts_compressed", "lazy_refcounts=on", extra=["write -c -P 0x5c 2560k 64k"])
simple("compressed_write_zlib", "", extra=["write -c -P 0x5c 2560k 64k", "write -c -P 0x5d 2688k 128k"])
simple("compressed_write_zstd", "compression_type=zstd",
       extra=["write -c -P 0x5c 2560k 64k", "write -c -P 0x5d 2688k 128k"])


@variant("lazy_refcounts_dirty")
def _lazy_dirty(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 4 * M, "lazy_refcounts=on")
    fill(tmp, "img.qcow2", 4 * M)
    # new allocations (refcount updates deferred), then a crash
    qio(tmp, "img.qcow2", ["write -P 1 2560k 64k", "write -P 2 3m 4k", "flush", "abort"], check=False)
    return Case("img.qcow2", expect_dirty=True)


@variant("zero_over_backing")
def _zero_over_backing(tmp: Path) -> Case:
    create(tmp, "base.qcow2", 4 * M)
    qio(tmp, "base.qcow2", ["write -P 0x5a 0 4m"])
    create(tmp, "top.qcow2", None, backing="base.qcow2", bfmt="qcow2")
    qio(tmp, "top.qcow2", ["write -z 0 64k", "write -z -u 128k 64k", "write -z 1m 4k",
                           "write -P 0x11 2m 1000", "write -z 3m 1m"])
    return Case("top.qcow2", chain=True)


@variant("zero_over_backing_v2")
def _zero_over_backing_v2(tmp: Path) -> Case:
    (tmp / "base.raw").write_bytes(b"\x5b" * (4 * M))
    create(tmp, "top.qcow2", 4 * M, "compat=0.10", backing="base.raw", bfmt="raw")
    qio(tmp, "top.qcow2", ["write -z 0 64k", "write -z 1m 4k", "write -P 0x11 2m 1000"])
    return Case("top.qcow2", chain=True)


def _convert_c(tmp: Path, name: str, opts: str, size: int = 4 * M, cs: int = 64 * K,
               post: list[str] | None = None) -> Case:
    (tmp / "src.raw").write_bytes(semi_compressible(size, cs))
    args = ["convert", "-c", "-f", "raw", "-O", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, "src.raw", name, cwd=tmp)
    (tmp / "src.raw").unlink()
    if post:
        qio(tmp, name, post)
    return Case(name)


for _name, _opts, _size, _cs in (
        ("compressed_zlib", "", 4 * M, 64 * K),
        ("compressed_zstd", "compression_type=zstd", 4 * M, 64 * K),
        ("compressed_zlib_512", "cluster_size=512", 256 * K, 512),
        ("compressed_zstd_4k", "cluster_size=4k,compression_type=zstd", 1 * M, 4 * K),
        ("compressed_zlib_2m", "cluster_size=2M", 8 * M, 2 * M),
        ("compressed_zlib_v2", "compat=0.10", 2 * M, 64 * K),
        ("compressed_refcount_bits_1", "refcount_bits=1", 2 * M, 64 * K),
        ("compressed_refcount_bits_2", "refcount_bits=2,cluster_size=4k", 1 * M, 4 * K),
        ("compressed_extended_l2", "extended_l2=on", 4 * M, 64 * K),
):
    VARIANTS[_name] = (lambda o, s, c: lambda tmp: _convert_c(tmp, "c.qcow2", o, s, c, post=[
        f"write -P 0x77 {c + 1000} 1000", f"write -z {min(4 * c, s - c)} {c}"]))(_opts, _size, _cs)


@variant("compressed_past_eof")
def _compressed_past_eof(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 64 * K, "cluster_size=1024")
    qio(tmp, "img.qcow2", ["write -c -P 0x5a 2k 1k"])
    p = tmp / "img.qcow2"
    # the compressed range (sector-granular) must really run past the end of the file
    assert p.stat().st_size % 512 != 0
    return Case("img.qcow2")


def _ext_l2(tmp: Path, cs: int, with_c: bool) -> Case:
    (tmp / "base.raw").write_bytes(bytes([0x5b]) * (3 * M))
    create(tmp, "top.qcow2", 4 * M, f"extended_l2=on,cluster_size={cs}", backing="base.raw", bfmt="raw")
    sc = cs // 32
    cmds = [
        f"write -P 0x01 0 {sc}",
        f"write -P 0x02 {4 * sc} {2 * sc}",
        f"write -P 0x03 {cs + 1000} 3000",         # not subcluster aligned: COW from backing
        f"write -z {2 * cs + sc} {sc}",            # one zero subcluster
        f"write -z {4 * cs} {cs}",                 # whole zero cluster
        f"write -z -u {6 * cs} {2 * cs}",
        f"write -P 0x04 {8 * cs} {cs}",
        f"write -z {8 * cs + 3 * sc} {2 * sc}",    # zero subclusters inside data
        f"write -P 0x05 {3 * M - 1000} 3000",      # straddles the backing file's end
        f"write -P 0x06 {4 * M - 2 * sc} {sc}",
    ]
    if with_c:
        cmds += [f"write -c -P 0x07 {12 * cs} {cs}", f"write -c -P 0x08 {14 * cs} {2 * cs}"]
    qio(tmp, "top.qcow2", cmds)
    return Case("top.qcow2", chain=True)


VARIANTS["extended_l2_backing"] = lambda tmp: _ext_l2(tmp, 64 * K, False)
VARIANTS["extended_l2_backing_16k"] = lambda tmp: _ext_l2(tmp, 16 * K, False)
VARIANTS["extended_l2_backing_compressed"] = lambda tmp: _ext_l2(tmp, 64 * K, True)
def _ext_l2_2m(tmp: Path) -> Case:
    (tmp / "base.raw").write_bytes(bytes([0x5b]) * (5 * M))
    create(tmp, "top.qcow2", 8 * M, "extended_l2=on,cluster_size=2M", backing="base.raw", bfmt="raw")
    sc = 64 * K
    qio(tmp, "top.qcow2", ["write -P 1 0 64k", f"write -P 2 {3 * sc + 5} 1000", "write -z 2m 128k",
                           "write -c -P 3 6m 2m", f"write -P 4 {5 * M - 100} 300"])
    return Case("top.qcow2", chain=True)


VARIANTS["extended_l2_backing_compressed_2m"] = _ext_l2_2m


@variant("size_zero")
def _size_zero(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 0)
    return Case("img.qcow2")


@variant("convert_fully_allocated")
def _convert_full(tmp: Path) -> Case:
    (tmp / "src.raw").write_bytes(semi_compressible(2 * M, 64 * K, seed=3))
    qemu_img("convert", "-S", "0", "-f", "raw", "-O", "qcow2", "src.raw", "img.qcow2", cwd=tmp)
    (tmp / "src.raw").unlink()
    qio(tmp, "img.qcow2", ["write -z 64k 64k", "write -P 0x12 1m 100"])
    return Case("img.qcow2")


@variant("compressed_over_backing")
def _compressed_over_backing(tmp: Path) -> Case:
    (tmp / "base.raw").write_bytes(semi_compressible(2 * M, 64 * K, seed=4))
    (tmp / "src.raw").write_bytes(semi_compressible(4 * M, 64 * K, seed=5)[:3 * M] + bytes(M))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-B", "base.raw", "-F", "raw", "src.raw",
             "top.qcow2", cwd=tmp)
    (tmp / "src.raw").unlink()
    return Case("top.qcow2", chain=True)


@variant("chain_absolute_backing")
def _chain_absolute(tmp: Path) -> Case:
    create(tmp, "base.qcow2", 4 * M, "cluster_size=4k")
    qio(tmp, "base.qcow2", ["write -P 0x41 0 1m", "write -z 1m 64k", "write -P 0x42 3m 100k"])
    create(tmp, "d/top.qcow2", 6 * M, "cluster_size=16k", backing=str(tmp / "base.qcow2"), bfmt="qcow2")
    qio(tmp, "d/top.qcow2", ["write -P 0x43 512k 1000", "write -z -u 3m 32k", "write -P 0x44 5m 64k"])
    return Case("d/top.qcow2", chain=True)


def _random_ops(tmp: Path, seed: int, cs: int, opts: str, size: int, backing: bool, nops: int = 40) -> Case:
    """Many random qemu-io operations (data, zeroes with and without unmap, discard, compressed clusters)."""
    rng = random.Random(seed)
    if backing:
        (tmp / "base.raw").write_bytes(semi_compressible(size * 3 // 4, cs, seed=seed))
        create(tmp, "img.qcow2", size, opts, backing="base.raw", bfmt="raw")
    else:
        create(tmp, "img.qcow2", size, opts)
    v2 = "0.10" in opts
    # compressed clusters first, in their own qemu-io run: qemu 7.2 keeps packing compressed data into
    # its last partly used host cluster even after a discard freed (and a write reused) that cluster
    comp = sorted(rng.sample(range(size // cs), 4))
    qio(tmp, "img.qcow2", [f"write -c -P {0x30 + i} {c * cs} {cs}" for i, c in enumerate(comp)])
    cmds = []
    for i in range(nops):
        kind = rng.choice(["data", "data", "data", "zero", "zero_u", "discard"])
        off = rng.randrange(size - 1)
        ln = min(rng.choice([1, 511, 512, 1000, cs // 2, cs, 3 * cs + 7, 5000]), size - off)
        if kind in ("zero", "zero_u", "discard"):  # qemu-io needs 512-aligned ranges here
            off -= off % 512
            ln = max(512, ln - ln % 512)
            ln = min(ln, size - off)
        if kind == "data":
            cmds.append(f"write -P {0x40 + i} {off} {ln}")
        elif kind == "zero":
            cmds.append(f"write -z {off} {ln}")
        elif kind == "zero_u":
            cmds.append(f"write -z -u {off} {ln}")
        elif not v2:
            cmds.append(f"discard {off} {ln}")
    qio(tmp, "img.qcow2", cmds)
    return Case("img.qcow2", chain=backing)


for _seed, (_cs, _opts, _size, _bk) in enumerate([
        (4 * K, "cluster_size=4k", 2 * M, True),
        (64 * K, "extended_l2=on", 4 * M, True),
        (32 * K, "extended_l2=on,cluster_size=32k,compression_type=zstd", 2 * M, False),
        (512, "compat=0.10,cluster_size=512", 512 * K, True),
        (1024, "refcount_bits=4,cluster_size=1k", 1 * M, False),
        (64 * K, "lazy_refcounts=on", 4 * M, False)]):
    VARIANTS[f"random_ops_{_seed}"] = (lambda a: lambda tmp: _random_ops(tmp, *a))((_seed + 100, _cs, _opts,
                                                                                    _size, _bk))


def _random_chain(tmp: Path, seed: int, opts: list[str], sizes: list[int]) -> Case:
    """A three-layer qcow2 chain, random writes/zeroes/discards in every layer, a snapshot in the middle."""
    rng = random.Random(seed)
    names = ["l0.qcow2", "l1.qcow2", "l2.qcow2"]
    for depth, (name, o, size) in enumerate(zip(names, opts, sizes)):
        if depth:
            create(tmp, name, size, o, backing=names[depth - 1], bfmt="qcow2")
        else:
            create(tmp, name, size, o)
        cmds = []
        for i in range(25):
            off = rng.randrange(size - 1) & ~511
            ln = min(rng.choice([512, 4096, 65536, 100000 & ~511, 3 * 65536]), size - off)
            kind = rng.choice(["data", "data", "zero", "zero_u", "discard"])
            if kind == "data":
                cmds.append(f"write -P {0x10 * depth + i} {off + rng.randrange(512)} {max(1, ln - 511)}")
            elif kind == "zero":
                cmds.append(f"write -z {off} {ln}")
            elif kind == "zero_u":
                cmds.append(f"write -z -u {off} {ln}")
            elif "0.10" not in o:
                cmds.append(f"discard {off} {ln}")
        qio(tmp, name, cmds[:12])
        if depth == 1:
            qemu_img("snapshot", "-c", "mid", name, cwd=tmp)
        qio(tmp, name, cmds[12:])
    return Case("l2.qcow2", chain=True)


VARIANTS["random_chain_0"] = lambda tmp: _random_chain(tmp, 1, ["cluster_size=4k", "", "extended_l2=on"],
                                                       [2 * M, 3 * M, 4 * M])
VARIANTS["random_chain_1"] = lambda tmp: _random_chain(
    tmp, 2, ["compat=0.10", "extended_l2=on,cluster_size=16k", "cluster_size=1k"], [4 * M, 2 * M, 3 * M])


@variant("resized_shrink")
def _resized_shrink(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 8 * M, "cluster_size=4k")
    fill(tmp, "img.qcow2", 8 * M, 4 * K)
    qemu_img("resize", "--shrink", "img.qcow2", str(3 * M + 512), cwd=tmp)
    return Case("img.qcow2")


@variant("resized_grow_l1_moved")
def _resized_grow(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 1 * M, "cluster_size=512")
    fill(tmp, "img.qcow2", 1 * M, 512)
    qemu_img("resize", "img.qcow2", "3M", cwd=tmp)
    qio(tmp, "img.qcow2", ["write -P 0x99 2m 5000", f"write -P 0x98 {3 * M - 700} 700"])
    return Case("img.qcow2")


@variant("chain_relative")
def _chain_relative(tmp: Path) -> Case:
    (tmp / "base.raw").write_bytes(semi_compressible(2 * M, 64 * K, seed=7))
    create(tmp, "sub/mid.qcow2", 4 * M, backing="../base.raw", bfmt="raw")
    qio(tmp, "sub/mid.qcow2", ["write -P 0x21 64k 64k", "write -P 0x22 1m 5000", "write -z 1536k 64k",
                               "write -P 0x23 3m 4k"])
    create(tmp, "sub/top.qcow2", None, backing="mid.qcow2", bfmt="qcow2")
    qio(tmp, "sub/top.qcow2", ["write -P 0x31 0 3k", "write -P 0x32 1m 1000", "write -z -u 3m 64k",
                               "write -P 0x33 3700k 100k"])
    return Case("sub/top.qcow2", chain=True)


@variant("chain_v2_backing_fmt")
def _chain_v2(tmp: Path) -> Case:
    create(tmp, "base.qcow2", 4 * M, "compat=0.10")
    qio(tmp, "base.qcow2", ["write -P 0x41 0 1m", "write -P 0x42 2m 1m"])
    create(tmp, "top.qcow2", None, "compat=0.10", backing="base.qcow2", bfmt="qcow2")
    qio(tmp, "top.qcow2", ["write -P 0x43 512k 1000", "write -z 2m 64k", "write -P 0x44 3m 64k"])
    return Case("top.qcow2", chain=True)


@variant("chain_v2_no_backing_fmt")
def _chain_v2_nofmt(tmp: Path) -> Case:
    # an old-style v2 image with a backing file but no format: the format is probed
    create(tmp, "base.qcow2", 4 * M)
    qio(tmp, "base.qcow2", ["write -P 0x41 0 1m"])
    create(tmp, "top.qcow2", 4 * M, "compat=0.10", backing="base.qcow2", bfmt="qcow2")
    # qemu-img 7.2 insists on -F: drop the backing-format extension by hand
    p = tmp / "top.qcow2"
    buf = bytearray(p.read_bytes())
    exts, _end = _exts(buf, 72)
    assert any(t == 0xE2792ACA for t, _ in exts)
    bfo, bfs = struct.unpack_from(">QI", buf, 8)
    name = bytes(buf[bfo:bfo + bfs])
    area = _pack_exts([(t, d) for t, d in exts if t != 0xE2792ACA])
    buf[72:bfo + bfs] = bytes(bfo + bfs - 72)
    buf[72:72 + len(area)] = area
    struct.pack_into(">Q", buf, 8, 72 + len(area))
    buf[72 + len(area):72 + len(area) + bfs] = name
    p.write_bytes(bytes(buf))
    qio(tmp, "top.qcow2", ["write -P 0x43 512k 1000"])
    info = json.loads(qemu_img("info", "--output=json", "top.qcow2", cwd=tmp).stdout)
    assert "backing-filename-format" not in info
    return Case("top.qcow2", chain=True)


def _snapshots(tmp: Path, opts: str, resize: bool = True, third: bool = True) -> Case:
    create(tmp, "img.qcow2", 4 * M, opts)
    fill(tmp, "img.qcow2", 4 * M)
    qemu_img("snapshot", "-c", "s1", "img.qcow2", cwd=tmp)
    qio(tmp, "img.qcow2", ["write -P 0xb1 0 64k", "write -P 0xb2 1m 1000", "write -z 2m 64k"])
    qemu_img("snapshot", "-c", "s2", "img.qcow2", cwd=tmp)
    if resize:  # v2 cannot resize an image with snapshots
        qemu_img("resize", "img.qcow2", "6M", cwd=tmp)
    top = 6 * M if resize else 4 * M
    qio(tmp, "img.qcow2", [f"write -P 0xb3 {top - M} 64k", "write -z -u 0 4k" if "0.10" not in opts else
                           "write -z 0 4k", "write -P 0xb4 3m 4k"])
    names = ["s1", "s2", "1", "2"]
    if third:  # refcount_bits=2 allows no third reference
        qemu_img("snapshot", "-c", "s1", "img.qcow2", cwd=tmp)  # a duplicate name (id 3)
        names.append("3")
    qio(tmp, "img.qcow2", ["write -P 0xb5 3m 4k"])
    return Case("img.qcow2", snapshots=names)


VARIANTS["snapshots"] = lambda tmp: _snapshots(tmp, "")
VARIANTS["snapshots_v2"] = lambda tmp: _snapshots(tmp, "compat=0.10", resize=False)
VARIANTS["snapshots_refcount_bits_2"] = lambda tmp: _snapshots(tmp, "refcount_bits=2", third=False)
VARIANTS["snapshots_cluster_512"] = lambda tmp: _snapshots(tmp, "cluster_size=512")


@variant("bitmaps")
def _bitmaps(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 4 * M)
    qemu_img("bitmap", "--add", "img.qcow2", "bm0", cwd=tmp)
    qemu_img("bitmap", "--add", "-g", "1M", "--disable", "img.qcow2", "bm1", cwd=tmp)
    qemu_img("bitmap", "--add", "-g", "512", "img.qcow2", "a-longer-bitmap-name", cwd=tmp)
    fill(tmp, "img.qcow2", 4 * M)
    return Case("img.qcow2")


@variant("bitmaps_in_use")
def _bitmaps_in_use(tmp: Path) -> Case:
    create(tmp, "img.qcow2", 4 * M)
    qemu_img("bitmap", "--add", "img.qcow2", "bm0", cwd=tmp)
    fill(tmp, "img.qcow2", 4 * M)
    qio(tmp, "img.qcow2", ["write -P 1 0 64k", "flush", "abort"], check=False)
    return Case("img.qcow2")


@variant("bitmaps_autoclear_cleared")
def _bitmaps_autoclear_cleared(tmp: Path) -> Case:
    # the bitmaps extension without autoclear bit 0: the bitmaps are inconsistent and QEMU lists none
    create(tmp, "img.qcow2", 4 * M)
    qemu_img("bitmap", "--add", "img.qcow2", "bm0", cwd=tmp)
    fill(tmp, "img.qcow2", 4 * M)
    patch_header(tmp / "img.qcow2", clear_autoclear=1)
    return Case("img.qcow2")


def _patched(tmp: Path, **kw) -> Case:
    create(tmp, "img.qcow2", 4 * M)
    fill(tmp, "img.qcow2", 4 * M, extra=["write -z 1m 64k"])
    patch_header(tmp / "img.qcow2", **kw)
    return Case("img.qcow2")


VARIANTS["patched_unknown_extension"] = lambda tmp: _patched(tmp, add_ext=(0x12345678, b"hello"))
VARIANTS["patched_unknown_compat_bit"] = lambda tmp: _patched(tmp, compat=1 << 5)
VARIANTS["patched_unknown_autoclear_bit"] = lambda tmp: _patched(tmp, autoclear=1 << 7)
VARIANTS["patched_header_length_104"] = lambda tmp: _patched(tmp, header_length=104)
VARIANTS["patched_header_length_128"] = lambda tmp: _patched(tmp, header_length=128)
VARIANTS["patched_all_ignorable"] = lambda tmp: _patched(tmp, header_length=120, compat=1 << 9,
                                                         autoclear=1 << 33, add_ext=(0x1, b""))
VARIANTS["patched_header_length_104_ext"] = lambda tmp: _patched(tmp, header_length=104,
                                                                add_ext=(0xABCDEF01, b"x" * 13))


@variant("patched_corrupt_bit")
def _corrupt(tmp: Path) -> Case:
    c = _patched(tmp, incompat=1 << 1)
    c.expect_corrupt = True
    return c


# ------------------------------------------------------------------------------------------------------
# the checks
# ------------------------------------------------------------------------------------------------------
def check_case(tmp: Path, case: Case) -> None:
    p = tmp / case.path
    before = sha(p)

    # (a) data
    qemu_img("convert", "-O", "raw", case.path, "ref.raw", cwd=tmp)
    ref = (tmp / "ref.raw").read_bytes()
    got = read_all(p, "qcow2")
    assert len(got) == len(ref)
    if got != ref:
        bad = next(i for i in range(len(ref)) if got[i] != ref[i])
        pytest.fail(f"data differs from qemu-img convert at offset {bad} ({bad:#x})")

    # (b) map, (c) info (and the backing chain): parsed JSON equal, then the exact text
    cmds = [("map",), ("info",)] + ([("info", "--backing-chain")] if case.chain else [])
    q_info = None
    for cmd in cmds:
        q_out = qemu_img(*cmd, "--output=json", case.path, cwd=tmp).stdout
        p_out = parablock(*cmd, "--output=json", case.path, cwd=tmp).stdout
        assert json.loads(p_out) == json.loads(q_out), cmd
        assert p_out == q_out, cmd
        if cmd == ("info",):
            q_info = json.loads(q_out)
    assert q_info is not None
    if case.expect_dirty is not None:
        assert q_info["dirty-flag"] is case.expect_dirty
    if case.expect_corrupt is not None:
        assert q_info["format-specific"]["data"]["corrupt"] is case.expect_corrupt

    # (d) internal snapshots
    for name in case.snapshots:
        qemu_img("convert", "-l", name, "-O", "raw", case.path, "snap.raw", cwd=tmp)
        node = open_node(p, "qcow2")
        try:
            node.load_snapshot_readonly(name)
            size = node.size()
            data = node.read(0, size)
        finally:
            node.close()
        sref = (tmp / "snap.raw").read_bytes()
        assert size == len(sref), f"snapshot {name}: size {size} != {len(sref)}"
        assert data == sref, f"snapshot {name}: data differs"

    # (e) nothing above wrote to the image
    assert sha(p) == before


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_reader(name: str, tmp_path: Path) -> None:
    case = VARIANTS[name](tmp_path)
    check_case(tmp_path, case)


# ------------------------------------------------------------------------------------------------------
# refusals and read-only-only images
# ------------------------------------------------------------------------------------------------------
def test_unknown_incompatible_bit_refused(tmp_path: Path) -> None:
    _patched(tmp_path, incompat=1 << 5)
    q = qemu_img("info", "img.qcow2", cwd=tmp_path, check=False)
    assert q.returncode == 1 and "Unsupported qcow2 feature" in q.stderr
    before = sha(tmp_path / "img.qcow2")
    for args in (("info", "img.qcow2"), ("info", "--output=json", "img.qcow2"), ("map", "img.qcow2"),
                 ("check", "img.qcow2")):
        p = parablock(*args, cwd=tmp_path, check=False)
        assert p.returncode == 1, (args, p.stdout, p.stderr)
        assert "Unsupported qcow2 feature" in p.stderr, (args, p.stderr)
    with pytest.raises(Exception, match="Unsupported qcow2 feature"):
        read_all(tmp_path / "img.qcow2", "qcow2")
    assert sha(tmp_path / "img.qcow2") == before


def test_corrupt_bit_refuses_writable_open(tmp_path: Path) -> None:
    _patched(tmp_path, incompat=1 << 1)
    p = tmp_path / "img.qcow2"
    before = sha(p)
    info = pb_json(tmp_path, "info", "img.qcow2")
    assert info["format-specific"]["data"]["corrupt"] is True
    for args in (("resize", "img.qcow2", "8M"), ("snapshot", "-c", "s1", "img.qcow2"),
                 ("amend", "-o", "lazy_refcounts=on", "img.qcow2")):
        r = parablock(*args, cwd=tmp_path, check=False)
        assert r.returncode != 0, (args, r.stdout, r.stderr)
        assert "corrupt" in r.stderr.lower(), (args, r.stderr)
        assert sha(p) == before, args
    with pytest.raises(Exception, match="corrupt"):
        open_node(p, "qcow2", read_only=False)
    assert sha(p) == before


def test_corrupt_bit_refuses_io_write(tmp_path: Path) -> None:
    """``parablock io`` (when the command exists) must refuse to write to a corrupt image."""
    if parablock("io", "--help", check=False).returncode != 0:
        pytest.skip("parablock has no io command")
    _patched(tmp_path, incompat=1 << 1)
    p = tmp_path / "img.qcow2"
    before = sha(p)
    r = parablock("io", "-c", "write 0 1", "img.qcow2", cwd=tmp_path, check=False)
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "corrupt" in (r.stdout + r.stderr).lower(), (r.stdout, r.stderr)
    assert sha(p) == before


def test_dirty_image_read_only_without_repair(tmp_path: Path) -> None:
    case = _lazy_dirty(tmp_path)
    p = tmp_path / case.path
    before = sha(p)
    assert pb_json(tmp_path, "info", case.path)["dirty-flag"] is True
    human = parablock("info", case.path, cwd=tmp_path).stdout
    assert "cleanly shut down: no" in human
    node = open_node(p, "qcow2")
    try:
        assert node.is_dirty()
    finally:
        node.close()
    assert sha(p) == before


# ------------------------------------------------------------------------------------------------------
# human output: exact text
# ------------------------------------------------------------------------------------------------------
HUMAN = ["v2", "chain_relative", "snapshots", "bitmaps", "lazy_refcounts_dirty", "patched_corrupt_bit",
         "extended_l2_backing"]


@pytest.mark.parametrize("name", HUMAN)
def test_human_output(name: str, tmp_path: Path) -> None:
    case = VARIANTS[name](tmp_path)
    q_info = qemu_img("info", case.path, cwd=tmp_path).stdout
    assert parablock("info", case.path, cwd=tmp_path).stdout == q_info
    if case.chain:
        assert (parablock("info", "--backing-chain", case.path, cwd=tmp_path).stdout
                == qemu_img("info", "--backing-chain", case.path, cwd=tmp_path).stdout)
    assert parablock("map", case.path, cwd=tmp_path).stdout == qemu_img("map", case.path, cwd=tmp_path).stdout


@pytest.mark.parametrize("name", ["compressed_zlib"])
def test_human_map_refuses_compressed(name: str, tmp_path: Path) -> None:
    case = VARIANTS[name](tmp_path)
    q = qemu_img("map", case.path, cwd=tmp_path, check=False)
    p = parablock("map", case.path, cwd=tmp_path, check=False)
    assert q.returncode == p.returncode == 1
    assert p.stdout == q.stdout
    assert "File contains external, encrypted or compressed clusters." in p.stderr


@pytest.mark.parametrize("name", ["chain_relative", "extended_l2_backing"])
def test_map_ranges(name: str, tmp_path: Path) -> None:
    case = VARIANTS[name](tmp_path)
    for rng in (["--start-offset=12345"], ["--start-offset=1M", "--max-length=70000"],
                ["--max-length=1"], ["--start-offset=64M"], ["--start-offset=4194303"],
                ["--start-offset=1000", "--max-length=0"]):
        q = qemu_img("map", "--output=json", *rng, case.path, cwd=tmp_path).stdout
        p = parablock("map", "--output=json", *rng, case.path, cwd=tmp_path).stdout
        assert p == q, rng
