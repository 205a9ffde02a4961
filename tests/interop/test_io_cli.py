"""``parablock io`` against the real qemu-io: same commands on twin images, same output and exit code,
and images that ``qemu-img compare`` calls identical and ``qemu-img check`` calls clean.

Only the numbers of the timing line differ between two runs; :func:`normalise` blanks them (and turns
qemu-io's program-name prefix into ours).  Every test works in its own ``tmp_path``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

QEMU_IO = shutil.which("qemu-io")
QEMU_IMG = shutil.which("qemu-img")
REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(QEMU_IO is None or QEMU_IMG is None, reason="qemu-io / qemu-img not installed")

TIMEOUT = 120


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def run_parablock_io(*args: str) -> subprocess.CompletedProcess:
    """``parablock io ARGS`` as a subprocess from the repository root (so ``engine`` imports)."""
    return subprocess.run([sys.executable, "-m", "engine", "io", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=TIMEOUT)


def run_qemu_io(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IO, *args], capture_output=True, text=True, timeout=TIMEOUT)


def qemu_img(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=TIMEOUT)
    if check:
        assert res.returncode == 0, f"qemu-img {' '.join(args)}: {res.stdout}{res.stderr}"
    return res


_STATS = re.compile(r"^(.*), (\d+) ops; (?:\d+:\d\d:)?\d\d\.\d\d(?: sec)? \(.*/sec and .* ops/sec\)$")
_CSV_STATS = re.compile(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[^,]+,[^,]+$")


def normalise(text: str, directory: Path) -> list[str]:
    """Blank the timing numbers, the image directory and qemu-io's program name."""
    lines = []
    for line in text.replace(str(directory), "DIR").splitlines():
        m = _STATS.match(line)
        if m:
            line = f"{m.group(1)}, {m.group(2)} ops; TIME (RATE)"
        m = _CSV_STATS.match(line)
        if m:
            line = f"{m.group(1)},{m.group(2)},TIME,RATE,RATE"
        if line.startswith("qemu-io: "):
            line = "parablock: " + line[len("qemu-io: "):]
        lines.append(line)
    return lines


@dataclass
class Twins:
    """The same image created twice: ``q`` for qemu-io, ``p`` for parablock."""

    qdir: Path
    pdir: Path
    name: str
    fmt: str

    @property
    def q(self) -> Path:
        return self.qdir / self.name

    @property
    def p(self) -> Path:
        return self.pdir / self.name


def make_twins(tmp_path: Path, fmt: str = "qcow2", size: str = "1M", opts: str | None = None,
               name: str | None = None, base_cmds: tuple[str, ...] = ()) -> Twins:
    """Create the image in two directories.  With ``base_cmds`` the image is an overlay over a
    ``base.qcow2`` that qemu-io filled with those commands (the same in both directories)."""
    qdir, pdir = tmp_path / "q", tmp_path / "p"
    qdir.mkdir(exist_ok=True)
    pdir.mkdir(exist_ok=True)
    name = name or f"img.{fmt}"
    for d in (qdir, pdir):
        args = ["create", "-q", "-f", fmt]
        if base_cmds:
            base = d / "base.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", str(base), size)
            cargs = [a for c in base_cmds for a in ("-c", c)]
            res = run_qemu_io("-f", "qcow2", *cargs, str(base))
            assert res.returncode == 0, res.stdout + res.stderr
            args += ["-b", "base.qcow2", "-F", "qcow2"]
        if opts:
            args += ["-o", opts]
        args += [str(d / name)]
        if not base_cmds:
            args.append(size)
        qemu_img(*args)
    return Twins(qdir, pdir, name, fmt)


def _map_json(path: Path, fmt: str) -> list[dict]:
    res = qemu_img("map", "--output=json", "-f", fmt, str(path))
    out = json.loads(res.stdout)
    for ext in out:
        ext.pop("offset", None)
    return out


