"""QED images against qemu-img/qemu-io 7.2: parablock reads what QEMU wrote (data, `info` and `map` JSON),
QEMU reads what parablock wrote (create, convert, io and driver writes, backing files), the same writes
give byte-identical files, dirty images read and repair as QEMU's do, hostile headers give one clear
error."""

from __future__ import annotations

import json
import os
import struct
import tracemalloc

import pytest

from engine.cli.main import main
from engine.image import create_image
from tests.util import needs_qemu, open_node, qemu_img, qemu_io, read_all, run
from workers.inproc import InProcessExecutor

pytestmark = needs_qemu
MiB = 1 << 20
NEED_CHECK = 2


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _io_args(cmds: list[str]) -> list[str]:
    out: list[str] = []
    for c in cmds:
        out += ["-c", c]
    return out


def _qemu_raw(img, tmp_path) -> bytes:
    raw = tmp_path / "oracle.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", str(img), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    return data


def _assert_info_map_equal(capsys, img) -> None:
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        want = run(["qemu-img", *cmd, str(img)]).stdout
        rc, got, err = _pb(capsys, *cmd, str(img))
        assert rc == 0, err
        if cmd[0] == "info":  # the disk usage may differ by a block of the host file system
            want = "\n".join(ln for ln in want.splitlines() if "actual-size" not in ln)
            got = "\n".join(ln for ln in got.splitlines() if "actual-size" not in ln)
        assert got.strip() == want.strip(), cmd


def _features(img) -> int:
    return struct.unpack_from("<Q", open(img, "rb").read(24), 16)[0]


# --------------------------------------------------------------------------------------------------
# (a) QEMU writes, parablock reads
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts,size,writes",
    [
        (
            [],
            "8M",
            [
                "write -P 0xab 0 64k",
                "write -P 0xcd 5M 4k",
                "write -P 0x11 100 3000",
                "write -z 1M 128k",
                "write -z 2M 1000",
                "write -P 0x22 8323072 65536",
            ],
        ),
        (
            ["-o", "cluster_size=4k"],
            "5243392",  # 5 MiB + 512: a partial cluster at the end of the disk
            [
                "write -P 0x33 0 4k",
                "write -P 0x44 5242880 512",
                "write -P 0x55 12345 70000",
                "write -z 8192 8192",
                "write -z 1M 4096",
                "write -P 0x66 2M 1M",
                "write -z 2M 64k",
            ],
        ),
        (["-o", "cluster_size=4k,table_size=16"], "3M", ["write -P 0x77 1M 128k", "write -z 2M 1M"]),
        # 4 KiB clusters, 2-cluster tables: one L2 table covers 4 MiB, writes cross table boundaries
        (
            ["-o", "cluster_size=4k,table_size=2"],
            "12M",
            ["write -P 0x88 4190208 8192", "write -P 0x99 8M 4M", "write -z 0 4M", "write -P 0xaa 100 1"],
        ),
        ([], "64M", []),
    ],
)
def test_qed_reads_like_qemu(tmp_path, capsys, opts, size, writes):
    img = tmp_path / "d.qed"
    qemu_img("create", "-q", "-f", "qed", *opts, str(img), size)
    if writes:
        qemu_io("-f", "qed", *_io_args(writes), str(img))
    assert read_all(img) == _qemu_raw(img, tmp_path)
    _assert_info_map_equal(capsys, img)
    rc, _, err = _pb(capsys, "compare", "-f", "qed", "-F", "qed", str(img), str(img))
    assert rc == 0, err


def test_table_size_1_is_refused_like_qemu(tmp_path, capsys):
    """qemu-img 7.2 creates table_size=1 images but cannot open them; parablock agrees on both."""
    q, p = tmp_path / "q.qed", tmp_path / "p.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=1", str(q), "1M")
    rc, _, err = _pb(capsys, "create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=1", str(p), "1M")
    assert rc == 0, err
    assert p.read_bytes() == q.read_bytes()
    assert "QED table offset is invalid" in qemu_img("info", str(q), check=False).stderr
    rc, _, err = _pb(capsys, "info", str(q))
    assert rc == 1 and err.strip() == f"parablock: Could not open '{q}': QED table offset is invalid", err


