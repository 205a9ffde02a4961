"""The daemon's NBD server (engine/daemon/nbd.py) driven by the real clients: qemu-img, qemu-io and (when
installed) nbdinfo; plus a raw socket client for what those never send (garbage, oversized requests).
QMP error texts are qemu-storage-daemon 7.2's, observed with the same commands."""
from __future__ import annotations

import json
import shutil
import socket
import struct
import time
from pathlib import Path


from ipc import nbd as P
from tests.daemon.conftest import MiB, make_chain
from tests.fuzz.daemon_util import RawClient
from tests.util import qemu_img, qemu_io, run

NBDINFO = shutil.which("nbdinfo")


def uri(sock: Path, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


def wait_path(p: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not p.exists():
        assert time.monotonic() < deadline, f"{p} never appeared"
        time.sleep(0.02)


def start(qsd, tmp_path: Path, *args: str):
    sock = tmp_path / "nbd.sock"
    d = qsd("--nbd-server", f"addr.type=unix,addr.path={sock}", *args)
    wait_path(sock)
    d.ok("query-block-exports")  # start-up (and every --export) is done once QMP answers
    return d, sock


def merged_map(entries: list[dict]) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) runs, adjacent equal runs merged (depth/offset/present dropped)."""
    out: list[list] = []
    for e in entries:
        key = (e["data"], e["zero"])
        if out and (out[-1][2], out[-1][3]) == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], *key])
    return [tuple(x) for x in out]


def img_map(*args: str) -> list[dict]:
    # -U: the daemon holds the image open read-write and locked, as qemu-storage-daemon does
    share = [] if "--image-opts" in args else ["-U"]
    return json.loads(qemu_img("map", *share, "--output=json", *args).stdout)


# ---------------------------------------------------------------------------------------------------
# a minimal raw client
# ---------------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------
def test_qemu_img_info_map_convert_and_nbdinfo(qsd, tmp_path):
    img = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "8M")
    qemu_io("-c", "write -P 0x11 0 192k", "-c", "write -z 1M 128k", "-c", "write -P 0x22 3M 1M",
            "-c", "write -P 0 6M 64k", str(img))
    want = merged_map(img_map(str(img)))
    paths = make_chain(tmp_path)
    d, sock = start(qsd, tmp_path,
                    "--blockdev", f"driver=qcow2,node-name=img,file.driver=file,file.filename={img}",
                    "--blockdev", f"driver=qcow2,node-name=top,file.driver=file,file.filename={paths['top']}",
                    "--export", "type=nbd,id=e0,node-name=img",
                    "--export", "type=nbd,id=e1,node-name=top,name=chain,allocation-depth=on")
    info = json.loads(qemu_img("info", "--output=json", uri(sock, "img")).stdout)
    assert info["virtual-size"] == 8 * MiB and info["format"] == "raw"
    assert merged_map(img_map(uri(sock, "img"))) == want
    # the chain reads through: the export's map is the map of the whole chain
    chain_want = [(s, n, data, zero) for s, n, data, zero in merged_map(img_map(str(paths["top"])))]
    assert merged_map(img_map(uri(sock, "chain"))) == chain_want
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", uri(sock, "img"), str(out))
    qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", str(out), str(img))
    if NBDINFO:
        listing = run([NBDINFO, "--list", "--json", uri(sock)]).stdout
        exports = {e["export-name"]: e for e in json.loads(listing)["exports"]}
        assert set(exports) == {"img", "chain"}
        assert exports["img"]["is_read_only"] and exports["img"]["export-size"] == 8 * MiB
        assert exports["chain"]["contexts"] == ["base:allocation", "qemu:allocation-depth"]
        depth = run([NBDINFO, "--map=qemu:allocation-depth", uri(sock, "chain")]).stdout.split("\n")
        rows = [tuple(int(x) for x in line.split()[:3]) for line in depth if line.strip()]
        assert rows == [(0, MiB, 3), (MiB, MiB, 2), (2 * MiB, MiB, 1), (3 * MiB, MiB, 0)]
        nmap = run([NBDINFO, "--map", uri(sock, "img")]).stdout
        assert nmap.split("\n")[0].split()[:3] == ["0", str(192 << 10), "0"]
    d.stop()


def test_qemu_io_on_writable_export_and_read_only_refusal(qsd, tmp_path):
    img = tmp_path / "rw.qcow2"
    ro = tmp_path / "ro.raw"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_img("create", "-q", "-f", "raw", str(ro), "1M")
    qemu_io("-c", "write -P 0x5a 0 1M", str(img))
    d, sock = start(qsd, tmp_path,
                    "--blockdev", f"driver=qcow2,node-name=rw,discard=unmap,file.driver=file,"
                                  f"file.filename={img}",
                    "--blockdev", f"driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename={ro}",
                    "--export", "type=nbd,id=rw,node-name=rw,writable=on",
                    "--export", "type=nbd,id=ro,node-name=ro")
    u = uri(sock, "rw")
    res = qemu_io("-f", "raw", u, "-c", "write -P 0xa1 64k 128k", "-c", "write -P 0xa2 1000 3000",
                  "-c", "write -P 0xa3 2M 1M", "-c", "write -z 2M 64k", "-c", "discard 512k 512k",
                  "-c", "write -f -P 0xa4 3M 4k", "-c", "flush",
                  "-c", "read -P 0xa1 64k 128k", "-c", "read -P 0xa2 1000 3000", "-c", "read -P 0x5a 0 1000",
                  "-c", "read -P 0 2M 64k", "-c", "read -P 0xa3 2112k 960k", "-c", "read -P 0 512k 512k")
    assert "Pattern verification failed" not in res.stdout + res.stderr, res.stdout
    bad = qemu_io("-f", "raw", uri(sock, "ro"), "-c", "write -P 1 0 4k", check=False)
    assert "Operation not permitted" in bad.stdout + bad.stderr or bad.returncode != 0
    # the same refusal seen on the wire: EPERM, and the connection stays usable
    c = RawClient(sock)
    assert c.handshake("ro") == MiB and c.flags & P.TransmissionFlags.READ_ONLY
    c.request(P.Cmd.WRITE, 0, 4, b"abcd")
    (_, typ, payload), = c.reply_chunks()
    assert typ == P.Chunk.ERROR and struct.unpack(">I", payload[:4])[0] == P.NBD_EPERM
    c.request(P.Cmd.READ, 0, 4096, handle=2)
    chunks = c.reply_chunks()
    assert chunks[-1][0] & P.ReplyFlags.DONE and chunks[0][1] in (P.Chunk.OFFSET_HOLE, P.Chunk.OFFSET_DATA)
    c.close()
    assert d.stop() == 0
    qemu_img("check", str(img))
    qemu_io("-c", "read -P 0xa1 64k 128k", "-c", "read -P 0xa2 1000 3000", "-c", "read -P 0 2M 64k",
            "-c", "read -P 0xa3 2112k 960k", "-c", "read -P 0 512k 512k", "-c", "read -P 0xa4 3M 4k",
            "-c", "read -P 0x5a 4096 60k", str(img))
    assert not any(e["data"] for e in img_map(str(img)) if e["start"] == 512 << 10)


def test_dirty_bitmap_over_nbd(qsd, tmp_path):
    img = tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    d, sock = start(qsd, tmp_path,
                    "--blockdev", f"driver=qcow2,node-name=n0,file.driver=file,file.filename={img}")
    d.ok("block-dirty-bitmap-add", node="n0", name="bm0")
    assert d.err("block-export-add", type="nbd", id="x", **{"node-name": "n0"}, bitmaps=["bm0"]) == \
        ("GenericError", "Enabled bitmap 'bm0' incompatible with readonly export")
    assert d.err("block-export-add", type="nbd", id="x", **{"node-name": "n0"}, bitmaps=["nob"]) == \
        ("GenericError", "Bitmap 'nob' is not found")
    d.ok("block-export-add", type="nbd", id="e0", **{"node-name": "n0"}, bitmaps=["bm0"], writable=True)
    assert d.err("block-dirty-bitmap-remove", node="n0", name="bm0")[1] == \
        "Bitmap 'bm0' is currently in use by another operation and cannot be used"
    qemu_io("-f", "raw", uri(sock, "n0"), "-c", "write -P 1 1M 128k", "-c", "write -P 2 3M 4k")
    opts = f"driver=nbd,export=n0,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:bm0"
    m = img_map("--image-opts", opts)
    # with x-dirty-bitmap, qemu reports dirty ranges as "data": false
    dirty = [(e["start"], e["length"]) for e in m if not e["data"]]
    assert dirty == [(MiB, 128 << 10), (3 * MiB, 64 << 10)]
    if NBDINFO:
        out = run([NBDINFO, "--map=qemu:dirty-bitmap:bm0", uri(sock, "n0")]).stdout
        assert [ln.split()[3] for ln in out.strip().split("\n")] == ["clean", "dirty", "clean", "dirty", "clean"]
    d.ok("block-export-del", id="e0")
    d.wait_event("BLOCK_EXPORT_DELETED", id="e0")
    d.ok("block-dirty-bitmap-remove", node="n0", name="bm0")
    d.stop()


def test_nbd_writes_during_mirror_converge_and_follow_the_pivot(qsd, tmp_path):
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "16M")
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), "16M")
    qemu_io("-c", "write -P 0x31 0 8M", str(src))
    d, sock = start(qsd, tmp_path,
                    "--blockdev", f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
                    "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}",
                    "--export", "type=nbd,id=e0,node-name=src,writable=on")
    res = d.cmd("blockdev-mirror", **{"job-id": "m0"}, device="src", target="tgt", sync="full", speed=8 * MiB)
    assert "return" in res, res
    u = uri(sock, "src")
    cmds = []
    for i in range(16):
        cmds += ["-c", f"write -P {0x40 + i} {i}M 256k"]
    qemu_io("-f", "raw", u, *cmds)
    d.ok("block-job-set-speed", device="m0", speed=0)
    d.wait_event("BLOCK_JOB_READY", device="m0")
    qemu_io("-f", "raw", u, "-c", "write -P 0x66 5M 1M", "-c", "write -z 7M 64k")
    d.ok("block-job-complete", device="m0")
    d.wait_job_gone("m0")
    assert d.ok("query-block-exports") == [{"node-name": "tgt", "shutting-down": False, "type": "nbd",
                                            "id": "e0"}]
    # after the pivot the export writes the target
    qemu_io("-f", "raw", u, "-c", "write -P 0x77 12M 64k")
    assert d.stop() == 0
    qemu_io("-c", "read -P 0x77 12M 64k", str(tgt))
    qemu_io("-c", "read -P 0x4c 12M 64k", str(src))
    qemu_io("-c", "write -P 0x77 12M 64k", str(src))
    qemu_img("compare", str(src), str(tgt))


def test_bad_clients_are_dropped_alone(qsd, tmp_path):
    img = tmp_path / "x.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "2M")
    d, sock = start(qsd, tmp_path,
                    "--blockdev", f"driver=raw,node-name=x,file.driver=file,file.filename={img}",
                    "--export", "type=nbd,id=x,node-name=x,writable=on")
    good = RawClient(sock)
    assert good.handshake("x") == 2 * MiB
    # garbage instead of client flags
    g = RawClient(sock)
    g.recv(18)
    g.s.sendall(b"\xde\xad\xbe\xef" * 8)
    assert g.closed_by_server()
    # garbage option header
    g = RawClient(sock)
    g.recv(18)
    g.s.sendall(struct.pack(">I", 3) + b"NOTAMAGIC-------" * 2)
    assert g.closed_by_server()
    # an unknown export is an error reply, not a drop
    g = RawClient(sock)
    g.recv(18)
    g.s.sendall(struct.pack(">I", 3))
    (rep, msg), = g.opt(P.Opt.GO, struct.pack(">I", 4) + b"nope" + struct.pack(">H", 0))
    assert rep == P.Rep.ERR_UNKNOWN and b"nope" in msg
    assert g.opt(P.Opt.INFO, struct.pack(">I", 1) + b"x" + struct.pack(">H", 0))[-1][0] == P.Rep.ACK
    assert g.opt(99)[0][0] == P.Rep.ERR_UNSUP
    g.close()
    # an oversized write, and a request with a bad magic
    big = RawClient(sock)
    big.handshake("x")
    big.request(P.Cmd.WRITE, 0, P.MAX_BUFFER_SIZE + 1)
    assert big.closed_by_server()
    bad = RawClient(sock)
    bad.handshake("x", structured=False)
    bad.s.sendall(b"\x00" * 28)
    assert bad.closed_by_server()
    # an oversized read is an EINVAL reply; the connection goes on
    good.request(P.Cmd.READ, 0, P.MAX_BUFFER_SIZE + 1, handle=5)
    (_, typ, payload), = good.reply_chunks()
    assert typ == P.Chunk.ERROR and struct.unpack(">I", payload[:4])[0] == P.NBD_EINVAL
    good.request(P.Cmd.WRITE, 4096, 4, b"wxyz", handle=6)
    assert good.reply_chunks()[-1][1] == P.Chunk.NONE
    good.request(P.Cmd.READ, 4096, 4, handle=7, flags=P.CmdFlags.DF)
    (_, typ, payload), = good.reply_chunks()
    assert typ == P.Chunk.OFFSET_DATA and payload == struct.pack(">Q", 4096) + b"wxyz"
    good.request(P.Cmd.DISC)
    assert good.closed_by_server()
    qemu_io("-f", "raw", uri(sock, "x"), "-c", "read -P 0 0 4k", "-c", "write -P 3 1M 4k", "-c", "read -P 3 1M 4k")
    assert d.stop() == 0
    err = d.proc.stderr.read().decode() if d.proc.stderr else ""
    assert "Traceback" not in err


def test_export_commands_as_qsd(qsd, tmp_path):
    img = tmp_path / "a.qcow2"
    ro = tmp_path / "r.raw"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")
    qemu_img("create", "-q", "-f", "raw", str(ro), "4M")
    d = qsd("--blockdev", f"driver=qcow2,node-name=a,file.driver=file,file.filename={img}",
            "--blockdev", f"driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename={ro}")
    sock = tmp_path / "n.sock"
    e = lambda *a, **k: d.err(*a, **k)[1]
    assert e("block-export-add", type="nbd", id="e0", **{"node-name": "a"}) == "NBD server not running"
    assert e("nbd-server-stop") == "NBD server not running"
    assert e("block-export-del", id="zz") == "Export 'zz' is not found"
    assert e("nbd-server-add", device="ro") == "NBD server not running"
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    assert e("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock) + "2"}}) == \
        "NBD server already running"
    assert e("block-export-add", type="nbd", id="e0", **{"node-name": "nope"}) == \
        "Cannot find device='' nor node-name='nope'"
    assert e("block-export-add", type="nbd", id="e0", **{"node-name": "ro"}, writable=True) == \
        "Cannot export read-only node as writable"
    assert e("block-export-add", type="nbd", id="9bad", **{"node-name": "ro"}) == "Invalid block export id"
    d.ok("block-export-add", type="nbd", id="e0", **{"node-name": "a"}, writable=True)
    assert e("block-export-add", type="nbd", id="e0", **{"node-name": "a"}) == \
        "Block export id 'e0' is already in use"
    assert e("block-export-add", type="nbd", id="e1", **{"node-name": "a"}) == \
        "NBD server already has export named 'a'"
    assert e("blockdev-del", **{"node-name": "a"}) == "Node a is in use"
    d.ok("nbd-server-add", device="ro", name="leg", writable=True)  # silently read-only
    d.ok("block-export-add", type="nbd", id="dflt", **{"node-name": "ro"}, name="")
    assert d.ok("query-block-exports") == [
        {"node-name": "ro", "shutting-down": False, "type": "nbd", "id": "dflt"},
        {"node-name": "ro", "shutting-down": False, "type": "nbd", "id": "leg"},
        {"node-name": "a", "shutting-down": False, "type": "nbd", "id": "e0"}]
    c = RawClient(sock)
    assert c.handshake("leg") == 4 * MiB and c.flags & P.TransmissionFlags.READ_ONLY
    d2 = RawClient(sock)
    assert d2.handshake("") == 4 * MiB
    d2.close()
    assert e("nbd-server-remove", name="leg") == "export 'leg' still in use"
    d.ok("nbd-server-remove", name="leg", mode="hard")
    d.wait_event("BLOCK_EXPORT_DELETED", id="leg")
    assert c.closed_by_server()
    d.ok("block-export-del", id="e0")
    d.wait_event("BLOCK_EXPORT_DELETED", id="e0")
    assert e("block-export-del", id="e0") == "Export 'e0' is not found"
    d.ok("blockdev-del", **{"node-name": "a"})
    d.ok("nbd-server-stop")
    d.wait_event("BLOCK_EXPORT_DELETED", id="dflt")
    assert d.ok("query-block-exports") == []
    assert not sock.exists()
    d.ok("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}})
    d.ok("nbd-server-stop")
    # max-connections=1: no multi-conn, and a second connection is refused while the first lasts
    d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}}, **{"max-connections": 1})
    d.ok("block-export-add", type="nbd", id="e2", **{"node-name": "ro"})
    first = RawClient(sock)
    first.handshake("ro")
    assert not first.flags & P.TransmissionFlags.CAN_MULTI_CONN
    assert RawClient(sock).closed_by_server()
    first.close()
    d.stop()


def test_inet_server_from_the_command_line(qsd, tmp_path):
    img = tmp_path / "i.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "3M")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = qsd("--blockdev", f"driver=raw,node-name=i,file.driver=file,file.filename={img}",
            "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}",
            "--export", "type=nbd,id=i,node-name=i,name=disk,description=hello")
    d.ok("query-block-exports")
    info = json.loads(qemu_img("info", "--output=json", f"nbd://127.0.0.1:{port}/disk").stdout)
    assert info["virtual-size"] == 3 * MiB
    if NBDINFO:
        out = json.loads(run([NBDINFO, "--json", f"nbd://127.0.0.1:{port}/disk"]).stdout)
        exp = out["exports"][0]
        assert exp["description"] == "hello" and exp["is_read_only"] and exp["block_size_maximum"] == 32 * MiB
    d.stop()


def test_startup_errors_for_exports(tmp_path):
    from tests.util import parablock

    p = parablock("daemon", "--export", "type=nbd,id=e0,node-name=nope", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "Cannot find device='' nor node-name='nope'" in p.stderr
    img = tmp_path / "z.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "1M")
    p = parablock("daemon", "--blockdev", f"driver=file,node-name=z,filename={img}",
                  "--export", "type=nbd,id=e0,node-name=z", cwd=tmp_path, check=False)
    assert p.returncode == 1 and "NBD server not running" in p.stderr
    assert "Traceback" not in p.stderr
