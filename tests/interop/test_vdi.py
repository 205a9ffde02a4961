"""VDI images made by qemu-img 7.2 (dynamic and static) read back by parablock exactly: data, and
`info`/`map` JSON byte for byte; hostile VDI headers give one clear error."""
from __future__ import annotations

import struct

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, open_node, qemu_img, qemu_io, qemu_json, read_all, run

pytestmark = needs_qemu
MiB = 1 << 20


def _pb(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("kind,size,writes", [
    ("dynamic", "8M", [("0xab", "1M", "64k"), ("0xcd", "5M", "1M")]),
    ("dynamic", "5243392", [("0x11", "0", "4k"), ("0x22", "4M", "512")]),  # 5 MiB + 512: a partial block
    ("static", "3M", [("0x33", "2M", "128k")]),
    ("dynamic", "64M", []),
])
def test_vdi_reads_like_qemu(tmp_path, capsys, kind, size, writes):
    img = tmp_path / "d.vdi"
    qemu_img("create", "-q", "-f", "vdi", *(["-o", "static=on"] if kind == "static" else []), str(img), size)
    cmds = []
    for pat, off, ln in writes:
        cmds += ["-c", f"write -P {pat} {off} {ln}"]
    if cmds:
        qemu_io("-f", "vdi", *cmds, str(img))
    qemu_img("convert", "-f", "vdi", "-O", "raw", str(img), str(tmp_path / "q.raw"))
    assert read_all(img) == (tmp_path / "q.raw").read_bytes()
    for cmd in (["info", "--output=json"], ["map", "--output=json"]):
        want = run(["qemu-img", *cmd, str(img)]).stdout
        rc, got, err = _pb(capsys, *cmd, str(img))
        assert rc == 0, err
        if cmd[0] == "info":  # the disk usage may differ by a block of the host file system
            want = "\n".join(ln for ln in want.splitlines() if "actual-size" not in ln)
            got = "\n".join(ln for ln in got.splitlines() if "actual-size" not in ln)
        assert got.strip() == want.strip()
    rc, _, err = _pb(capsys, "compare", "-f", "vdi", "-F", "raw", str(img), str(tmp_path / "q.raw"))
    assert rc == 0, err
    rc, _, err = _pb(capsys, "convert", "-f", "vdi", "-O", "qcow2", str(img), str(tmp_path / "o.qcow2"))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "vdi", "-F", "qcow2", str(img), str(tmp_path / "o.qcow2")).returncode == 0


@pytest.mark.parametrize("field,offset,value,text", [
    ("block size", 376, 65536, "block size 65536 is not 1048576"),
    ("sector size", 360, 4096, "sector size 4096 is not 512"),
    ("version", 68, 0x00020000, "unsupported VDI image (version 2.0)"),
    ("map entry", 512, 1000, "out of range"),
    ("disk size", 368, 1 << 40, "image bitmap has room for"),
])
def test_hostile_vdi_headers(tmp_path, capsys, field, offset, value, text):
    img = tmp_path / "h.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(img), "4M")
    b = bytearray(img.read_bytes())
    struct.pack_into("<Q" if field == "disk size" else "<I", b, offset, value)
    img.write_bytes(bytes(b))
    before = img.read_bytes()
    rc, _, err = _pb(capsys, "info", str(img))
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("parablock: ") and text in err, err
    assert img.read_bytes() == before


# ------------------------------------------------------------------------------------------------------
# writing and creating VDI
# ------------------------------------------------------------------------------------------------------
UUIDS = slice(392, 424)  # uuid_image and uuid_last_snap: random in every image


def patterned_raw(path, size: int) -> bytes:
    """A raw image with data at 0, a partial run in the middle of a block (crossing no block edge of
    1 MiB but a 64 KiB one) and the last sector; zeros elsewhere."""
    b = bytearray(size)
    b[0:4096] = b"\xaa" * 4096
    mid = 3 * MiB + 1000
    b[mid:mid + 69000] = bytes(range(1, 251)) * 276
    b[size - 512:] = b"\xcc" * 512
    path.write_bytes(bytes(b))
    return bytes(b)


