"""Convert matrix against qemu-img 7.2: ``parablock convert --workers 2`` from every source variant of the
reader matrix to raw and to qcow2 (plain, ``-c`` zlib and zstd, other cluster sizes, compat 0.10,
extended L2, ``preallocation=metadata``, ``-B`` onto plain, 4k-cluster, compressed and extended-L2
targets), each result judged by qemu-img:

  * ``qemu-img check`` rc 0 with no leaks/corruptions (qcow2 targets);
  * ``qemu-img compare -f SRCFMT -F OUTFMT src out`` rc 0 (against ``qemu-img convert -l NAME`` for
    snapshot sources);
  * for targets without a backing file, the allocation (``qemu-img map --output=json`` start/length/
    zero/data/depth/present, offsets ignored, adjacent equal entries merged) equal to what
    ``qemu-img convert`` with the same options produces;
  * for ``-B`` targets, the result's top layer holds exactly the target clusters the source's top layer
    touches (depth-0 ranges of both maps, rounded out to the target's clusters).

Every (source, target) pair runs when ``PARABLOCK_FULL_CONVERT_MATRIX=1``; by default a covering subset
runs (every source to raw and plain qcow2, every other target from several sources) to keep the file
around a minute and a half on two cores.  Then: several sources concatenated, ``-n`` onto pre-filled
targets, ``--target-is-zero``, ``-S 0`` / ``-S 64k``, ``-m 1`` / ``-W``, ``-p``, the ``-l`` snapshot
selectors (ID, ``snapshot.id=``/``snapshot.name=``), error cases with qemu-img's messages and exit code
(and no target created or changed), and after every parablock run no process left behind (each run carries a unique
environment tag that its worker processes inherit; psutil must find none of them once it exited).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.interop.test_reader_matrix import VARIANTS, create, qio, semi_compressible
from tests.util import ROOT, assert_qemu_clean, needs_qemu, qemu_compare, qemu_img

pytestmark = needs_qemu

K = 1024
M = 1024 * 1024
TAG_VAR = "PARABLOCK_CONVERT_TEST_TAG"
FULL = os.environ.get("PARABLOCK_FULL_CONVERT_MATRIX") == "1"


# ------------------------------------------------------------------------------------------------------
# running parablock: every run tagged, no process of it may survive it
# ------------------------------------------------------------------------------------------------------
def _tagged(tag: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                out.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return out


def assert_no_leftovers(tag: str, tmp: Path) -> None:
    deadline = time.monotonic() + 3.0
    while True:
        left = _tagged(tag)
        if not left:
            break
        if time.monotonic() > deadline:
            desc = []
            for proc in left:
                try:
                    desc.append((proc.pid, proc.cmdline()))
                    proc.kill()
                except psutil.Error:
                    pass
            pytest.fail(f"processes left behind by parablock convert: {desc}")
        time.sleep(0.05)
    for proc in psutil.process_iter(["pid"]):  # nothing else refers to our directory either
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        assert str(tmp) not in cmd or proc.pid == os.getpid(), (proc.pid, cmd)


def pb(tmp: Path, *args: str, check: bool = True, workers: bool = True) -> subprocess.CompletedProcess:
    """``parablock convert [--workers 2] args`` from ``tmp``; then no process of it may be alive."""
    tag = uuid.uuid4().hex
    argv = [sys.executable, "-m", "engine", "convert"] + (["--workers", "2"] if workers else []) + list(args)
    p = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT), TAG_VAR: tag})
    assert_no_leftovers(tag, tmp)
    if check and p.returncode != 0:
        raise AssertionError(f"parablock convert {args} rc={p.returncode}\n"
                             f"stdout:{p.stdout}\nstderr:{p.stderr}")
    return p


def qmap(tmp: Path, path: str, fmt: str | None = None) -> list[dict]:
    args = ["map", "--output=json"] + (["-f", fmt] if fmt else []) + [path]
    return json.loads(qemu_img(*args, cwd=tmp).stdout)


def alloc(entries: list[dict]) -> list[tuple]:
    """Map entries without offsets, adjacent equal ones merged:
    [(start, length, depth, present, zero, data)]."""
    out: list[list] = []
    for e in entries:
        key = (e["depth"], e["present"], e["zero"], e["data"])
        if out and tuple(out[-1][2:]) == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], *key])
    return [tuple(x) for x in out]


def clip(entries: list[dict], lo: int) -> list[dict]:
    """Map entries from guest offset ``lo`` on.  qemu's file-posix allocates the first 4 KiB of every raw
    image it creates (for alignment probing), so raw targets are compared from 4 KiB on."""
    out = []
    for e in entries:
        end = e["start"] + e["length"]
        if end <= lo:
            continue
        e = dict(e)
        e["start"], e["length"] = max(e["start"], lo), end - max(e["start"], lo)
        out.append(e)
    return out


def top_clusters(entries: list[dict], cs: int) -> set[int]:
    """Clusters (of size cs) that depth-0 ranges touch."""
    out: set[int] = set()
    for e in entries:
        if e["depth"] == 0 and e["length"]:
            out.update(range(e["start"] // cs, (e["start"] + e["length"] - 1) // cs + 1))
    return out


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------------
# sources: the reader matrix's builders, plus raw images with holes
# ------------------------------------------------------------------------------------------------------
@dataclass
class Src:
    path: str
    fmt: str
    backing: str | None = None  # the source top's backing file, relative to tmp (for -B targets)
    backing_fmt: str | None = None
    snapshot: str | None = None  # convert with -l NAME


def _reader(name: str, backing: tuple[str, str] | None = None, snapshot: str | None = None):
    def build(tmp: Path) -> Src:
        case = VARIANTS[name](tmp)
        return Src(case.path, "qcow2", backing[0] if backing else None, backing[1] if backing else None,
                   snapshot)
    return build


def _raw_holes(tmp: Path) -> Src:
    p = tmp / "src.raw"
    with open(p, "wb") as f:
        f.truncate(5 * M + 1000)  # not a multiple of 512
        for off, data in ((0, b"\x11" * 3000), (64 * K + 100, b"\x22" * 70000),
                          (M, bytes(128 * K)),  # written zeroes: allocated in the file, not data
                          (M + 128 * K, b"\x33" * 512), (3 * M - 5, semi_compressible(256 * K, 64 * K, 9)),
                          (5 * M + 1000 - 700, b"\x44" * 700)):
            f.seek(off)
            f.write(data)
    return Src("src.raw", "raw")


def _raw_concat_parts(tmp: Path) -> list[tuple[str, str]]:
    create(tmp, "a.qcow2", M + 512, "cluster_size=4k")
    qio(tmp, "a.qcow2", ["write -P 0x61 0 5000", "write -z 64k 64k", f"write -P 0x62 {M - 1000} 1512"])
    (tmp / "b.raw").write_bytes(b"\x63" * 3000 + bytes(300 * K) + b"\x64" * 4096 + bytes(1000))
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=16k",
             "b.raw", "c.qcow2", cwd=tmp)
    qio(tmp, "c.qcow2", ["write -P 0x65 100k 1000"])
    return [("a.qcow2", "qcow2"), ("b.raw", "raw"), ("c.qcow2", "qcow2")]


SOURCES = {
    "v2": _reader("v2"),
    "v3": _reader("v3"),
    "cluster_512": _reader("cluster_512"),
    "cluster_2M": _reader("cluster_2097152"),
    "refcount_bits_1": _reader("refcount_bits_1"),
    "refcount_bits_64": _reader("refcount_bits_64"),
    "zero_clusters": _reader("zero_clusters"),
    "v2_zero_writes": _reader("v2_zero_writes"),
    "compressed_zlib": _reader("compressed_zlib"),
    "compressed_zstd": _reader("compressed_zstd"),
    "compressed_zlib_512": _reader("compressed_zlib_512"),
    "extended_l2_backing": _reader("extended_l2_backing", ("base.raw", "raw")),
    "extended_l2_backing_compressed": _reader("extended_l2_backing_compressed", ("base.raw", "raw")),
    "zero_over_backing": _reader("zero_over_backing", ("base.qcow2", "qcow2")),
    "compressed_over_backing": _reader("compressed_over_backing", ("base.raw", "raw")),
    "chain_relative": _reader("chain_relative", ("sub/mid.qcow2", "qcow2")),
    "snapshot_s2": _reader("snapshots", snapshot="s2"),
    "size_not_cluster_multiple": _reader("size_not_cluster_multiple"),
    "size_not_cluster_multiple_2m": _reader("size_not_cluster_multiple_2m"),
    "raw_holes": _raw_holes,
}
CHAINS = [n for n in SOURCES if n in ("extended_l2_backing", "extended_l2_backing_compressed",
                                      "zero_over_backing", "compressed_over_backing", "chain_relative")]

TARGETS = {
    "raw": ["-O", "raw"],
    "qcow2": ["-O", "qcow2"],
    "zlib": ["-O", "qcow2", "-c"],
    "zstd": ["-O", "qcow2", "-c", "-o", "compression_type=zstd"],
    "cs4k": ["-O", "qcow2", "-o", "cluster_size=4k"],
    "cs2m": ["-O", "qcow2", "-o", "cluster_size=2M"],
    "v2": ["-O", "qcow2", "-o", "compat=0.10"],
    "ext_l2": ["-O", "qcow2", "-o", "extended_l2=on"],
    "prealloc_meta": ["-O", "qcow2", "-o", "preallocation=metadata"],
    "backing": ["-O", "qcow2"],  # + -B <source's backing> -F fmt
    "backing_cs4k": ["-O", "qcow2", "-o", "cluster_size=4k"],
    "backing_zlib": ["-O", "qcow2", "-c"],
    "backing_ext_l2": ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k"],
}

# the default covering subset: every source to raw and plain qcow2, every other target from several
SUBSET = {
    "zlib": ["compressed_zstd", "extended_l2_backing", "size_not_cluster_multiple", "v2", "zero_clusters"],
    "zstd": ["compressed_zlib", "cluster_512", "raw_holes", "snapshot_s2"],
    "cs4k": ["cluster_2M", "zero_clusters", "compressed_zlib", "chain_relative"],
    "cs2m": ["cluster_512", "size_not_cluster_multiple", "chain_relative", "compressed_zlib_512"],
    "v2": ["zero_clusters", "extended_l2_backing", "snapshot_s2", "v2_zero_writes"],
    "ext_l2": ["v2_zero_writes", "chain_relative", "compressed_zstd", "refcount_bits_1"],
    "prealloc_meta": ["zero_clusters", "compressed_zlib", "size_not_cluster_multiple", "chain_relative"],
    "backing": CHAINS,
    "backing_cs4k": ["chain_relative", "extended_l2_backing"],
    "backing_zlib": ["compressed_over_backing", "zero_over_backing"],
    "backing_ext_l2": ["extended_l2_backing_compressed", "chain_relative"],
}


def _pairs() -> list[tuple[str, str]]:
    out = []
    for s in SOURCES:
        for t in TARGETS:
            if t.startswith("backing") and s not in CHAINS:
                continue
            if FULL or t in ("raw", "qcow2") or s in SUBSET[t]:
                out.append((s, t))
    return out


_built: dict[str, tuple[Path, Src]] = {}


@pytest.fixture
def source(request, tmp_path_factory):
    """Build each source once per test process.  Its directory is shared by the tests converting from it:
    they never modify the source and write their targets next to it, each under its own name."""
    def get(name: str) -> tuple[Path, Src]:
        if name not in _built:
            d = tmp_path_factory.mktemp(f"src_{name}")
            _built[name] = (d, SOURCES[name](d))
        return _built[name]
    return get


def _snapshot_ref(tmp: Path, src: Src) -> str:
    ref = f"snapref_{src.snapshot}.raw"
    if not (tmp / ref).exists():
        qemu_img("convert", "-l", src.snapshot, "-f", src.fmt, "-O", "raw", src.path, ref, cwd=tmp)
    return ref


@pytest.mark.parametrize("sname,tname", _pairs())
def test_convert_matrix(sname: str, tname: str, source) -> None:
    tmp, src = source(sname)
    opts = list(TARGETS[tname])
    outfmt = opts[opts.index("-O") + 1]
    if tname.startswith("backing"):
        opts += ["-B", os.path.relpath(tmp / src.backing, tmp), "-F", src.backing_fmt]
    if src.snapshot:
        opts += ["-l", src.snapshot]
    out = f"out_{tname}.{outfmt}"
    ref = f"ref_{tname}.{outfmt}"
    for f in (out, ref):
        (tmp / f).unlink(missing_ok=True)
    pb(tmp, "-f", src.fmt, *opts, src.path, out)

    if outfmt == "qcow2":
        assert_qemu_clean(tmp / out)
    # same data as the source
    if src.snapshot:
        c = qemu_compare(tmp / _snapshot_ref(tmp, src), tmp / out, "raw", outfmt)
    else:
        c = qemu_compare(tmp / src.path, tmp / out, src.fmt, outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)

    # allocation: the same as qemu-img convert with the same options
    qemu_img("convert", "-f", src.fmt, *opts, src.path, ref, cwd=tmp)
    got, want = qmap(tmp, out, outfmt), qmap(tmp, ref, outfmt)
    if outfmt == "raw":
        got, want = clip(got, 4096), clip(want, 4096)
    if not tname.startswith("backing"):
        assert alloc(got) == alloc(want)
        return
    # -B: the result's top holds what the source's top holds, nothing more, nothing less
    cs = json.loads(qemu_img("info", "--output=json", out, cwd=tmp).stdout)["cluster-size"]
    top = qmap(tmp, src.path, src.fmt)
    assert top_clusters(got, cs) == top_clusters(top, cs)
    assert top_clusters(got, cs) == top_clusters(want, cs)
    info = json.loads(qemu_img("info", "--output=json", out, cwd=tmp).stdout)
    assert info["backing-filename"] == opts[opts.index("-B") + 1]
    assert info["backing-filename-format"] == src.backing_fmt


# ------------------------------------------------------------------------------------------------------
# several sources concatenated
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outfmt,opts", [("qcow2", []), ("raw", []),
                                         ("qcow2", ["-c", "-o", "cluster_size=4k"])])
def test_concatenated_sources(outfmt: str, opts: list[str], tmp_path: Path) -> None:
    parts = _raw_concat_parts(tmp_path)
    names = [n for n, _ in parts]
    out, ref = f"out.{outfmt}", f"ref.{outfmt}"
    pb(tmp_path, "-O", outfmt, *opts, *names, out)
    qemu_img("convert", "-O", outfmt, *opts, *names, ref, cwd=tmp_path)
    if outfmt == "qcow2":
        assert_qemu_clean(tmp_path / out)
    c = qemu_compare(tmp_path / ref, tmp_path / out, outfmt, outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)
    if outfmt == "raw":
        assert (tmp_path / out).stat().st_size == (tmp_path / ref).stat().st_size
    got, want = qmap(tmp_path, out, outfmt), qmap(tmp_path, ref, outfmt)
    if outfmt == "raw":
        got, want = clip(got, 4096), clip(want, 4096)
    assert alloc(got) == alloc(want)


# ------------------------------------------------------------------------------------------------------
# -n onto existing targets, --target-is-zero
# ------------------------------------------------------------------------------------------------------
def _prefilled(tmp: Path, name: str, fmt: str, size: int) -> None:
    if fmt == "raw":
        (tmp / name).write_bytes(b"\xee" * size)
        return
    create(tmp, name, size, "cluster_size=16k")
    qio(tmp, name, ["write -c -P 0xdd 1m 64k", "write -P 0xee 0 1m", f"write -P 0xee 1088k {size - 1088 * K}",
                    "write -z 2m 64k", "write -z -u 3m 32k", "discard 3200k 16k"])


@pytest.mark.parametrize("outfmt", ["qcow2", "raw"])
def test_no_create_onto_prefilled(outfmt: str, tmp_path: Path) -> None:
    src = SOURCES["zero_clusters"](tmp_path)
    size = 4 * M
    for name in ("out", "ref"):
        _prefilled(tmp_path, f"{name}.{outfmt}", outfmt, size)
    pb(tmp_path, "-n", "-f", "qcow2", "-O", outfmt, src.path, f"out.{outfmt}")
    qemu_img("convert", "-n", "-f", "qcow2", "-O", outfmt, src.path, f"ref.{outfmt}", cwd=tmp_path)
    if outfmt == "qcow2":
        assert_qemu_clean(tmp_path / "out.qcow2")
    c = qemu_compare(tmp_path / src.path, tmp_path / f"out.{outfmt}", "qcow2", outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)
    # how the old contents were overwritten (data, zero clusters, holes) as qemu-img does it
    assert alloc(qmap(tmp_path, f"out.{outfmt}", outfmt)) == alloc(qmap(tmp_path, f"ref.{outfmt}", outfmt))


@pytest.mark.parametrize("outfmt", ["qcow2", "raw"])
def test_target_is_zero(outfmt: str, tmp_path: Path) -> None:
    src = SOURCES["compressed_zlib"](tmp_path)
    for name in ("out", "ref"):
        qemu_img("create", "-q", "-f", outfmt, f"{name}.{outfmt}", str(4 * M), cwd=tmp_path)
    pb(tmp_path, "-n", "--target-is-zero", "-f", "qcow2", "-O", outfmt, src.path, f"out.{outfmt}")
    qemu_img("convert", "-n", "--target-is-zero", "-f", "qcow2", "-O", outfmt, src.path, f"ref.{outfmt}",
             cwd=tmp_path)
    if outfmt == "qcow2":
        assert_qemu_clean(tmp_path / "out.qcow2")
    c = qemu_compare(tmp_path / src.path, tmp_path / f"out.{outfmt}", "qcow2", outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)
    got, want = qmap(tmp_path, f"out.{outfmt}", outfmt), qmap(tmp_path, f"ref.{outfmt}", outfmt)
    if outfmt == "raw":
        got, want = clip(got, 4096), clip(want, 4096)
    assert alloc(got) == alloc(want)


# ------------------------------------------------------------------------------------------------------
# -S, -m, -W, -p
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outfmt", ["qcow2", "raw"])
def test_sparse_zero_fully_allocates(outfmt: str, tmp_path: Path) -> None:
    src = SOURCES["zero_clusters"](tmp_path)
    out = f"out.{outfmt}"
    pb(tmp_path, "-S", "0", "-f", "qcow2", "-O", outfmt, src.path, out)
    if outfmt == "qcow2":
        assert_qemu_clean(tmp_path / out)
    c = qemu_compare(tmp_path / src.path, tmp_path / out, "qcow2", outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)
    assert alloc(qmap(tmp_path, out, outfmt)) == [(0, 4 * M, 0, True, False, True)]


@pytest.mark.parametrize("outfmt,opts", [("qcow2", ["-o", "cluster_size=4k"]), ("raw", [])])
def test_sparse_64k(outfmt: str, opts: list[str], tmp_path: Path) -> None:
    src = _raw_holes(tmp_path)
    out, ref = f"out.{outfmt}", f"ref.{outfmt}"
    pb(tmp_path, "-S", "64k", "-f", "raw", "-O", outfmt, *opts, src.path, out)
    qemu_img("convert", "-S", "64k", "-f", "raw", "-O", outfmt, *opts, src.path, ref, cwd=tmp_path)
    if outfmt == "qcow2":
        assert_qemu_clean(tmp_path / out)
    c = qemu_compare(tmp_path / src.path, tmp_path / out, "raw", outfmt)
    assert c.returncode == 0, (c.stdout, c.stderr)
    got, want = qmap(tmp_path, out, outfmt), qmap(tmp_path, ref, outfmt)
    if outfmt == "raw":
        got, want = clip(got, 4096), clip(want, 4096)
    assert alloc(got) == alloc(want)


@pytest.mark.parametrize("flags", [["-m", "1"], ["-W"], ["-m", "16", "-W"]])
def test_coroutines_and_out_of_order(flags: list[str], tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(semi_compressible(6 * M + 4096, 64 * K, seed=11))
    for opts in (["-O", "qcow2"], ["-O", "qcow2", "-c"]) if len(flags) == 1 else (["-O", "qcow2"],):
        out = "out.qcow2"
        (tmp_path / out).unlink(missing_ok=True)
        pb(tmp_path, *flags, "-f", "raw", *opts, "src.raw", out)
        assert_qemu_clean(tmp_path / out)
        c = qemu_compare(tmp_path / "src.raw", tmp_path / out, "raw", "qcow2")
        assert c.returncode == 0, (opts, c.stdout, c.stderr)
        qemu_img("convert", *flags, "-f", "raw", *opts, "src.raw", "ref.qcow2", cwd=tmp_path)
        assert alloc(qmap(tmp_path, out)) == alloc(qmap(tmp_path, "ref.qcow2"))
        (tmp_path / "ref.qcow2").unlink()


def test_progress(tmp_path: Path) -> None:
    (tmp_path / "src.raw").write_bytes(semi_compressible(4 * M, 64 * K, seed=12))
    p = pb(tmp_path, "-p", "-f", "raw", "-O", "qcow2", "src.raw", "out.qcow2")
    lines = [x for x in p.stdout.replace("\r", "\n").split("\n") if x.strip()]
    assert lines, p.stdout
    assert all(x.strip().startswith("(") and x.strip().endswith("/100%)") for x in lines), lines
    assert lines[-1].strip() == "(100.00/100%)"
    assert p.stdout.endswith("\n")
    pcts = [float(x.strip()[1:].split("/")[0]) for x in lines]
    assert pcts == sorted(pcts) and pcts[0] == 0.0
    q = pb(tmp_path, "-p", "-q", "-f", "raw", "-O", "raw", "src.raw", "out.raw")
    assert q.stdout == ""
    c = qemu_compare(tmp_path / "src.raw", tmp_path / "out.qcow2", "raw", "qcow2")
    assert c.returncode == 0


# ------------------------------------------------------------------------------------------------------
# errors: qemu-img's message and exit code, and no target left behind
# ------------------------------------------------------------------------------------------------------
def _err_setup(tmp: Path) -> None:
    from tests.interop.test_reader_matrix import patch_header

    create(tmp, "src.qcow2", M)
    qio(tmp, "src.qcow2", ["write -P 1 0 64k"])
    qemu_img("snapshot", "-c", "s1", "src.qcow2", cwd=tmp)
    qemu_img("snapshot", "-c", "s2", "src.qcow2", cwd=tmp)
    create(tmp, "bad.qcow2", M)
    patch_header(tmp / "bad.qcow2", incompat=1 << 5)
    (tmp / "base.raw").write_bytes(b"\x01" * M)
    create(tmp, "small.qcow2", 512 * K)


ERRORS = {
    "missing_source": ["-O", "qcow2", "missing.qcow2", "OUT"],
    "missing_second_source": ["-O", "qcow2", "src.qcow2", "missing.qcow2", "OUT"],
    "unsupported_source": ["-O", "qcow2", "bad.qcow2", "OUT"],
    "unknown_format": ["-O", "foo", "src.qcow2", "OUT"],
    "compress_raw": ["-c", "-O", "raw", "src.qcow2", "OUT"],
    "backing_without_fmt": ["-O", "qcow2", "-B", "base.raw", "src.qcow2", "OUT"],
    "backing_raw_target": ["-O", "raw", "-B", "base.raw", "-F", "raw", "src.qcow2", "OUT"],
    "target_is_zero_without_n": ["--target-is-zero", "-O", "raw", "src.qcow2", "OUT"],
    "sparse_unaligned": ["-S", "1000", "-O", "raw", "src.qcow2", "OUT"],
    "sparse_garbage": ["-S", "foo", "-O", "raw", "src.qcow2", "OUT"],
    "sparse_too_big": ["-S", "17M", "-O", "raw", "src.qcow2", "OUT"],
    "sparse_negative": ["-S", "-1", "-O", "raw", "src.qcow2", "OUT"],
    "missing_snapshot": ["-l", "nosnap", "-O", "raw", "src.qcow2", "OUT"],
    "snapshot_id_name_mismatch": ["-l", "snapshot.id=1,snapshot.name=s2", "-O", "raw", "src.qcow2", "OUT"],
    "snapshot_not_an_option": ["-l", "foo=1", "-O", "raw", "src.qcow2", "OUT"],
    "snapshot_bad_option": ["-l", "snapshot.id=1,foo=2", "-O", "raw", "src.qcow2", "OUT"],
    "snapshot_empty": ["-l", "", "-O", "raw", "src.qcow2", "OUT"],
    "snapshot_concatenated": ["-l", "s1", "-O", "raw", "src.qcow2", "src.qcow2", "OUT"],
    "coroutines": ["-m", "17", "-O", "raw", "src.qcow2", "OUT"],
    "no_target_name": ["-O", "raw", "src.qcow2"],
    "n_missing_target": ["-n", "-O", "qcow2", "src.qcow2", "OUT"],
    "n_target_too_small": ["-n", "-O", "qcow2", "src.qcow2", "small.qcow2"],
    "n_unsupported_source": ["-n", "-O", "qcow2", "bad.qcow2", "small.qcow2"],
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_errors(case: str, tmp_path: Path) -> None:
    _err_setup(tmp_path)
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    argv = ERRORS[case]
    q = qemu_img("convert", *[a.replace("OUT", "q_out") for a in argv], cwd=tmp_path, check=False)
    p = pb(tmp_path, *[a.replace("OUT", "p_out") for a in argv], check=False)
    assert q.returncode == 1, q.stderr
    assert p.returncode == q.returncode, (p.stdout, p.stderr)
    want = q.stderr.replace("qemu-img:", "parablock:").replace("q_out", "p_out")
    assert p.stderr == want
    assert p.stdout == q.stdout == ""
    # nothing created, nothing changed
    assert not (tmp_path / "q_out").exists()
    assert not (tmp_path / "p_out").exists()
    assert {p.name: sha(p) for p in tmp_path.iterdir()} == before


# ------------------------------------------------------------------------------------------------------
# the other ways to name a snapshot
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sel", [["-l", "1"], ["-l", "snapshot.id=3"], ["-l", "snapshot.name=s1"],
                                 ["-l", "snapshot.id=2,snapshot.name=s2"],
                                 ["-l", "snapshot.name=s1,snapshot.id=1,"]])
def test_snapshot_selectors(sel: list[str], source) -> None:
    tmp, src = source("snapshot_s2")
    tag = "_".join(sel).replace("=", "_").replace(".", "_")
    out, ref = f"snap_{tag}.qcow2", f"snapref_{tag}.raw"
    for f in (out, ref):
        (tmp / f).unlink(missing_ok=True)
    pb(tmp, *sel, "-f", "qcow2", "-O", "qcow2", src.path, out)
    qemu_img("convert", *sel, "-f", "qcow2", "-O", "raw", src.path, ref, cwd=tmp)
    assert_qemu_clean(tmp / out)
    c = qemu_compare(tmp / ref, tmp / out, "raw", "qcow2")
    assert c.returncode == 0, (c.stdout, c.stderr)
