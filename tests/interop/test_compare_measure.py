"""``parablock compare`` and ``parablock measure`` against the real qemu-img 7.2.

Each case runs both programs on the same inputs and requires the same exit code, the same stdout (byte
for byte, progress meter included) and the same stderr once qemu-img's program name is replaced by ours;
measure's JSON must hold the same numbers.  Images live in per-worker temporary directories, so the
module is safe under ``pytest -n``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120
MiB = 1 << 20

pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def parablock(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=REPO, capture_output=True,
                          timeout=TIMEOUT)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([QEMU_IMG, *args], capture_output=True, timeout=TIMEOUT)
    if check:
        assert res.returncode == 0, f"qemu-img {' '.join(args)}: {res.stdout!r}{res.stderr!r}"
    return res


def qemu_io(image: Path, *cmds: str, fmt: str = "qcow2") -> None:
    if QEMU_IO is None:
        pytest.skip("qemu-io not installed")
    args = [QEMU_IO, "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    res = subprocess.run([*args, str(image)], capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr


def poke(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def make_raw(path: Path, size: int, writes: list[tuple[int, bytes]] = ()) -> Path:
    """A sparse raw file of ``size`` bytes with ``writes`` applied."""
    with open(path, "wb") as f:
        f.truncate(size)
    for off, data in writes:
        poke(path, off, data)
    return path


def same(cmd: str, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """Run ``qemu-img CMD ARGS`` and ``parablock CMD ARGS``; assert the same rc, stdout and stderr."""
    q = qemu_img(cmd, *args, check=False)
    p = parablock(cmd, *args)
    qerr = q.stderr.decode().replace("qemu-img:", "parablock:").replace("'qemu-img --help'",
                                                                       "'parablock --help'")
    assert (p.returncode, p.stdout, p.stderr.decode()) == (q.returncode, q.stdout, qerr), \
        f"args={args}\nqemu: rc={q.returncode} out={q.stdout!r} err={q.stderr!r}\n" \
        f"ours: rc={p.returncode} out={p.stdout!r} err={p.stderr!r}"
    return q, p


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256) + bytes(n % 256)


# --------------------------------------------------------------------------------------------------
# a shared set of images (one per xdist worker)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def imgs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cmpmeasure")
    out: dict[str, Path] = {}
    writes = [(0, pattern(1024, 1)), (3 * MiB, pattern(100 * 1024, 2)), (10 * MiB, pattern(64 * 1024, 3)),
              (20 * MiB + 5, b"\x01"), (40 * MiB + 4096, pattern(8192, 4))]
    out["flat.raw"] = make_raw(d / "flat.raw", 64 * MiB, writes)
    for name, opts in (("flat.qcow2", []), ("flat4k.qcow2", ["-o", "cluster_size=4k"]),
                       ("flatx.qcow2", ["-o", "extended_l2=on"]),
                       ("flatv2.qcow2", ["-o", "compat=0.10"])):
        qemu_img("convert", "-f", "raw", "-O", "qcow2", *opts, str(out["flat.raw"]), str(d / name))
        out[name] = d / name
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", str(out["flat.raw"]), str(d / "flatc.qcow2"))
    out["flatc.qcow2"] = d / "flatc.qcow2"

    # chain: base holds the first half of the writes, the overlay the rest
    base = make_raw(d / "base.raw", 64 * MiB, writes[:3])
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(base), str(d / "base.qcow2"))
    os.unlink(base)
    # the overlay holds exactly the clusters that differ from the base
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2", str(out["flat.raw"]),
             str(d / "chain.qcow2"))
    ov = d / "chain.qcow2"
    out["base.qcow2"] = d / "base.qcow2"
    out["chain.qcow2"] = ov

    # one byte different from flat.raw (inside a data extent, not at a sector start)
    out["diff.raw"] = make_raw(d / "diff.raw", 64 * MiB, writes + [(3 * MiB + 1000, b"\xee")])
    # first sector of a 2 MiB read chunk differs
    out["diff2.raw"] = make_raw(d / "diff2.raw", 64 * MiB, writes + [(2 * MiB + 10, b"\xee")])
    # a hole where flat.raw has data, data where it has a hole
    out["diff3.raw"] = make_raw(d / "diff3.raw", 64 * MiB, writes + [(50 * MiB + 700, b"\x05")])
    # longer images: zero tail / non-zero tail
    out["long.raw"] = make_raw(d / "long.raw", 96 * MiB, writes)
    out["longnz.raw"] = make_raw(d / "longnz.raw", 96 * MiB, writes + [(80 * MiB + 3000, b"\x09")])
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(out["longnz.raw"]), str(d / "longnz.qcow2"))
    out["longnz.qcow2"] = d / "longnz.qcow2"
    out["short.raw"] = make_raw(d / "short.raw", 32 * MiB, writes[:4])
    # empty images
    qemu_img("create", "-f", "qcow2", str(d / "empty.qcow2"), "64M")
    out["empty.qcow2"] = d / "empty.qcow2"
    out["empty.raw"] = make_raw(d / "empty.raw", 64 * MiB)
    qemu_img("create", "-f", "qcow2", str(d / "empty128.qcow2"), "128M")
    out["empty128.qcow2"] = d / "empty128.qcow2"
    out["odd.raw"] = make_raw(d / "odd.raw", 1000001, [(999999, b"\x01")])
    # zero clusters vs unallocated (strict mode tells them apart)
    if QEMU_IO is not None:
        qemu_img("create", "-f", "qcow2", str(d / "zeroed.qcow2"), "64M")
        qemu_io(d / "zeroed.qcow2", "write -z 1M 64k", "write -P 0 5M 64k")
        out["zeroed.qcow2"] = d / "zeroed.qcow2"
        # scattered writes, zero clusters and compressed data written by qemu-io
        qemu_img("create", "-f", "qcow2", str(d / "scatter.qcow2"), "64M")
        qemu_io(d / "scatter.qcow2", "write 0 1k", "write 3M 100k", "write 10M 64k", "write 20000k 1",
                "write -z 30M 1M", "write -c 40M 64k", "write -P 0 50M 128k")
        out["scatter.qcow2"] = d / "scatter.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", "scatter.qcow2", "-F", "qcow2", str(d / "stop.qcow2"), "80M")
        qemu_io(d / "stop.qcow2", "write 50M 1M", "write -z 3M 64k", "write -P 3 70M 4k")
        out["stop.qcow2"] = d / "stop.qcow2"
        qemu_img("convert", "-O", "raw", str(d / "stop.qcow2"), str(d / "stop.raw"))
        out["stop.raw"] = d / "stop.raw"
        # persistent bitmaps and an internal snapshot
        shutil.copy(d / "scatter.qcow2", d / "bitmaps.qcow2")
        qemu_img("bitmap", "--add", str(d / "bitmaps.qcow2"), "b0")
        qemu_img("bitmap", "--add", "-g", "512", str(d / "bitmaps.qcow2"), "a-much-longer-bitmap-name")
        qemu_img("bitmap", "--add", "-g", "2M", str(d / "bitmaps.qcow2"), "c")
        out["bitmaps.qcow2"] = d / "bitmaps.qcow2"
        shutil.copy(d / "scatter.qcow2", d / "snap.qcow2")
        qemu_img("snapshot", "-c", "s1", str(d / "snap.qcow2"))
        qemu_io(d / "snap.qcow2", "write 60M 2M")
        qemu_img("resize", str(d / "snap.qcow2"), "200M")
        qemu_io(d / "snap.qcow2", "write 150M 1M")
        out["snap.qcow2"] = d / "snap.qcow2"
    return out


def need(imgs: dict[str, Path], *names: str) -> list[str]:
    for n in names:
        if n not in imgs:
            pytest.skip(f"{n} needs qemu-io")
    return [str(imgs[n]) for n in names]


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------
IDENTICAL = [
    ("flat.raw", "flat.qcow2"), ("flat.qcow2", "flat.raw"), ("flat.raw", "flat4k.qcow2"),
    ("flat.qcow2", "flatx.qcow2"), ("flat.raw", "flatc.qcow2"), ("flat.qcow2", "flatv2.qcow2"),
    ("flat.raw", "chain.qcow2"), ("chain.qcow2", "flat.qcow2"), ("empty.qcow2", "empty.raw"),
    ("stop.qcow2", "stop.raw"), ("scatter.qcow2", "scatter.qcow2"),
]


@pytest.mark.parametrize("a,b", IDENTICAL)
def test_compare_identical(imgs, a, b):
    q, _ = same("compare", *need(imgs, a, b))
    assert q.returncode == 0 and q.stdout == b"Images are identical.\n"


DIFFERENT = [
    ("flat.raw", "diff.raw"), ("diff.raw", "flat.qcow2"), ("flat4k.qcow2", "diff.raw"),
    ("flat.raw", "diff2.raw"), ("diff2.raw", "flatc.qcow2"), ("flat.raw", "diff3.raw"),
    ("diff3.raw", "chain.qcow2"), ("empty.qcow2", "flat.qcow2"), ("flat.qcow2", "empty.raw"),
    ("stop.qcow2", "scatter.qcow2"), ("zeroed.qcow2", "flat.raw"),
]


@pytest.mark.parametrize("a,b", DIFFERENT)
def test_compare_different(imgs, a, b):
    q, _ = same("compare", *need(imgs, a, b))
    assert q.returncode == 1 and q.stdout.startswith(b"Content mismatch at offset ")


def test_compare_one_byte_offset(imgs):
    """The reported offset is the start of the 512-byte sector holding the differing byte."""
    q, _ = same("compare", str(imgs["flat.raw"]), str(imgs["diff.raw"]))
    assert q.stdout == f"Content mismatch at offset {3 * MiB + 512}!\n".encode()


SIZE_MISMATCH = [
    ("flat.raw", "long.raw"), ("long.raw", "flat.qcow2"), ("flat.qcow2", "longnz.raw"),
    ("longnz.qcow2", "flat.raw"), ("short.raw", "flat.raw"), ("empty.qcow2", "empty128.qcow2"),
    ("stop.qcow2", "scatter.qcow2"), ("odd.raw", "empty.raw"),
]


@pytest.mark.parametrize("a,b", SIZE_MISMATCH)
def test_compare_size_mismatch(imgs, a, b):
    q, _ = same("compare", *need(imgs, a, b))
    assert q.returncode in (0, 1)


def test_compare_size_mismatch_zero_tail(imgs):
    q, _ = same("compare", str(imgs["flat.raw"]), str(imgs["long.raw"]))
    assert q.stdout == b"Warning: Image size mismatch!\nImages are identical.\n" and q.returncode == 0


def test_compare_size_mismatch_nonzero_tail(imgs):
    q, _ = same("compare", str(imgs["longnz.qcow2"]), str(imgs["flat.raw"]))
    assert q.returncode == 1
    assert q.stdout == f"Warning: Image size mismatch!\nContent mismatch at offset {80 * MiB + 2560}!\n".encode()


STRICT = [
    ("flat.raw", "long.raw"), ("flat.raw", "flat.qcow2"), ("flat.qcow2", "flat4k.qcow2"),
    ("flat.qcow2", "flat.qcow2"), ("empty.qcow2", "zeroed.qcow2"), ("zeroed.qcow2", "zeroed.qcow2"),
    ("flat.raw", "flat.raw"), ("chain.qcow2", "flat.qcow2"), ("stop.qcow2", "stop.raw"),
    ("flat.raw", "diff.raw"),
]


@pytest.mark.parametrize("a,b", STRICT)
def test_compare_strict(imgs, a, b):
    same("compare", "-s", *need(imgs, a, b))


def test_compare_strict_messages(imgs):
    q, _ = same("compare", "-s", str(imgs["flat.raw"]), str(imgs["long.raw"]))
    assert q.returncode == 1 and q.stdout == b"Strict mode: Image size mismatch!\n"
    q, _ = same("compare", "-s", *need(imgs, "empty.qcow2", "zeroed.qcow2"))
    assert q.returncode == 1 and q.stdout.startswith(b"Strict mode: Offset ")


@pytest.mark.parametrize("opts", [["-q"], ["-p"], ["-p", "-q"], ["-p", "-s"]])
@pytest.mark.parametrize("a,b", [("flat.raw", "flat.qcow2"), ("flat.qcow2", "longnz.raw"),
                                 ("flat.raw", "long.raw"), ("diff.raw", "flat.raw")])
def test_compare_quiet_progress(imgs, opts, a, b):
    same("compare", *opts, str(imgs[a]), str(imgs[b]))


def test_compare_formats_and_cache(imgs):
    same("compare", "-f", "raw", "-F", "qcow2", "-T", "writeback", "-U", str(imgs["flat.raw"]),
         str(imgs["flat.qcow2"]))
    # forcing raw on a qcow2 compares its metadata bytes: a mismatch
    same("compare", "-f", "raw", "-F", "raw", str(imgs["flat.qcow2"]), str(imgs["flat.raw"]))


def test_compare_errors(imgs, tmp_path):
    missing = str(tmp_path / "missing.qcow2")
    q, _ = same("compare", missing, str(imgs["flat.raw"]))
    assert q.returncode == 2
    q, _ = same("compare", str(imgs["flat.raw"]), missing)
    assert q.returncode == 2
    q, _ = same("compare", "-p", str(imgs["flat.raw"]), missing)
    assert q.returncode == 2
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"junk" * 100)
    q, _ = same("compare", "-f", "qcow2", str(junk), str(imgs["flat.raw"]))
    assert q.returncode == 2
    q, _ = same("compare", "-T", "bogus", str(imgs["flat.raw"]), str(imgs["flat.raw"]))
    assert q.returncode == 2
    q, _ = same("compare", str(imgs["flat.raw"]))
    assert q.returncode == 1


# --------------------------------------------------------------------------------------------------
# measure
# --------------------------------------------------------------------------------------------------
SIZE_CASES = [
    ["--size", "10G", "-O", "qcow2"],
    ["--size", "1M", "-O", "qcow2"],
    ["--size", "100G", "-O", "qcow2"],
    ["--size", "0", "-O", "qcow2"],
    ["--size", "513", "-O", "qcow2"],
    ["--size", "10G", "-O", "raw"],
    ["--size", "1", "-O", "raw"],
    ["--size", "1000"],
]
for _size in ("10G", "1M", "100G"):
    for _o in ("cluster_size=4k", "cluster_size=2M", "cluster_size=512", "refcount_bits=1",
               "refcount_bits=64", "extended_l2=on", "extended_l2=on,cluster_size=2M",
               "refcount_bits=1,cluster_size=512", "compat=0.10", "preallocation=full",
               "preallocation=metadata", "backing_file=x.qcow2"):
        SIZE_CASES.append(["--size", _size, "-O", "qcow2", "-o", _o])


@pytest.mark.parametrize("args", SIZE_CASES, ids=lambda a: " ".join(a))
def test_measure_size(args):
    q, p = same("measure", "--output=json", *args)
    assert q.returncode == 0
    assert json.loads(p.stdout) == json.loads(q.stdout)


def test_measure_human():
    q, _ = same("measure", "--size", "10G", "-O", "qcow2")
    assert q.stdout == b"required size: 1900544\nfully allocated size: 10739318784\n"
    same("measure", "--output=human", "--size", "1G", "-O", "qcow2", "-o", "cluster_size=4k,refcount_bits=8")


FILE_CASES = [
    ("empty.qcow2", []), ("empty.qcow2", ["-o", "compat=0.10"]), ("scatter.qcow2", []),
    ("scatter.qcow2", ["-o", "cluster_size=512"]), ("scatter.qcow2", ["-o", "cluster_size=2M"]),
    ("scatter.qcow2", ["-o", "cluster_size=4k,refcount_bits=1"]), ("scatter.qcow2", ["-o", "extended_l2=on"]),
    ("scatter.qcow2", ["-o", "backing_file=foo"]), ("scatter.qcow2", ["-o", "preallocation=falloc"]),
    ("stop.qcow2", []), ("stop.qcow2", ["-o", "cluster_size=4k"]), ("chain.qcow2", []),
    ("flat.raw", []), ("flat.raw", ["-o", "cluster_size=512"]), ("empty.raw", []), ("odd.raw", []),
    ("flatc.qcow2", []), ("flatv2.qcow2", []), ("flatx.qcow2", ["-o", "cluster_size=16k"]),
    ("bitmaps.qcow2", []), ("bitmaps.qcow2", ["-o", "cluster_size=512"]), ("bitmaps.qcow2", ["-o", "compat=0.10"]),
]


@pytest.mark.parametrize("target", ["qcow2", "raw"])
@pytest.mark.parametrize("name,opts", FILE_CASES, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_measure_file(imgs, name, opts, target):
    if target == "raw":
        opts = []
    q, p = same("measure", "--output=json", "-O", target, *opts, *need(imgs, name))
    assert q.returncode == 0
    assert json.loads(p.stdout) == json.loads(q.stdout)


def test_measure_file_human_with_bitmaps(imgs):
    q, _ = same("measure", "-O", "qcow2", *need(imgs, "bitmaps.qcow2"))
    assert b"bitmaps size: " in q.stdout


@pytest.mark.parametrize("snap", ["s1", "1", "nosuch"])
@pytest.mark.parametrize("target", ["qcow2", "raw"])
def test_measure_snapshot(imgs, snap, target):
    same("measure", "--output=json", "-O", target, "-l", snap, *need(imgs, "snap.qcow2"))


def test_measure_forced_format(imgs):
    same("measure", "-O", "qcow2", "-f", "raw", str(imgs["flat.qcow2"]))
    same("measure", "-O", "qcow2", "-l", "s1", str(imgs["flat.raw"]))


ERROR_CASES = [
    ["--size", "1G", "FILE"],
    [],
    ["-f", "qcow2"],
    ["-l", "snap"],
    ["FILE", "FILE"],
    ["--size", "abc"],
    ["--size", "-1"],
    ["--size", "9E"],
    ["--size", "1G", "--output=xml"],
    ["--size", "1G", "-O", "vmdk"],
    ["--size", "1G", "-O", "vdi"],
    ["--size", "1G", "-O", "vhdx"],
    ["--size", "1G", "-O", "dmg"],
    ["--size", "1G", "-O", "foo"],
    ["--size", "1G", "-O", "qcow2", "-o", "foo=bar"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=maybe"],
    ["--size", "1G", "-O", "qcow2", "-o", "cluster_size=3000"],
    ["--size", "1G", "-O", "qcow2", "-o", "refcount_bits=3"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=0.10,refcount_bits=8"],
    ["--size", "1G", "-O", "qcow2", "-o", "compat=2"],
    ["--size", "1G", "-O", "qcow2", "-o", "preallocation=bogus"],
    ["--size", "1G", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=8k"],
    ["--size", "1P", "-O", "qcow2", "-o", "cluster_size=512"],
    ["--size", "1G", "-O", "raw", "-o", "cluster_size=64k"],
    ["-O", "qcow2", "-o", "size=1G"],
    ["MISSING"],
]


@pytest.mark.parametrize("args", ERROR_CASES, ids=lambda a: " ".join(a) or "noargs")
def test_measure_errors(imgs, tmp_path, args):
    args = [str(imgs["flat.raw"]) if a == "FILE" else str(tmp_path / "missing") if a == "MISSING" else a
            for a in args]
    q, _ = same("measure", *args)
    assert q.returncode == 1