def test_backing_chain_reads_like_qemu(tmp_path, capsys):
    base = tmp_path / "base.raw"
    mid = tmp_path / "mid.qed"
    top = tmp_path / "top.qed"
    qemu_img("create", "-q", "-f", "raw", str(base), "6M")
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 6M", str(base))
    qemu_img("create", "-q", "-f", "qed", "-b", str(base), "-F", "raw", str(mid), "7M")
    qemu_io(
        "-f",
        "qed",
        *_io_args(["write -P 0x22 4096 8k", "write -z 1M 64k", "write -P 0x33 6291000 1000"]),
        str(mid),
    )
    # a qed backing file: QED records no format for it (only "raw" has a flag), so it is probed
    qemu_img(
        "create", "-q", "-f", "qed", "-b", str(mid), "-F", "qed", "-o", "cluster_size=4k", str(top), "8M"
    )
    qemu_io(
        "-f", "qed", *_io_args(["write -P 0x44 2M 4k", "write -z 3M 8k", "write -P 0x55 7M 1M"]), str(top)
    )
    assert read_all(top) == _qemu_raw(top, tmp_path)
    for img in (mid, top):
        _assert_info_map_equal(capsys, img)
    want = run(["qemu-img", "info", "--backing-chain", "--output=json", str(top)]).stdout
    rc, got, _ = _pb(capsys, "info", "--backing-chain", "--output=json", str(top))
    strip = [{k: v for k, v in i.items() if k != "actual-size"} for i in json.loads(want)]
    assert rc == 0 and [{k: v for k, v in i.items() if k != "actual-size"} for i in json.loads(got)] == strip
    node = open_node(top)
    try:
        assert node.backing_format is None and node.backing.backing_format == "raw"
    finally:
        node.close()


# --------------------------------------------------------------------------------------------------
# (b) parablock writes, QEMU reads
# --------------------------------------------------------------------------------------------------
def _patterned_raw(path, size: int) -> bytes:
    data = bytearray(size)
    for i, off in enumerate(range(0, size, 700 * 1024)):
        n = min(90000 + 1000 * i, size - off)
        data[off : off + n] = bytes([(i * 37 + 1) & 0xFF]) * n
    data[size - 10 :] = b"end of it!"
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("opts", [[], ["-o", "cluster_size=4k"], ["-o", "cluster_size=2M,table_size=2"]])
def test_convert_to_qed(tmp_path, capsys, opts):
    src = tmp_path / "src.raw"
    data = _patterned_raw(src, 9 * MiB + 3584)  # not a whole number of clusters
    out = tmp_path / "out.qed"
    rc, _, err = _pb(capsys, "convert", "-f", "raw", "-O", "qed", *opts, str(src), str(out))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "raw", "-F", "qed", str(src), str(out), check=False).returncode == 0
    chk = qemu_img("check", "-f", "qed", str(out), check=False)
    assert chk.returncode == 0 and "No errors were found" in chk.stdout, chk.stdout + chk.stderr
    assert read_all(out) == data
    assert _features(out) & NEED_CHECK == 0
    _assert_info_map_equal(capsys, out)


@pytest.mark.parametrize(
    "opts,size",
    [([], "8M"), (["-o", "cluster_size=4k,table_size=16"], "100000"), (["-o", "table_size=2"], "0")],
)
def test_create_matches_qemu_img(tmp_path, capsys, opts, size):
    p, q = tmp_path / "p.qed", tmp_path / "q.qed"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "qed", *opts, str(p), size)
    assert rc == 0, err
    qemu_img("create", "-q", "-f", "qed", *opts, str(q), size)
    assert p.read_bytes() == q.read_bytes()
    if size != "0":
        qemu_io("-f", "qed", "-c", "write -P 0x5c 4096 70000", "-c", "write -z 0 4k", str(p))
        qemu_io("-f", "qed", "-c", "read -P 0x5c 4096 70000", "-c", "read -P 0 0 4096", str(p))
        assert qemu_img("check", "-f", "qed", str(p), check=False).returncode == 0