def qemu_json_out(*args: str) -> str:
    return run(["qemu-img", *args]).stdout


def _without_actual_size(text: str) -> str:
    return "\n".join(ln for ln in text.splitlines() if "actual-size" not in ln).strip()


def assert_info_map_like_qemu(capsys, img, fmt: str) -> None:
    """parablock info/map --output=json equal qemu-img's on ``img`` (actual-size aside)."""
    for cmd in (["info", "-f", fmt, "--output=json"], ["map", "-f", fmt, "--output=json"]):
        want = qemu_json_out(*cmd, str(img))
        rc, got, err = _pb(capsys, *cmd, str(img))
        assert rc == 0, err
        assert _without_actual_size(got) == _without_actual_size(want)


def _uuid_fields_ok(head: bytes) -> None:
    a, b = head[392:408], head[408:424]
    assert a != b and any(a) and any(b)
    for u in (a, b):  # version 4, RFC variant, stored with QEMU's little-endian field order
        assert u[7] >> 4 == 4 and u[8] >> 6 == 2, u.hex()
    assert not any(head[424:456])  # link and parent UUIDs stay null


@pytest.mark.parametrize("size,static", [
    ("0", False), ("8M", False), ("5243392", False), ("1G", False),
    ("0", True), ("3M", True), ("5243392", True), ("1G", True),
])
def test_vdi_create_like_qemu(tmp_path, capsys, size, static):
    opts = ["-o", "static=on"] if static else []
    ours, ref = tmp_path / "p.vdi", tmp_path / "q.vdi"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vdi", *opts, str(ours), size)
    assert rc == 0, err
    qemu_img("create", "-q", "-f", "vdi", *opts, str(ref), size)
    assert ours.stat().st_size == ref.stat().st_size
    with open(ours, "rb") as fa, open(ref, "rb") as fb:
        offset_data = struct.unpack_from("<I", fb.read(512), 344)[0]
        fb.seek(0)
        a, b = bytearray(fa.read(offset_data)), bytearray(fb.read(offset_data))
    _uuid_fields_ok(bytes(a))
    assert a[UUIDS] != b[UUIDS]
    a[UUIDS] = b[UUIDS] = bytes(32)
    assert a == b
    assert qemu_json("info", "-f", "vdi", str(ours))["virtual-size"] == \
        qemu_json("info", "-f", "vdi", str(ref))["virtual-size"]
    assert run(["qemu-img", "check", "-f", "vdi", str(ours)], check=False).returncode == 0


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_convert_to_vdi(tmp_path, capsys, kind):
    opts = ["-o", "static=on"] if kind == "static" else []
    src, out, ref = tmp_path / "src.raw", tmp_path / "out.vdi", tmp_path / "ref.vdi"
    data = patterned_raw(src, 9 * MiB + 4096)
    rc, _, err = _pb(capsys, "convert", "-f", "raw", "-O", "vdi", *opts, str(src), str(out))
    assert rc == 0, err
    assert qemu_img("compare", "-f", "raw", "-F", "vdi", str(src), str(out), check=False).returncode == 0
    assert run(["qemu-img", "check", "-f", "vdi", str(out)], check=False).returncode == 0
    assert qemu_json("info", "-f", "vdi", str(out))["virtual-size"] == len(data)
    assert read_all(out, "vdi") == data
    assert_info_map_like_qemu(capsys, out, "vdi")
    qemu_img("convert", "-f", "raw", "-O", "vdi", *opts, str(src), str(ref))
    if kind == "dynamic":  # the same blocks in the same places: the files differ only in their UUIDs
        a, b = bytearray(out.read_bytes()), bytearray(ref.read_bytes())
        a[UUIDS] = b[UUIDS] = bytes(32)
        assert a == b
    else:  # static: every block mapped in order, as qemu-img has it
        with open(out, "rb") as fa, open(ref, "rb") as fb:
            a, b = bytearray(fa.read(1024)), bytearray(fb.read(1024))
        a[UUIDS] = b[UUIDS] = bytes(32)
        assert a == b


