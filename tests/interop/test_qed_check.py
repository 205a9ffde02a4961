"""``parablock check`` on QED images against ``qemu-img check`` 7.2.

qemu-img and qemu-io make the images, the tests damage them with byte patches (table entries past the
end of the file, misaligned, pointing into the L1 table, at another L2 table or at a cluster already in
use; clusters appended to the file; a truncated file; the need-check flag), then run both programs on
identical copies, without repair and with ``-r leaks`` / ``-r all``, in human and JSON output: stdout,
stderr (modulo the program name) and the exit code must be equal, and so must the files afterwards
(the repair writes what QEMU's writes).  QEMU's quirks are matched: its bitmap index (offset divided by
cluster_size - 1) gives phantom leaks in files of more than 4095 clusters of 4 KiB, and its C int leak
count wraps for an 8 TiB sparse file.  A failed check (an unreadable L2 table) gives qemu-img's
"Check failed" text.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from engine.cli.main import main
from engine.formats.qcow2_check import FIX_ERRORS, FIX_LEAKS
from tests.util import needs_qemu, open_node, qemu_check, qemu_img, qemu_io, run
from tests.interop.test_qed import _dirty_image

pytestmark = needs_qemu
NEED_CHECK = 2
_HEADER = struct.Struct("<IIIIQQQQQII")


# --------------------------------------------------------------------------------------------------
# base images (made once per session) and byte-level damage
# --------------------------------------------------------------------------------------------------
_BASES: dict[str, tuple[list[str], str, list[str]]] = {
    # 64 KiB clusters, 4-cluster tables (4 slices of 64 KiB): data in the first and the second slice of
    # the first L2 table, a zero cluster, a fragmented run
    "big": (
        [],
        "1G",
        ["write -P 0xab 0 64k", "write -P 0xcd 5M 128k", "write -z 1M 64k", "write -P 0xee 600M 64k"],
    ),
    # 4 KiB clusters, 2-cluster tables: each L2 table maps 4 MiB, so several L2 tables
    "small": (
        ["-o", "cluster_size=4k,table_size=2"],
        "16M",
        ["write -P 1 0 8k", "write -P 2 4M 4k", "write -P 3 9M 12k", "write -z 12M 4k", "write -P 4 1M 4k"],
    ),
    # 4 KiB clusters, more than 4095 clusters in the file: QEMU's check indexes its bitmap by
    # offset / 4095, so it skips an index after cluster 4094 and counts it as a leak
    "many": (["-o", "cluster_size=4k"], "32M", ["write -P 0 0 17M", "write -P 7 0 64k", "write -P 9 16M 4k"]),
}


@functools.cache
def _base_bytes(name: str, tmp: str) -> bytes:
    opts, size, writes = _BASES[name]
    img = Path(tmp) / f"{name}.qed"
    qemu_img("create", "-q", "-f", "qed", *opts, str(img), size)
    args: list[str] = []
    for w in writes:
        args += ["-c", w]
    qemu_io("-f", "qed", *args, str(img))
    return img.read_bytes()


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("qed_check_bases"))


def _aborted_bytes(tmp: str) -> bytes:
    """An image left dirty for real: qemu-io aborts after allocating writes, need-check stays set."""
    img = Path(tmp) / "dirty.qed"
    if not img.exists():
        _dirty_image(Path(tmp))
    data = img.read_bytes()
    assert _features(data) & NEED_CHECK
    return data


def _features(buf: bytes) -> int:
    return _HEADER.unpack_from(buf, 0)[4]


def _geometry(buf: bytes) -> tuple[int, int, int]:
    """(cluster size, table size in bytes, L1 table offset) of an image."""
    h = _HEADER.unpack_from(buf, 0)
    return h[1], h[1] * h[2], h[7]


def _l1(buf: bytes, i: int) -> int:
    _, _, l1 = _geometry(buf)
    return struct.unpack_from("<Q", buf, l1 + 8 * i)[0]


def _set_l1(buf: bytearray, i: int, value: int) -> None:
    _, _, l1 = _geometry(buf)
    struct.pack_into("<Q", buf, l1 + 8 * i, value)


def _l2(buf: bytes, l1i: int, i: int) -> int:
    return struct.unpack_from("<Q", buf, _l1(buf, l1i) + 8 * i)[0]


def _set_l2(buf: bytearray, l1i: int, i: int, value: int) -> None:
    struct.pack_into("<Q", buf, _l1(buf, l1i) + 8 * i, value)


def _set_dirty(buf: bytearray) -> None:
    struct.pack_into("<Q", buf, 16, _features(buf) | NEED_CHECK)


def _append_clusters(buf: bytearray, n: int) -> None:
    buf += bytes(n * _geometry(buf)[0])


def _past_eof(buf: bytes) -> int:
    cs = _geometry(buf)[0]
    return (len(buf) // cs + 7) * cs


def _truncate_l2(buf: bytearray) -> None:
    """Cut the file inside the first L2 table: the L1 entry becomes invalid, the data before it leaks."""
    cs, _, _ = _geometry(buf)
    del buf[_l1(buf, 0) + 2 * cs :]


def _truncate_data(buf: bytearray) -> None:
    """Cut the last data cluster (with a partial cluster left over): its L2 entry points past the end."""
    cs = _geometry(buf)[0]
    del buf[len(buf) - cs + 100 :]


Damage = Callable[[bytearray], None]
_CASES: dict[str, tuple[str, list[Damage]]] = {
    "clean": ("big", []),
    "clean_small": ("small", []),
    "l2_past_eof": ("big", [lambda b: _set_l2(b, 0, 5, _past_eof(b))]),
    "l2_misaligned": ("big", [lambda b: _set_l2(b, 0, 5, _l2(b, 0, 0) + 256)]),
    "l1_misaligned": ("big", [lambda b: _set_l1(b, 1, _l1(b, 0) + 0x100)]),
    "l1_past_eof": ("big", [lambda b: _set_l1(b, 2, _past_eof(b))]),
    "l1_zero_cluster": ("big", [lambda b: _set_l1(b, 2, 1)]),
    "leaks": ("big", [lambda b: _append_clusters(b, 3)]),
    "partial_cluster": ("big", [lambda b: b.extend(bytes(100))]),
    "truncated_data": ("big", [_truncate_data]),
    "truncated_l2": ("big", [_truncate_l2]),
    "dup_data": ("big", [lambda b: _set_l2(b, 0, 20, _l2(b, 0, 0))]),
    "data_in_l1": ("big", [lambda b: _set_l2(b, 0, 20, _geometry(b)[2] + _geometry(b)[0])]),
    "shared_l2": ("big", [lambda b: _set_l1(b, 3, _l1(b, 0))]),
    "data_in_later_l2": ("small", [lambda b: _set_l2(b, 0, 30, _l1(b, 2) + 4096)]),
    "many": ("many", []),
    # a table over data clusters 4093..4096, across the skipped index: QEMU finds 3 overlaps, not 4
    "many_table_across_skip": ("many", [lambda b: _set_l1(b, 3, 4093 * 4096)]),
    "many_dup_high": ("many", [lambda b: _set_l2(b, 2, 7, 4200 * 4096), lambda b: _append_clusters(b, 2)]),
    "dirty": ("big", [_set_dirty]),
    "dirty_bad": (
        "big",
        [
            _set_dirty,
            lambda b: _set_l2(b, 0, 5, _past_eof(b)),
            lambda b: _set_l1(b, 1, _l1(b, 0) + 0x100),
            lambda b: _append_clusters(b, 2),
        ],
    ),
    "dirty_dup": ("big", [_set_dirty, lambda b: _set_l2(b, 0, 20, _l2(b, 0, 0))]),
    "dup_and_bad": (
        "small",
        [lambda b: _set_l2(b, 0, 40, _l2(b, 0, 0)), lambda b: _set_l2(b, 2, 9, _past_eof(b))],
    ),
    "mixed_small": (
        "small",
        [
            lambda b: _set_l2(b, 1, 3, _past_eof(b)),
            lambda b: _set_l2(b, 1, 4, 12345),
            lambda b: _set_l1(b, 3, 0x1800),
            lambda b: _append_clusters(b, 5),
        ],
    ),
    "aborted": ("aborted", []),
    "aborted_bad": ("aborted", [lambda b: _set_l2(b, 0, 1, _past_eof(b)), lambda b: _set_l1(b, 1, 0x12345)]),
}


def _image(name: str, base_dir: str) -> bytes:
    base, damages = _CASES[name]
    buf = bytearray(_aborted_bytes(base_dir) if base == "aborted" else _base_bytes(base, base_dir))
    for d in damages:
        d(buf)
    return bytes(buf)


# --------------------------------------------------------------------------------------------------
# running both programs
# --------------------------------------------------------------------------------------------------
def _write_sparse(path: Path, data: bytes) -> None:
    """Write ``data`` leaving holes where it is zero (the 17 MiB images are mostly zeros)."""
    chunk = 1 << 16
    zero = bytes(chunk)
    with open(path, "wb") as f:
        for pos in range(0, len(data), chunk):
            piece = data[pos : pos + chunk]
            if piece != zero[: len(piece)]:
                f.seek(pos)
                f.write(piece)
        f.truncate(len(data))


def _both(tmp_path: Path, data: bytes, args: list[str], capsys, monkeypatch):
    """Run ``qemu-img check ARGS img.qed`` and ``parablock check ARGS img.qed`` on identical copies (same
    relative name, so the JSON filename is equal).  Returns ((rc, out, err) of qemu, of parablock, the
    two files)."""
    qdir, pdir = tmp_path / "q", tmp_path / "p"
    qdir.mkdir()
    pdir.mkdir()
    _write_sparse(qdir / "img.qed", data)
    _write_sparse(pdir / "img.qed", data)
    q = run(["qemu-img", "check", "-f", "qed", *args, "img.qed"], cwd=qdir, check=False)
    with monkeypatch.context() as m:
        m.chdir(pdir)
        rc = main(["check", "-f", "qed", *args, "img.qed"])
    out, err = capsys.readouterr()
    return (q.returncode, q.stdout, q.stderr), (rc, out, err), qdir / "img.qed", pdir / "img.qed"


def _assert_same(qres, pres) -> None:
    """Equal exit code, stdout (JSON keys in qemu-img's order too) and stderr modulo the program name."""
    assert pres[0] == qres[0], (qres, pres)
    assert pres[1] == qres[1]
    assert pres[2].replace("parablock:", "qemu-img:") == qres[2]


_MODES = [
    pytest.param(r, o, id=f"{'r-' + r[1] if r else 'check'}-{o[0][9:] if o else 'human'}")
    for r in ([], ["-r", "leaks"], ["-r", "all"])
    for o in ([], ["--output=json"])
]


@pytest.mark.parametrize("repair,output", _MODES)
@pytest.mark.parametrize("case", list(_CASES))
def test_check_matches_qemu(case, repair, output, base_dir, tmp_path, capsys, monkeypatch):
    data = _image(case, base_dir)
    qres, pres, qfile, pfile = _both(tmp_path, data, [*repair, *output], capsys, monkeypatch)
    _assert_same(qres, pres)
    # the same repair: byte-identical files (unchanged without -r)
    assert pfile.read_bytes() == qfile.read_bytes()
    if not repair:
        assert pfile.read_bytes() == data
    elif qres[0] in (0, 3):
        # repaired: qemu-img finds no corruption in parablock's file, and the guest data is QEMU's
        rc, report = qemu_check(pfile, "qed")
        assert rc == qres[0] and "corruptions" not in report
        assert run(["qemu-img", "compare", "-f", "qed", "-F", "qed", str(pfile), str(qfile)]).returncode == 0


def test_check_results_of_the_damage_cases_are_varied(base_dir, tmp_path):
    """The cases cover what they claim: corruptions, leaks, both, unfixable ones, and dirty images."""
    seen = {}
    for case in (
        "clean",
        "l2_past_eof",
        "leaks",
        "truncated_l2",
        "dup_data",
        "shared_l2",
        "data_in_later_l2",
        "dirty",
        "aborted_bad",
        "many",
        "many_table_across_skip",
    ):
        p = tmp_path / f"{case}.qed"
        p.write_bytes(_image(case, base_dir))
        seen[case] = qemu_check(p, "qed")
    assert seen["clean"][0] == 0
    assert seen["l2_past_eof"][1]["corruptions"] == 1
    assert seen["leaks"][1]["leaks"] == 3
    assert seen["truncated_l2"][1]["corruptions"] == 1 and seen["truncated_l2"][1]["leaks"] == 3
    assert seen["dup_data"][1]["corruptions"] == 1
    assert seen["shared_l2"][1]["corruptions"] == 4  # one per cluster of the shared table
    assert seen["data_in_later_l2"][1]["corruptions"] == 1  # the later table overlaps a used cluster
    assert seen["dirty"][0] == 0
    assert seen["aborted_bad"][1]["corruptions"] == 2
    assert seen["many"][1]["leaks"] == 1  # QEMU's phantom leak
    assert seen["many_table_across_skip"][1]["corruptions"] == 3


@pytest.mark.parametrize("case", ["dirty", "dirty_bad", "dirty_dup", "aborted"])
def test_repair_of_dirty_image_clears_need_check_like_qemu(case, base_dir, tmp_path, capsys, monkeypatch):
    """qemu-img check leaves need-check alone without -r, and clears it with -r (after the repair, or on
    close when an unfixable corruption is left)."""
    data = _image(case, base_dir)
    for repair, dirty_after in (([], True), (["-r", "all"], False)):
        sub = tmp_path / ("r" if repair else "n")
        sub.mkdir()
        qres, pres, qfile, pfile = _both(sub, data, repair, capsys, monkeypatch)
        _assert_same(qres, pres)
        assert bool(_features(qfile.read_bytes()) & NEED_CHECK) == dirty_after
        assert pfile.read_bytes() == qfile.read_bytes()


@pytest.mark.parametrize("case", ["clean", "mixed_small", "dup_and_bad"])
@pytest.mark.parametrize("repair", [[], ["-r", "all"]])
def test_quiet_check_matches_qemu(case, repair, base_dir, tmp_path, capsys, monkeypatch):
    qres, pres, qfile, pfile = _both(tmp_path, _image(case, base_dir), ["-q", *repair], capsys, monkeypatch)
    _assert_same(qres, pres)
    assert qres[1] == ""
    assert pfile.read_bytes() == qfile.read_bytes()


def test_sparse_bitmap_finds_the_same_overlaps(base_dir, tmp_path, capsys, monkeypatch):
    """The check's set-of-indexes mode (for huge files) counts as the flat bitmap does."""
    from engine.formats import qed

    monkeypatch.setattr(qed, "_FLAT_BITMAP_BYTES", 0)
    for case in ("many_table_across_skip", "dup_and_bad", "shared_l2"):
        sub = tmp_path / case
        sub.mkdir()
        qres, pres, qfile, pfile = _both(sub, _image(case, base_dir), ["-r", "all"], capsys, monkeypatch)
        _assert_same(qres, pres)
        assert pfile.read_bytes() == qfile.read_bytes()


def test_huge_sparse_file_leaks_wrap_like_qemu(base_dir, tmp_path, capsys, monkeypatch):
    """An 8 TiB sparse file of 4 KiB clusters: more than 2**31 leaked clusters, which QEMU counts in a C
    int (the count printed is negative); parablock's bitmap holds only the referenced clusters."""
    data = _image("many", base_dir)
    qdir, pdir = tmp_path / "q", tmp_path / "p"
    for d in (qdir, pdir):
        d.mkdir()
        (d / "img.qed").write_bytes(data)
        try:
            os.truncate(d / "img.qed", 8 << 40)
        except OSError:
            pytest.skip("the file system cannot hold an 8 TiB sparse file")
    q = run(["qemu-img", "check", "-f", "qed", "img.qed"], cwd=qdir, check=False)
    assert "-2146" in q.stdout
    monkeypatch.chdir(pdir)
    rc = main(["check", "-f", "qed", "img.qed"])
    out, err = capsys.readouterr()
    _assert_same((q.returncode, q.stdout, q.stderr), (rc, out, err))


@pytest.mark.parametrize("err", [5, 28])
def test_unreadable_l2_table_fails_the_check_like_qemu(err, base_dir, tmp_path):
    """An L2 table that cannot be read: qemu-img prints "Check failed: <strerror>" and nothing else."""
    from engine.formats.blkdebug import BlkdebugDriver

    img = tmp_path / "e.qed"
    img.write_bytes(_image("leaks", base_dir))
    opts = (
        f"driver=qed,file.driver=blkdebug,file.image.driver=file,file.image.filename={img},"
        f"file.inject-error.0.event=l2_load,file.inject-error.0.errno={err}"
    )
    q = run(["qemu-img", "check", "--image-opts", opts], check=False)
    assert q.returncode == 1 and q.stdout == ""
    node = open_node(img, "qed")
    try:
        node.file = BlkdebugDriver(node.file, {"inject-error": [{"event": "l2_load", "errno": err}]})
        r = node.check_image(0)
    finally:
        node.close()
    assert r.error is not None
    assert q.stderr == f"qemu-img: Check failed: {r.error}\n"


def test_open_time_repair_result_is_not_reused_after_a_write(base_dir, tmp_path):
    """A writable open of a dirty image repairs it (QEMU's open-time check); check_image reuses that
    result only while the metadata is unchanged."""
    img = tmp_path / "d.qed"
    img.write_bytes(_image("dirty_bad", base_dir))
    node = open_node(img, "qed", read_only=False)
    try:
        r = node.check_image(FIX_LEAKS | FIX_ERRORS)  # the open-time repair's counts, checked again
        assert (r.corruptions_fixed, r.corruptions, r.leaks, r.allocated_clusters) == (2, 0, 2, 4)
    finally:
        node.close()
    img.write_bytes(_image("dirty_bad", base_dir))
    node = open_node(img, "qed", read_only=False)
    try:
        node.write(2 << 20, b"x" * 512)  # allocates a data cluster: the stored result is stale
        r = node.check_image(FIX_LEAKS)
        assert (r.corruptions_fixed, r.corruptions, r.leaks, r.allocated_clusters) == (0, 0, 2, 5)
    finally:
        node.close()
    rc, report = qemu_check(img, "qed")
    assert rc == 3 and report["leaks"] == 2 and "corruptions" not in report
    assert not _features(img.read_bytes()) & NEED_CHECK