@pytest.mark.parametrize("fmt", ["raw", "qed"])
def test_create_with_backing_matches_qemu_img(tmp_path, fmt):
    base = tmp_path / f"base.{fmt}"
    qemu_img("create", "-q", "-f", fmt, str(base), "4M")
    p, q = tmp_path / "p.qed", tmp_path / "q.qed"
    create_image(str(p), "qed", 4 * MiB, InProcessExecutor(), {"backing_file": base.name, "backing_fmt": fmt})
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", fmt, str(q), "4M")
    assert p.read_bytes() == q.read_bytes()


@pytest.mark.parametrize("backing", [False, True])
def test_same_writes_give_identical_files(tmp_path, capsys, backing):
    """The same qemu-io script through qemu-io and `parablock io` leaves byte-identical images."""
    q, p = tmp_path / "q.qed", tmp_path / "p.qed"
    create = ["-o", "cluster_size=4k,table_size=2"]
    if backing:
        base = tmp_path / "base.raw"
        qemu_img("create", "-q", "-f", "raw", str(base), "9M")
        qemu_io("-f", "raw", "-c", "write -P 0x11 0 9M", str(base))
        create = ["-b", str(base), "-F", "raw"]
    qemu_img("create", "-q", "-f", "qed", *create, str(q), "10M")
    p.write_bytes(q.read_bytes())
    script = [
        "write -P 0xab 0 64k",
        "write -P 0xcd 4M 4k",
        "write -z 1M 128k",
        "write -z 2M 1000",
        "write -z 3M 512",
        "write -P 0x12 100 3000",
        "write -P 0x34 10420224 65536",
        "write -P 0x56 500000 300000",
        "write -z 600000 100000",
        "write -P 0x78 9437000 1000",
        "write -P 0x9a 4190208 16384",
        "write -z 6M 2M",
    ]
    if not backing:  # over a backing file QEMU refills a zero cluster from it (see the test below)
        script.append("write -P 0xbc 6M 5000")
    qemu_io("-f", "qed", *_io_args(script), str(q))
    rc, _, err = _pb(capsys, "io", "-f", "qed", *_io_args(script), str(p))
    assert rc == 0, err
    assert p.read_bytes() == q.read_bytes()
    assert qemu_img("check", "-f", "qed", str(p), check=False).returncode == 0


def test_cli_backing_create_and_convert(tmp_path, capsys):
    """`create -b` and `convert -B` with a qed target: qemu-img's echo line and header; only what the
    source's top layer holds is copied, the rest stays unallocated (same map as qemu-img's, offsets aside)."""
    base = tmp_path / "base.raw"
    qemu_img("create", "-q", "-f", "raw", str(base), "8M")
    qemu_io("-f", "raw", "-c", "write -P 0x11 0 8M", str(base))
    mid = tmp_path / "mid.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", str(mid))
    qemu_io(
        "-f",
        "qed",
        "-c",
        "write -P 0x22 1M 100k",
        "-c",
        "write -z 3M 1M",
        "-c",
        "write -P 0x33 7M 4k",
        str(mid),
    )
    p, q = tmp_path / "p.qed", tmp_path / "q.qed"
    rc, out, err = _pb(capsys, "create", "-f", "qed", "-b", base.name, "-F", "raw", str(p))
    assert rc == 0, err
    want = qemu_img("create", "-f", "qed", "-b", base.name, "-F", "raw", str(q)).stdout
    assert out.replace(str(p), "X") == want.replace(str(q), "X")
    assert p.read_bytes() == q.read_bytes()
    p.unlink()
    q.unlink()
    rc, _, err = _pb(capsys, "convert", "-O", "qed", "-B", base.name, "-F", "raw", str(mid), str(p))
    assert rc == 0, err
    qemu_img("convert", "-O", "qed", "-B", base.name, "-F", "raw", str(mid), str(q))
    assert qemu_img("compare", str(mid), str(p), check=False).returncode == 0
    assert qemu_img("check", "-f", "qed", str(p), check=False).returncode == 0

    def shape(img) -> list[dict]:
        return [
            {k: v for k, v in e.items() if k != "offset"}
            for e in json.loads(qemu_img("map", "--output=json", str(img)).stdout)
        ]

    assert shape(p) == shape(q)
    assert any(e["depth"] == 1 for e in shape(p))  # left to the backing file