def _vdi_map(img) -> list[int]:
    head = img.read_bytes()
    blocks = struct.unpack_from("<I", head, 384)[0]
    return list(struct.unpack_from(f"<{blocks}I", head, 512))


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_vdi_write_roundtrip(tmp_path, capsys, kind):
    """qemu-io writes read back by parablock; parablock writes (driver API and ``parablock io``) read back
    by qemu-img; unallocated blocks zeroed stay unallocated."""
    size = 5 * MiB + 512  # the last block is partial
    img = tmp_path / "w.vdi"
    rc, _, err = _pb(capsys, "create", "-q", "-f", "vdi", *(["-o", "static=on"] if kind == "static" else []),
                     str(img), str(size))
    assert rc == 0, err
    model = bytearray(size)

    def put(off: int, data: bytes) -> None:
        model[off:off + len(data)] = data

    qemu_io("-f", "vdi", "-c", "write -P 0x11 100k 3000", "-c", "write -P 0x22 1000k 200k", str(img))
    put(100 * 1024, b"\x11" * 3000)
    put(1000 * 1024, b"\x22" * 200 * 1024)
    assert read_all(img, "vdi") == bytes(model)

    node = open_node(img, "vdi", read_only=False)
    try:
        node.write(2 * MiB + 512, b"\x44" * 4096)            # a new block, partly written
        put(2 * MiB + 512, b"\x44" * 4096)
        node.write(1000 * 1024 + 10, b"\x55" * 100)          # in place in an allocated block
        put(1000 * 1024 + 10, b"\x55" * 100)
        node.write(size - 512, b"\x66" * 512)                # the last (partial) block
        put(size - 512, b"\x66" * 512)
        span = bytes(range(256)) * 32
        node.write(3 * MiB - 4096, span)                     # allocated block 2 and new block 3
        put(3 * MiB - 4096, span)
        node.write_zeroes(4 * MiB, MiB)                      # unallocated: stays so
        node.write_zeroes(1000 * 1024 + 5, 50)               # part of an allocated block
        put(1000 * 1024 + 5, bytes(50))
        node.flush()
    finally:
        node.close()
    bmap = _vdi_map(img)
    if kind == "dynamic":
        assert bmap == [0, 1, 2, 4, 0xFFFFFFFF, 3]  # indexes in allocation order
        assert struct.unpack_from("<I", img.read_bytes(), 388)[0] == 5  # blocks_allocated
        assert img.stat().st_size == 1024 + 5 * MiB                     # whole blocks at the end
    else:
        assert bmap == list(range(6))
        assert img.stat().st_size == 1024 + 6 * MiB
    assert run(["qemu-img", "check", "-f", "vdi", str(img)], check=False).returncode == 0
    qemu_img("convert", "-f", "vdi", "-O", "raw", str(img), str(tmp_path / "back.raw"))
    assert (tmp_path / "back.raw").read_bytes() == bytes(model)
    assert_info_map_like_qemu(capsys, img, "vdi")

    rc, out, err = _pb(capsys, "io", "-f", "vdi", "-c", "write -P 0x77 4200k 4k", "-c", "write -z 0 4k",
                       str(img))
    assert rc == 0 and "wrote 4096/4096 bytes at offset 4300800" in out, (out, err)
    put(4200 * 1024, b"\x77" * 4096)
    put(0, bytes(4096))
    assert run(["qemu-io", "-f", "vdi", "-c", "read -P 0x77 4200k 4k", "-c", "read -P 0 0 4k",
                "-c", "read -P 0x66 5242880 512", str(img)], check=False).returncode == 0
    assert read_all(img, "vdi") == bytes(model)
    assert run(["qemu-img", "check", "-f", "vdi", str(img)], check=False).returncode == 0