def compare_io(tw: Twins, *cmds: str, opts: tuple[str, ...] | None = None, same_map: bool = True,
               expect_rc: int | None = None, same_stderr: bool = True) -> list[str]:
    """Run ``cmds`` through qemu-io and parablock io on the twins; assert identical normalised stdout,
    stderr and exit code, identical image content, a clean ``qemu-img check``; return the output lines."""
    if opts is None:
        opts = ("-f", tw.fmt)
    cargs = [a for c in cmds for a in ("-c", c)]
    q = run_qemu_io(*opts, *cargs, str(tw.q))
    p = run_parablock_io(*opts, *cargs, str(tw.p))
    assert "Traceback" not in p.stderr, p.stderr
    q_out, p_out = normalise(q.stdout, tw.qdir), normalise(p.stdout, tw.pdir)
    assert p_out == q_out
    if same_stderr:
        assert normalise(p.stderr, tw.pdir) == normalise(q.stderr, tw.qdir)
    assert p.returncode == q.returncode
    if expect_rc is not None:
        assert p.returncode == expect_rc
    if tw.q.exists():
        res = qemu_img("compare", "-f", tw.fmt, "-F", tw.fmt, str(tw.q), str(tw.p), check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        if tw.fmt == "qcow2":
            res = qemu_img("check", "-f", "qcow2", str(tw.p), check=False)
            assert res.returncode == 0, res.stdout + res.stderr
        if same_map:
            assert _map_json(tw.p, tw.fmt) == _map_json(tw.q, tw.fmt)
    return p_out


# --------------------------------------------------------------------------------------------------
# unit checks of the helpers (no qemu needed, but cheap)
# --------------------------------------------------------------------------------------------------
def test_normalise_blanks_timing(tmp_path: Path) -> None:
    text = ("read 4096/4096 bytes at offset 0\n"
            "4 KiB, 1 ops; 00.00 sec (67.084 MiB/sec and 17173.5733 ops/sec)\n"
            "1 MiB, 1 ops; 0:00:01.25 (800 KiB/sec and 0.8000 ops/sec)\n"
            "qemu-io: Block node is read-only\n")
    assert normalise(text, tmp_path) == ["read 4096/4096 bytes at offset 0", "4 KiB, 1 ops; TIME (RATE)",
                                         "1 MiB, 1 ops; TIME (RATE)", "parablock: Block node is read-only"]


# --------------------------------------------------------------------------------------------------
# read / write
# --------------------------------------------------------------------------------------------------
def test_write_read_pattern_map_info_qcow2(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "write -P 0xab 0 64k", "read -P 0xab 0 4k", "read -v 0 32", "read -v 65530 40",
                     "map", "info", expect_rc=0)
    assert out[0] == "wrote 65536/65536 bytes at offset 0"
    assert "64 KiB (0x10000) bytes     allocated at offset 0 bytes (0x0)" in out
    assert "Format specific information:" in out


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_partial_clusters(tmp_path: Path, fmt: str) -> None:
    tw = make_twins(tmp_path, fmt)
    compare_io(tw, "write -P 1 1000 3000", "write -P 2 60k 8k", "write 127k 2k", "w -P 0x7f 1023k 1k",
               "read -P 1 1000 3000", "read -P 2 60k 8k", "read -P 0 0 1000", "r -P 0xcd 127k 2k",
               "read -v 1020 40", "read -P 0x7f 1023k 1k", "map", expect_rc=0)


def test_ascii_dump_and_default_pattern(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -P 0x41 0 7", "write -P 0x7a 7 3", "write -P 0x39 10 1", "write -P 0x20 11 1",
               "write 12 20", "read -v 0 45", "read -v 3 1", expect_rc=0)


def test_source_file_pattern(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    src = tmp_path / "pattern.bin"
    src.write_bytes(b"hello, world")
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    compare_io(tw, f"write -s {src} 0 100", "read -v 0 40", f"write -s {empty} 0 10",
               f"write -s {tmp_path}/missing 0 10", expect_rc=1)


def test_quiet_and_csv_stats(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "write -q -P 9 0 64k", "read -q -P 9 0 64k", "read -C 0 512", "write -C 0 512",
                     "discard -q 64k 64k", "discard -C 128k 64k", "read -q -v 0 16", expect_rc=0)
    assert out == ["512,1,TIME,RATE,RATE"] * 2 + ["65536,1,TIME,RATE,RATE"]


# --------------------------------------------------------------------------------------------------
# zero writes, compression, discard
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_write_zeroes(tmp_path: Path, fmt: str) -> None:
    tw = make_twins(tmp_path, fmt)
    compare_io(tw, "write -P 5 0 512k", "write -z 0 64k", "write -z -u 64k 64k", "write -z 130k 2k",
               "write -z -u 200k 10k", "write -z -u 384k 128k",
               "read -P 0 0 128k", "read -P 5 128k 2k", "read -P 0 130k 2k", "read -P 0 200k 10k",
               "read -P 5 210k 100k", "map", expect_rc=0)


def test_write_zeroes_partial_unallocated_cluster(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -z 1000k 24k", "write -z 4k 4k", "write -z 512k 512", "map", expect_rc=0)


def test_write_zeroes_extended_l2(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, opts="extended_l2=on")
    compare_io(tw, "write -P 5 0 256k", "write -z 0 2k", "write -z 4k 8k", "write -z -u 64k 64k",
               "read -P 5 2k 2k", "read -P 0 4k 8k", "read -P 5 12k 52k", "map", expect_rc=0)


def test_write_zeroes_option_errors(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -u 0 4k", "write -z -P 1 0 4k", "write -n 0 4k", "write -b -z 0 512",
               "write -f -c 0 64k", expect_rc=1)


def test_compressed_qcow2(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -c 0 64k", "write -c -P 0x11 128k 128k", "write -c 960k 64k",
               "read -P 0xcd 0 64k", "read -P 0x11 128k 128k", "map", expect_rc=0)
    res = qemu_img("check", "--output=json", str(tw.p))
    assert json.loads(res.stdout)["compressed-clusters"] == 4


def test_compressed_errors(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -c 0 4k", "write -c 512 64k", "write -c 1 512", "write -c 0 1000",
               "write -c 64k 64k", "write -c 64k 64k", "map", expect_rc=1)


def test_compressed_raw_not_supported(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, "raw")
    out = compare_io(tw, "write -c 0 64k", expect_rc=1)
    assert out == ["write failed: Operation not supported"]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_discard(tmp_path: Path, fmt: str) -> None:
    tw = make_twins(tmp_path, fmt)
    compare_io(tw, "write -P 3 0 512k", "discard 0 64k", "discard 100k 100k", "d -q 192k 64k",
               "discard 300k 1k", "discard 0 0", "read -P 0 0 64k", "read -P 3 64k 36k", "map",
               same_map=fmt == "qcow2", expect_rc=0)


def test_discard_v2_image(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, opts="compat=0.10")
    compare_io(tw, "write -P 3 0 256k", "discard 64k 64k", "write -z 128k 64k", "write -z 200k 4k",
               "read -P 0 64k 128k", "map", "info", expect_rc=0)


# --------------------------------------------------------------------------------------------------
# map and info
# --------------------------------------------------------------------------------------------------
def test_backing_chain_map(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, base_cmds=("write -P 5 0 128k", "write -P 6 512k 64k"))
    out = compare_io(tw, "write -P 7 64k 128k", "map", "read -P 5 0 64k", "read -P 7 64k 128k",
                     "read -P 6 512k 64k", "write -z 512k 32k", "read -P 0 512k 32k", "read -P 6 544k 32k",
                     "discard 0 64k", "read -P 0 0 64k", "map", "alloc 0 1M", "alloc 512k", "info",
                     expect_rc=0)
    assert "64 KiB (0x10000) bytes not allocated at offset 0 bytes (0x0)" in out


def test_backing_shorter_than_overlay(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, size="256k", base_cmds=("write -P 5 0 256k",))
    for d in (tw.qdir, tw.pdir):
        qemu_img("resize", "-q", str(d / tw.name), "1M")
    compare_io(tw, "map", "read -P 5 0 256k", "read -P 0 256k 768k", "write -P 1 900k 4k", "map",
               expect_rc=0)


@pytest.mark.parametrize("opts", [None, "compat=0.10", "lazy_refcounts=on",
                                  "extended_l2=on,cluster_size=128k,compression_type=zstd,refcount_bits=8",
                                  "cluster_size=4k"])
def test_info_qcow2(tmp_path: Path, opts: str | None) -> None:
    tw = make_twins(tmp_path, size="3G", opts=opts)
    out = compare_io(tw, "info", "map", "length", expect_rc=0)
    assert out[0] == "format name: qcow2"


def test_info_raw_and_empty(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, "raw", size="1000")
    compare_io(tw, "info", "length", "map", "read -v 990 30", expect_rc=0)
    tw = make_twins(tmp_path, size="0", name="empty.qcow2")
    compare_io(tw, "info", "length", "map", "read 0 0", "read 0 1", expect_rc=1)


def test_alloc_and_length(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write 64k 4k", "alloc 0", "alloc 0 128k", "a 1k 2M", "alloc 1M", "alloc 2M",
               "alloc -1", "length", "l", expect_rc=1)


# --------------------------------------------------------------------------------------------------
# errors and exit codes
# --------------------------------------------------------------------------------------------------
def test_pattern_mismatch_fails(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "write -P 1 0 4k", "read -P 2 0 4k", "read -P 1 0 4k", expect_rc=1)
    assert "Pattern verification failed at offset 0, 4096 bytes" in out


def test_pattern_window(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -P 1 256 128", "read -P 1 -s 256 -l 128 0 512", "read -P 0 -s 256 -l 128 0 512",
               "read -P 0 -s 512 0 512", "read -P 0 -l 2k 0 512", "read -s 0 0 512", expect_rc=1)


@pytest.mark.parametrize("cmd", ["bogus", "read 0", "read", "read abc 4k", "read 0 4k 5", "read 0 -1",
                                 "read -x 0 4k", "read 0 4k -P", "read -P 300 0 1", "read -P -1 0 1",
                                 "read -P 012 0 1", "read -P0x0 0 1", "flush x", "map x", "info 1 2",
                                 "write 0", "write 1M 1", "read 1M 1", "read 2M 0", "read 1020k 8k",
                                 "discard 1020k 8k", "read 0 2G", "write 0 2G", "discard 0 3G",
                                 "read 0 99999999999999999999", "alloc", "alloc 1 2 3", "sleep x",
                                 "sleep 1", "read -- 0 512", "r -vq 0 16", "read 0 4k -P 0", "write -z 1020k 8k",
                                 "write -P 0x100 0 1", "write -b 3 512", "read -b 0 5"])
def test_command_errors(tmp_path: Path, cmd: str) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, cmd, "read 0 512")


@pytest.mark.parametrize("num", ["0x10", "0x10k", "1.5k", "1.k", "1.5", "1.", "+5", "1e3", "1.5e3", "7E",
                                 "8E", "16E", "1b", "4K", "0X20", "07", "0x", "18446744073709551615",
                                 "18446744073709551616", "99999999999999999999k", ".5k", "0.5", "1.0",
                                 "1k5", "0x1.5", "1.5M", "0.25k", "1.0009k", "2g"])
def test_number_parsing(tmp_path: Path, num: str) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, f"read {num} 0", f"alloc {num}")


def test_all_commands_run_after_a_failure(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "bogus", "read 0", "read abc 4k", "write -P 4 0 4k", "read -P 4 0 4k", expect_rc=1)
    assert out[-2] == "read 4096/4096 bytes at offset 0"


def test_quit_stops(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "write 0 4k", "quit", "write -P 1 0 4k", "bogus", expect_rc=0)
    assert len(out) == 2


def test_read_only_open(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    out = compare_io(tw, "write 0 4k", "discard 0 64k", "read -P 0 0 4k", "flush", "map",
                     opts=("-r", "-f", "qcow2"), expect_rc=1)
    assert out[0] == "read 4096/4096 bytes at offset 0"
    p = run_parablock_io("-r", "-f", "qcow2", "-c", "write 0 4k", str(tw.p))
    assert p.stderr.splitlines() == ["parablock: Block node is read-only"]


def test_probed_raw(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, "raw")
    compare_io(tw, "write -P 1 0 512", "read -P 1 0 512", "info", opts=(), expect_rc=0)
    compare_io(tw, "read -P 1 0 512", opts=("-r",), expect_rc=0)
    magic = tmp_path / "magic.bin"
    magic.write_bytes(b"QFI\xfb\x00\x00\x00\x03")
    # a probed raw image must not be turned into something that probes as another format
    out = compare_io(tw, f"write -s {magic} 0 8", f"write -s {magic} 0 512", f"write -s {magic} 512 8",
                     opts=(), expect_rc=1)
    assert out[:2] == ["write failed: Operation not permitted"] * 2
    compare_io(tw, f"write -s {magic} 0 8", opts=("-f", "raw"), expect_rc=0)


def test_force_share_and_nocache(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "read 0 512", opts=("-U",), expect_rc=1)
    compare_io(tw, "read 0 512", opts=("-U", "-r"), expect_rc=0)
    compare_io(tw, "write 0 512", opts=("-n", "-f", "qcow2"), expect_rc=0)


def test_open_failures(tmp_path: Path) -> None:
    tw = make_twins(tmp_path, "raw")
    compare_io(tw, "read 0 512", opts=("-f", "qcow2"), expect_rc=1)
    compare_io(tw, "read 0 512", opts=("-f", "nosuchfmt"), expect_rc=1)
    compare_io(tw, "read 0 512", opts=("-f", "raw", "-t", "bogus"), expect_rc=1)
    missing = Twins(tw.qdir, tw.pdir, "missing.qcow2", "qcow2")
    compare_io(missing, "read 0 512", expect_rc=1)


def test_cache_modes(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -P 8 0 64k", "flush", "read -P 8 0 64k", opts=("-f", "qcow2", "-t", "writeback"),
               expect_rc=0)
    compare_io(tw, "write -P 9 64k 64k", "read -P 9 64k 64k", opts=("-f", "qcow2", "-t", "unsafe"),
               expect_rc=0)


# --------------------------------------------------------------------------------------------------
# abort: a crash that leaves a lazy-refcounts image dirty
# --------------------------------------------------------------------------------------------------
def test_abort_compared(tmp_path: Path) -> None:
    tw = make_twins(tmp_path)
    compare_io(tw, "write -P 2 0 64k", "flush", "abort", "write 64k 64k")


def test_lazy_refcounts_crash(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "1M")
    p = run_parablock_io("-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "flush", "-c", "abort", str(img))
    assert p.returncode < 0 or p.returncode == 134, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["format-specific"]["data"]["lazy-refcounts"] is True
    assert info["dirty-flag"] is True
    assert qemu_img("check", str(img), check=False).returncode != 0
    res = qemu_img("check", "-r", "all", str(img), check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert qemu_img("check", str(img), check=False).returncode == 0
    q = run_qemu_io("-r", "-f", "qcow2", "-c", "read -P 1 0 64k", "-c", "read -P 0 64k 960k", str(img))
    assert q.returncode == 0, q.stdout + q.stderr
    assert "Pattern verification failed" not in q.stdout
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["dirty-flag"] is False


def test_lazy_refcounts_clean_close(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img), "1M")
    p = run_parablock_io("-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "flush", str(img))
    assert p.returncode == 0, p.stderr
    info = json.loads(qemu_img("info", "--output=json", str(img)).stdout)
    assert info["dirty-flag"] is False
    assert qemu_img("check", str(img), check=False).returncode == 0


def _crashed_twins(tmp_path: Path) -> Twins:
    """Twin lazy-refcounts images left dirty by ``parablock io ... abort``."""
    tw = make_twins(tmp_path, opts="lazy_refcounts=on")
    p = run_parablock_io("-f", "qcow2", "-c", "write -P 1 0 64k", "-c", "write -P 3 192k 4k", "-c", "flush",
                         "-c", "abort", str(tw.p))
    assert p.returncode < 0 or p.returncode == 134
    shutil.copyfile(tw.p, tw.q)
    return tw


def test_reopen_dirty_image_after_crash(tmp_path: Path) -> None:
    tw = _crashed_twins(tmp_path)
    compare_io(tw, "read -P 1 0 64k", "read -P 3 192k 4k", "write -P 2 64k 64k", "map", expect_rc=0,
               same_stderr=False)
    for img in (tw.p, tw.q):
        assert json.loads(qemu_img("info", "--output=json", str(img)).stdout)["dirty-flag"] is False


def test_reopen_dirty_image_repair_messages(tmp_path: Path) -> None:
    tw = _crashed_twins(tmp_path)
    compare_io(tw, "read -P 1 0 64k", expect_rc=0)