def test_driver_writes_read_back_by_qemu(tmp_path):
    """Writes through the driver API (random sizes, zero writes, overwrites) match a model of the disk;
    need-check is set by the first allocating write and cleared by the close."""
    img = tmp_path / "w.qed"
    size = 6 * MiB + 512
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(img), str(size))
    model = bytearray(size)
    node = open_node(img, "qed", read_only=False)
    try:
        ops = [
            (0, 5000, 0x21),
            (4 * MiB - 3000, 9000, 0x22),
            (size - 700, 700, 0x23),
            (8192, 4096, None),
            (4000, 100, 0x24),
            (1 * MiB, 2 * MiB, 0x25),
            (1 * MiB + 4096, 1 * MiB, None),
            (3 * MiB + 100, 50000, None),
            (2 * MiB + 5, 7, 0x26),
        ]
        for i, (off, n, pat) in enumerate(ops):
            if pat is None:
                node.write_zeroes(off, n)
                model[off : off + n] = bytes(n)
            else:
                node.write(off, bytes([pat]) * n)
                model[off : off + n] = bytes([pat]) * n
            if i == 0:
                assert _features(img) & NEED_CHECK
            assert node.read(max(0, off - 10), min(n + 20, size - max(0, off - 10))) == bytes(
                model[max(0, off - 10) : max(0, off - 10) + min(n + 20, size - max(0, off - 10))]
            )
    finally:
        node.close()
    assert _features(img) & NEED_CHECK == 0
    assert qemu_img("check", "-f", "qed", str(img), check=False).returncode == 0
    assert _qemu_raw(img, tmp_path) == bytes(model)


def test_writes_over_backing_file(tmp_path):
    """With a backing file: copy-on-write keeps the backing data around a partial write, need-check is
    never set (data is flushed before it is linked, as in QEMU)."""
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * (3 * MiB // 256))
    img = tmp_path / "o.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", str(img), "4M")
    node = open_node(img, "qed", read_only=False)
    try:
        node.write(70000, b"\xee" * 100)
        node.write(3 * MiB - 50, b"\xdd" * 100)  # straddles the end of the backing file
        node.write_zeroes(1 * MiB, 64 * 1024)
        assert _features(img) & NEED_CHECK == 0
    finally:
        node.close()
    model = bytearray(base.read_bytes() + bytes(MiB))
    model[70000:70100] = b"\xee" * 100
    model[3 * MiB - 50 : 3 * MiB + 50] = b"\xdd" * 100
    model[MiB : MiB + 65536] = bytes(65536)
    assert _qemu_raw(img, tmp_path) == bytes(model)
    assert qemu_img("check", "-f", "qed", str(img), check=False).returncode == 0


def test_partial_write_into_zero_cluster_keeps_zeros(tmp_path, capsys):
    """Deliberate difference: QEMU 7.2 fills the rest of a zero cluster from the backing file on a partial
    write; parablock keeps what the guest saw there (zeros)."""
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x11" * MiB)
    img = tmp_path / "o.qed"
    qemu_img("create", "-q", "-f", "qed", "-b", base.name, "-F", "raw", str(img), "1M")
    rc, out, err = _pb(
        capsys,
        "io",
        "-f",
        "qed",
        "-c",
        "write -z 0 64k",
        "-c",
        "write -P 0x22 0 4k",
        "-c",
        "read -P 0x22 0 4k",
        "-c",
        "read -P 0 4k 60k",
        "-c",
        "read -P 0x11 64k 64k",
        str(img),
    )
    assert rc == 0 and "verification failed" not in out, out + err
    qemu_io("-f", "qed", "-c", "read -P 0 4k 60k", str(img))


def test_resize_and_rebase_match_qemu(tmp_path, capsys):
    base = tmp_path / "b.raw"
    qemu_img("create", "-q", "-f", "raw", str(base), "8M")
    q, p = tmp_path / "q.qed", tmp_path / "p.qed"
    qemu_img("create", "-q", "-f", "qed", str(q), "8M")
    qemu_io("-f", "qed", "-c", "write -P 0x31 1M 64k", str(q))
    p.write_bytes(q.read_bytes())
    qemu_img("resize", "-q", "-f", "qed", str(q), "16M")
    rc, _, err = _pb(capsys, "resize", "-q", "-f", "qed", str(p), "16M")
    assert rc == 0, err
    assert p.read_bytes() == q.read_bytes()
    rc, _, err = _pb(capsys, "resize", "-f", "qed", "--shrink", str(p), "8M")
    assert rc == 1 and "Shrinking images is currently not supported" in err
    qemu_img("rebase", "-u", "-f", "qed", "-b", base.name, "-F", "raw", str(q))
    rc, _, err = _pb(capsys, "rebase", "-u", "-f", "qed", "-b", base.name, "-F", "raw", str(p))
    assert rc == 0, err
    assert p.read_bytes() == q.read_bytes()