def test_vdi_write_errors(tmp_path, capsys):
    from engine.errors import OutOfBounds, ReadOnlyError

    img = tmp_path / "e.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(img), "2M")
    before = img.read_bytes()
    node = open_node(img, "vdi", read_only=False)
    try:
        with pytest.raises(OutOfBounds, match="beyond the end"):
            node.write(2 * MiB - 512, b"x" * 1024)
        with pytest.raises(OutOfBounds, match="beyond the end"):
            node.write_zeroes(2 * MiB, 512)
    finally:
        node.close()
    ro = open_node(img, "vdi", read_only=True)
    try:
        with pytest.raises(ReadOnlyError):
            ro.write(0, b"x" * 512)
    finally:
        ro.close()
    assert img.read_bytes() == before
    for opts, size in ((["-o", "foo=bar"], "1M"), (["-o", "cluster_size=64k"], "1M"),
                       (["-o", "preallocation=metadata"], "1M"), ([], "5000T")):
        target = tmp_path / "c.vdi"
        want = qemu_img("create", "-q", "-f", "vdi", *opts, str(target), size, check=False)
        assert want.returncode == 1
        rc, _, err = _pb(capsys, "create", "-q", "-f", "vdi", *opts, str(target), size)
        assert rc == 1 and err.splitlines() == [want.stderr.strip().replace("qemu-img:", "parablock:", 1)]


# ------------------------------------------------------------------------------------------------------
# crash points: every prefix of the file writes of one request
# ------------------------------------------------------------------------------------------------------
def record_file_ops(node) -> list[tuple]:
    """Log ("write", offset, bytes), ("zero", offset, length) and ("flush",) of ``node.file`` while
    passing them through."""
    f = node.file
    log: list[tuple] = []
    write, write_zeroes, flush = f.write, f.write_zeroes, f.flush

    def rec_write(offset, data):
        log.append(("write", offset, bytes(data)))
        write(offset, data)

    def rec_zero(offset, length, unmap=False):
        log.append(("zero", offset, length))
        write_zeroes(offset, length, unmap)

    def rec_flush():
        log.append(("flush",))
        flush()

    f.write, f.write_zeroes, f.flush = rec_write, rec_zero, rec_flush
    return log


def replay(before: bytes, ops: list[tuple]) -> bytes:
    img = bytearray(before)
    for op in ops:
        if op[0] == "flush":
            continue
        off = op[1]
        data = op[2] if op[0] == "write" else bytes(op[2])
        if off + len(data) > len(img):
            img.extend(bytes(off + len(data) - len(img)))
        img[off:off + len(data)] = data
    return bytes(img)


def assert_blocks_old_or_new(path, fmt: str, old: bytes, new: bytes, block: int) -> None:
    got = read_all(path, fmt)
    assert len(got) == len(old) == len(new)
    for pos in range(0, len(got), block):
        assert got[pos:pos + block] in (old[pos:pos + block], new[pos:pos + block]), pos


def test_vdi_allocation_crash_points(tmp_path):
    """Data reaches the file before the header and map; a crash at any point leaves every block reading
    its old or its new contents, and one before the metadata leaves a clean image."""
    img = tmp_path / "c.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(img), "4M")
    qemu_io("-f", "vdi", "-c", "write -P 0x11 0 64k", str(img))
    before = img.read_bytes()
    old = read_all(img, "vdi")
    node = open_node(img, "vdi", read_only=False)
    offset_data = node.offset_data
    try:
        log = record_file_ops(node)
        node.write(MiB + MiB // 2, b"\x99" * MiB)  # two new blocks, one request
        node.write(4096, b"\x12" * 512)            # in place: no metadata
    finally:
        node.close()
    new = read_all(img, "vdi")
    assert replay(before, log) == img.read_bytes()
    meta = [i for i, op in enumerate(log) if op[0] != "flush" and op[1] < offset_data]
    data = [i for i, op in enumerate(log) if op[0] != "flush" and op[1] >= offset_data]
    flushes = [i for i, op in enumerate(log) if op[0] == "flush"]
    assert meta and flushes and max(d for d in data if d < meta[0]) < flushes[0] < meta[0]
    assert log[meta[0]][1] == 0 and log[meta[1]][1] == 512  # header (blocks_allocated), then the map
    crash = tmp_path / "crash.vdi"
    for k in range(len(log) + 1):
        crash.write_bytes(replay(before, log[:k]))
        assert_blocks_old_or_new(crash, "vdi", old, new, MiB)
        if k <= meta[0]:
            assert read_all(crash, "vdi") == old
            assert run(["qemu-img", "check", "-f", "vdi", str(crash)], check=False).returncode == 0