# --------------------------------------------------------------------------------------------------
# (c) dirty images
# --------------------------------------------------------------------------------------------------
def _dirty_image(tmp_path):
    img = tmp_path / "dirty.qed"
    qemu_img("create", "-q", "-f", "qed", str(img), "8M")
    p = run(
        [
            "qemu-io",
            "-f",
            "qed",
            "-c",
            "write -P 0x5a 0 200k",
            "-c",
            "write -P 0x6b 5M 64k",
            "-c",
            "abort",
            str(img),
        ],
        check=False,
    )
    assert p.returncode != 0
    assert _features(img) & NEED_CHECK
    return img


def test_dirty_image_reads_and_repairs_like_qemu(tmp_path, capsys):
    img = _dirty_image(tmp_path)
    want = bytearray(8 * MiB)
    want[: 200 * 1024] = b"\x5a" * (200 * 1024)
    want[5 * MiB : 5 * MiB + 65536] = b"\x6b" * 65536
    assert read_all(img) == bytes(want)
    _assert_info_map_equal(capsys, img)  # qemu-img 7.2 prints "dirty-flag": false for QED
    assert _features(img) & NEED_CHECK  # read-only: left as it is
    # corrupt entries: an L2 entry past the end of the file, an unaligned one, an L1 entry past the end
    b = bytearray(img.read_bytes())
    l1 = struct.unpack_from("<Q", b, 40)[0]
    l2 = struct.unpack_from("<Q", b, l1)[0]
    struct.pack_into("<Q", b, l2 + 8, 0x7770000)
    struct.pack_into("<Q", b, l2 + 16, 0x12345)
    struct.pack_into("<Q", b, l1 + 8, 0x990000)
    img.write_bytes(bytes(b))
    q = tmp_path / "q.qed"
    q.write_bytes(bytes(b))
    qemu_io("-f", "qed", "-c", "read -P 0x5a 0 64k", str(q))  # a writable open repairs
    rc, out, err = _pb(capsys, "io", "-f", "qed", "-c", "read -P 0x5a 0 64k", str(img))
    assert rc == 0 and "verification failed" not in out, out + err
    assert img.read_bytes() == q.read_bytes()
    assert _features(img) & NEED_CHECK == 0


# --------------------------------------------------------------------------------------------------
# (d) hostile input
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "offset,fmt,value,text",
    [
        (4, "<I", 1000, "QED cluster size is invalid"),
        (4, "<I", 128 * MiB, "QED cluster size is invalid"),
        (8, "<I", 3, "QED table size is invalid"),
        (8, "<I", 0, "QED table size is invalid"),
        (12, "<I", 0xFFFFFFFF, "QED table offset is invalid"),
        (16, "<Q", 0x10, "Unsupported QED features: 10"),
        (40, "<Q", 0x10001, "QED table offset is invalid"),
        (40, "<Q", 1 << 40, "QED table offset is invalid"),
        (40, "<Q", (1 << 64) - 65536, "QED table offset is invalid"),
        (48, "<Q", 1000, "QED image size is invalid"),
        (48, "<Q", 1 << 62, "QED image size is invalid"),
        (56, "<Q", (5000 << 32) | 64, "Failed to read backing filename"),
        (56, "<Q", (10 << 32) | 65530, "QED backing filename offset is invalid"),
    ],
)
def test_hostile_qed_headers(tmp_path, capsys, offset, fmt, value, text):
    img = tmp_path / "h.qed"
    qemu_img("create", "-q", "-f", "qed", str(img), "8M")
    b = bytearray(img.read_bytes())
    struct.pack_into(fmt, b, offset, value)
    if offset == 56:
        struct.pack_into("<Q", b, 16, 1)  # the backing-file feature
    img.write_bytes(bytes(b))
    before = img.read_bytes()
    assert text in qemu_img("info", str(img), check=False).stderr
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("parablock: ") and text in err, err
    rc, _, err = _pb(capsys, "io", "-f", "qed", "-c", "read 0 4k", str(img))
    assert rc == 1 and text in err and "Traceback" not in err
    assert img.read_bytes() == before


def test_invalid_table_entries_give_einval(tmp_path, capsys):
    """4 KiB clusters, 2-cluster tables: L1[1] maps 4..8 MiB.  Offsets outside the file or unaligned make
    the read fail with EINVAL, as in QEMU; a table shared by two L1 entries is read, as by QEMU."""
    img = tmp_path / "e.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4k,table_size=2", str(img), "8M")
    qemu_io("-f", "qed", "-c", "write -P 0x42 0 8k", str(img))
    good = img.read_bytes()
    l1 = 4096
    l2 = struct.unpack_from("<Q", good, l1)[0]
    shared = bytearray(good)
    struct.pack_into("<Q", shared, l1 + 8, l2)
    img.write_bytes(bytes(shared))
    node = open_node(img, "qed")
    try:
        assert node.read(4 * MiB, 8192) == b"\x42" * 8192
    finally:
        node.close()
    bad = bytearray(good)
    struct.pack_into("<Q", bad, l2, 1 << 40)  # a data cluster past the end of the file
    struct.pack_into("<Q", bad, l1 + 8, 0x12345)  # an unaligned L2 table
    img.write_bytes(bytes(bad))
    cmds = ["-c", "read 0 4k", "-c", "read -P 0x42 4k 4k", "-c", "read 4M 4k"]
    want = qemu_io("-f", "qed", "-r", *cmds, str(img), check=False).stdout
    assert want.count("read failed: Invalid argument") == 2, want
    rc, out, _ = _pb(capsys, "io", "-f", "qed", "-r", *cmds, str(img))
    assert rc == 1 and out.count("read failed: Invalid argument") == 2, out
    assert "verification failed" not in out
    rc, _, err = _pb(capsys, "map", str(img))
    assert rc == 1 and err.startswith("parablock: ") and "Traceback" not in err, err


def test_huge_tables_stay_bounded(tmp_path, capsys):
    """64 MiB clusters and 16-cluster tables: a 1 GiB L1 table in a sparse file is read slice by slice."""
    img = tmp_path / "huge.qed"
    cs, ts = 64 * MiB, 16
    header = struct.pack("<IIIIQQQQQII", 0x00444551, cs, ts, 1, 0, 0, 0, cs, 1 << 56, 0, 0)
    with open(img, "wb") as f:
        f.write(header)
        f.truncate(cs + cs * ts)
        f.seek(cs + 8 * 3)
        f.write(struct.pack("<Q", cs))  # L1[3] points at the L1 table itself: entries read as L2 entries
    tracemalloc.start()
    try:
        node = open_node(img, "qed")
        try:
            assert node.size() == 1 << 56
            assert node.read(0, 4096) == bytes(4096)
            assert node.block_status(3 * (cs * ts // 8) * cs, 1 << 30).length > 0
        finally:
            node.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * MiB, peak
    assert os.path.getsize(img) == cs * (ts + 1)


def test_create_errors_match_qemu(tmp_path, capsys):
    for opts, size, text in [
        ("cluster_size=2k", "1M", "QED cluster size must be within range [4096, 67108864] and power of 2"),
        ("table_size=3", "1M", "QED table size must be within range [1, 16] and power of 2"),
        (
            "cluster_size=4k,table_size=2",
            "1T",
            "QED image size must be a non-zero multiple of cluster size and less than 4294967296 bytes",
        ),
        ("foo=1", "1M", "Invalid parameter 'foo'"),
    ]:
        q = qemu_img("create", "-q", "-f", "qed", "-o", opts, str(tmp_path / "q.qed"), size, check=False)
        assert q.returncode == 1 and text in q.stderr
        rc, _, err = _pb(capsys, "create", "-q", "-f", "qed", "-o", opts, str(tmp_path / "p.qed"), size)
        assert rc == 1 and text in err, err
