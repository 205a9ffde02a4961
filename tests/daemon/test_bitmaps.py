"""block-dirty-bitmap-add/remove/clear/enable/disable/merge and query-named-block-nodes' ``dirty-bitmaps``:
QEMU 7.2's error texts over QMP against `parablock daemon`, recording semantics with guest writes driven
in process through the request pipeline, and persistence in qcow2 images checked with qemu-img and
qemu-io.  Expected texts and shapes were taken from qemu-storage-daemon 7.2."""
from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from tests.daemon.conftest import MiB
from tests.util import assert_qemu_clean, needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu

BUSY = "Bitmap '{}' is currently in use by another operation and cannot be used"
INCONSISTENT = "Bitmap '{}' is inconsistent and cannot be used"
READONLY = "Bitmap '{}' is readonly and cannot be modified"


def info(name: str, count: int = 0, granularity: int = 65536, recording: bool = True, persistent: bool = False,
         busy: bool = False, inconsistent: bool = False) -> dict:
    """One BlockDirtyInfo as qsd 7.2 prints it (key order included)."""
    out = {"name": name, "recording": recording, "persistent": persistent, "busy": busy,
           "granularity": granularity, "count": count}
    if inconsistent:
        out["inconsistent"] = True
    return out


def bitmaps_of(nodes: list[dict], name: str) -> list[dict] | None:
    """The ``dirty-bitmaps`` of node ``name`` (None when the key is absent), checking where qsd puts it."""
    node = next(n for n in nodes if n["node-name"] == name)
    if "dirty-bitmaps" not in node:
        return None
    keys = list(node)
    assert keys[keys.index("write_threshold") + 1] == "dirty-bitmaps", keys
    return node["dirty-bitmaps"]


def image_bitmaps(path) -> list[dict] | None:
    data = json.loads(qemu_img("info", "-U", "--output=json", str(path)).stdout)
    return data["format-specific"]["data"].get("bitmaps")


def crash_with_bitmaps_in_use(path) -> None:
    """Open ``path`` read-write with qemu-io (which flags its bitmaps in use) and kill it there."""
    p = subprocess.run(["qemu-io", "-c", "sigraise 9", str(path)], check=False, capture_output=True)
    assert p.returncode != 0


def ok(d, cmd: str, **args):
    res = d.qmp.cmd_raw(cmd, args or None)
    assert "return" in res, f"{cmd} {args}: {res}"
    return res["return"]


def err(d, cmd: str, **args) -> tuple[str, str]:
    res = d.qmp.cmd_raw(cmd, args or None)
    assert "error" in res, f"{cmd} {args} unexpectedly succeeded: {res}"
    return res["error"]["class"], res["error"]["desc"]


def qcow2_dev(name: str, filename: str, **extra) -> str:
    return json.dumps({"driver": "qcow2", "node-name": name, **extra,
                       "file": {"driver": "file", "filename": filename}})


# --------------------------------------------------------------------------------------------------
# over QMP
# --------------------------------------------------------------------------------------------------
def test_errors_and_listing_over_qmp(qsd, tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "8M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", str(tmp_path / "c4k.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", str(tmp_path / "c2m.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", str(tmp_path / "v2.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "ro.qcow2"), "4M")
    qemu_img("bitmap", "--add", str(tmp_path / "ro.qcow2"), "rob")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "4M")
    d = qsd("--blockdev", qcow2_dev("a", "a.qcow2"), "--blockdev", qcow2_dev("b", "b.qcow2"),
            "--blockdev", qcow2_dev("c4k", "c4k.qcow2"), "--blockdev", qcow2_dev("c2m", "c2m.qcow2"),
            "--blockdev", qcow2_dev("v2", "v2.qcow2"), "--blockdev", qcow2_dev("ro", "ro.qcow2", **{"read-only": True}),
            "--blockdev", "driver=file,node-name=rawf,filename=r.raw",
            "--blockdev", "driver=raw,node-name=rawnode,file=rawf")
    add = "block-dirty-bitmap-add"
    ok(d, add, node="a", name="bm0")
    ok(d, add, node="a", name="p1", persistent=True, disabled=True)
    ok(d, add, node="a", name="fine", granularity=512)
    ok(d, add, node="b", name="y1")
    long = "x" * 1024
    cases = [
        (add, {"node": "a", "name": "bm0"}, "Bitmap already exists: bm0"),
        (add, {"node": "a", "name": "bm0", "persistent": True}, "Bitmap already exists: bm0"),
        (add, {"node": "nope", "name": "", "granularity": 3}, "Bitmap name cannot be empty"),
        (add, {"node": "nope", "name": "x"}, "Cannot find device='nope' nor node-name='nope'"),
        (add, {"node": "a", "name": "g", "granularity": 1000}, "Granularity must be power of 2 and at least 512"),
        (add, {"node": "a", "name": "g", "granularity": 256}, "Granularity must be power of 2 and at least 512"),
        (add, {"node": "a", "name": "g", "granularity": 0}, "Granularity must be power of 2 and at least 512"),
        (add, {"node": "rawnode", "name": "p", "persistent": True},
         "Can't store persistent bitmaps to rawnode: Operation not supported"),
        (add, {"node": "rawf", "name": "p", "persistent": True},
         "Can't store persistent bitmaps to rawf: Operation not supported"),
        (add, {"node": "v2", "name": "p", "persistent": True},
         "Can't make bitmap 'p' persistent in 'v2': Cannot store dirty bitmaps in qcow2 v2 files"),
        (add, {"node": "a", "name": long}, f"Bitmap name too long: {long}"),
        (add, {"node": "a", "name": long, "persistent": True},
         f"Can't make bitmap '{long}' persistent in 'a': Name length exceeds maximum (1023 characters)"),
        ("block-dirty-bitmap-remove", {"node": "nope", "name": "bm0"}, "Node 'nope' not found"),
        ("block-dirty-bitmap-remove", {"node": "a", "name": "nope"}, "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-remove", {"node": "a", "name": ""}, "Dirty bitmap '' not found"),
        ("block-dirty-bitmap-clear", {"node": "nope", "name": "bm0"}, "Node 'nope' not found"),
        ("block-dirty-bitmap-clear", {"node": "a", "name": "nope"}, "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-enable", {"node": "a", "name": "nope"}, "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-disable", {"node": "nope", "name": "nope"}, "Node 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "nope", "target": "bm0", "bitmaps": ["fine"]}, "Node 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "a", "target": "nope", "bitmaps": ["fine"]},
         "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "a", "target": "bm0", "bitmaps": ["fine", "nope"]},
         "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "a", "target": "bm0", "bitmaps": [{"node": "nope", "name": "y1"}]},
         "Node 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "a", "target": "bm0", "bitmaps": [{"node": "b", "name": "nope"}]},
         "Dirty bitmap 'nope' not found"),
        ("block-dirty-bitmap-merge", {"node": "a", "target": "bm0", "bitmaps": [{"node": "b", "name": "y1"}]},
         ("Bitmaps are of different sizes (destination size is 4194304, source size is 8388608) and can't be "
          "merged")),
        # bitmaps of a read-only image: usable as sources, enable/disable allowed, never modified
        ("block-dirty-bitmap-clear", {"node": "ro", "name": "rob"}, READONLY.format("rob")),
        ("block-dirty-bitmap-remove", {"node": "ro", "name": "rob"}, READONLY.format("rob")),
        ("block-dirty-bitmap-merge", {"node": "ro", "target": "rob", "bitmaps": [{"node": "a", "name": "bm0"}]},
         READONLY.format("rob")),
    ]
    for cmd, args, desc in cases:
        assert err(d, cmd, **args) == ("GenericError", desc), (cmd, args)
    ok(d, "block-dirty-bitmap-enable", node="ro", name="rob")
    ok(d, "block-dirty-bitmap-disable", node="ro", name="rob")
    ok(d, add, node="ro", name="n1")
    ok(d, "block-dirty-bitmap-merge", node="ro", target="n1", bitmaps=["rob"])
    # default granularity: the cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without one (raw)
    for node in ("c4k", "c2m", "rawnode", "rawf"):
        ok(d, add, node=node, name="d")
    ok(d, add, node="c2m", name="p", persistent=True, granularity=512)
    nodes = ok(d, "query-named-block-nodes", flat=True)
    assert bitmaps_of(nodes, "a") == [info("fine", granularity=512), info("p1", recording=False, persistent=True),
                                      info("bm0")]
    assert bitmaps_of(nodes, "c4k") == [info("d", granularity=4096)]
    assert bitmaps_of(nodes, "c2m") == [info("p", granularity=512, persistent=True), info("d")]
    assert bitmaps_of(nodes, "rawnode") == [info("d")] and bitmaps_of(nodes, "rawf") == [info("d")]
    assert bitmaps_of(nodes, "ro") == [info("n1"), info("rob", recording=False, persistent=True)]
    assert bitmaps_of(nodes, "v2") is None
    # removing leaves the others; a removed name can be added again
    ok(d, "block-dirty-bitmap-remove", node="a", name="bm0")
    ok(d, add, node="a", name="bm0", disabled=True)
    nodes = ok(d, "query-named-block-nodes")
    assert [b["name"] for b in bitmaps_of(nodes, "a")] == ["bm0", "fine", "p1"]
    assert d.stop() == 0
    # p1 was persistent: stored at quit, disabled (no 'auto' flag); the read-only image is unchanged
    assert image_bitmaps(tmp_path / "a.qcow2") == [{"flags": [], "name": "p1", "granularity": 65536}]
    assert image_bitmaps(tmp_path / "c2m.qcow2") == [{"flags": ["auto"], "name": "p", "granularity": 512}]
    assert image_bitmaps(tmp_path / "ro.qcow2") == [{"flags": ["auto"], "name": "rob", "granularity": 65536}]
    for img in ("a", "c2m", "ro"):
        assert_qemu_clean(tmp_path / f"{img}.qcow2")


def test_image_bitmaps_visible_and_inconsistent(qsd, tmp_path):
    """Bitmaps made by qemu-img (and dirtied by qemu-io) appear on blockdev-add; bitmaps left in use by a
    crash are inconsistent: listed, refused by every command but remove, which deletes them."""
    img, bad = tmp_path / "img.qcow2", tmp_path / "bad.qcow2"
    for p in (img, bad):
        qemu_img("create", "-q", "-f", "qcow2", str(p), "4M")
    qemu_img("bitmap", "--add", "--granularity", "4096", str(img), "qb")
    qemu_img("bitmap", "--add", "--disable", str(img), "qoff")
    qemu_io("-c", "write 8k 4k", "-c", "write 1M 64k", str(img))  # recorded by qb only
    for name in ("inc", "ok2"):
        qemu_img("bitmap", "--add", str(bad), name)
    crash_with_bitmaps_in_use(bad)
    assert image_bitmaps(bad)[0]["flags"] == ["in-use", "auto"]
    d = qsd("--blockdev", qcow2_dev("img", "img.qcow2"), "--blockdev", qcow2_dev("bad", "bad.qcow2"))
    nodes = ok(d, "query-named-block-nodes")
    assert bitmaps_of(nodes, "img") == [info("qoff", recording=False, persistent=True),
                                        info("qb", 4096 + 65536, 4096, persistent=True)]
    assert bitmaps_of(nodes, "bad") == [info("ok2", recording=False, persistent=True, inconsistent=True),
                                        info("inc", recording=False, persistent=True, inconsistent=True)]
    for cmd in ("clear", "enable", "disable"):
        assert err(d, f"block-dirty-bitmap-{cmd}", node="bad", name="inc") == ("GenericError",
                                                                             INCONSISTENT.format("inc"))
    # the target is checked before each source
    assert err(d, "block-dirty-bitmap-merge", node="bad", target="inc", bitmaps=["ok2"])[1] == \
        INCONSISTENT.format("inc")
    assert err(d, "block-dirty-bitmap-merge", node="img", target="qb", bitmaps=[{"node": "bad", "name": "ok2"}])[1] \
        == INCONSISTENT.format("ok2")
    ok(d, "block-dirty-bitmap-remove", node="bad", name="inc")
    ok(d, "block-dirty-bitmap-merge", node="img", target="qoff", bitmaps=["qb"])  # 4 KiB bits into 64 KiB ones
    nodes = ok(d, "query-named-block-nodes")
    assert bitmaps_of(nodes, "bad") == [info("ok2", recording=False, persistent=True, inconsistent=True)]
    assert bitmaps_of(nodes, "img")[0] == info("qoff", 2 * 65536, recording=False, persistent=True)
    assert d.stop() == 0
    assert image_bitmaps(bad) == [{"flags": ["in-use", "auto"], "name": "ok2", "granularity": 65536}]
    assert image_bitmaps(img) == [{"flags": ["auto"], "name": "qb", "granularity": 4096},
                                  {"flags": [], "name": "qoff", "granularity": 65536}]
    assert_qemu_clean(img)
    assert_qemu_clean(bad)


# --------------------------------------------------------------------------------------------------
# in process: guest writes through the request pipeline
# --------------------------------------------------------------------------------------------------
async def _daemon():
    from engine.daemon.core import Daemon
    from workers.inproc import InProcessExecutor

    return Daemon(InProcessExecutor())


async def _ok(d, cmd: str, **args):
    return await d.execute(cmd, args)


async def _err(d, cmd: str, **args) -> str:
    from engine.daemon.core import QmpError

    with pytest.raises(QmpError) as exc:
        await d.execute(cmd, args)
    assert exc.value.cls == "GenericError"
    return exc.value.desc


async def _bitmaps(d, node: str) -> dict[str, dict]:
    nodes = await d.execute("query-named-block-nodes", {})
    return {b["name"]: b for b in bitmaps_of(nodes, node) or []}


def test_recording_enable_disable_merge_clear(tmp_path):
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "4M")

    async def main() -> None:
        d = await _daemon()
        try:
            await _ok(d, "blockdev-add", driver="qcow2", **{"node-name": "a"},
                      file={"driver": "file", "filename": str(tmp_path / "a.qcow2")})
            await _ok(d, "block-dirty-bitmap-add", node="a", name="on")
            await _ok(d, "block-dirty-bitmap-add", node="a", name="off", disabled=True)
            await _ok(d, "block-dirty-bitmap-add", node="a", name="fine", granularity=512)
            a = d.graph.nodes["a"]
            await a.write(0, b"\x11" * 512)
            await a.write_zeroes(MiB + 4096, 512)
            await a.discard(2 * MiB, 65536)
            bms = await _bitmaps(d, "a")
            assert bms["on"]["count"] == 3 * 65536 and bms["on"]["recording"]
            assert bms["off"]["count"] == 0 and not bms["off"]["recording"]
            assert bms["fine"]["count"] == 512 + 512 + 65536
            # disable stops recording, enable resumes it
            await _ok(d, "block-dirty-bitmap-disable", node="a", name="on")
            await _ok(d, "block-dirty-bitmap-enable", node="a", name="off")
            await a.write(3 * MiB, b"\x22" * 4096)
            bms = await _bitmaps(d, "a")
            assert (bms["on"]["count"], bms["on"]["recording"]) == (3 * 65536, False)
            assert (bms["off"]["count"], bms["off"]["recording"]) == (65536, True)
            # merge: the target gains the union, the sources are unchanged; granularities may differ
            await _ok(d, "block-dirty-bitmap-merge", node="a", target="off", bitmaps=["on", {"node": "a", "name": "fine"}])
            bms = await _bitmaps(d, "a")
            assert bms["off"]["count"] == 4 * 65536
            assert bms["on"]["count"] == 3 * 65536 and bms["fine"]["count"] == 512 + 512 + 65536 + 4096
            await _ok(d, "block-dirty-bitmap-merge", node="a", target="fine", bitmaps=["off"])
            assert (await _bitmaps(d, "a"))["fine"]["count"] == 4 * 65536
            # clear empties; the bitmap keeps recording afterwards
            await _ok(d, "block-dirty-bitmap-clear", node="a", name="off")
            assert (await _bitmaps(d, "a"))["off"]["count"] == 0
            await a.write(4096, b"\x33" * 512)
            assert (await _bitmaps(d, "a"))["off"]["count"] == 65536
            # a busy bitmap (exported, or used by a backup job) is refused by every command
            on = next(b for b in a.bitmaps if b.name == "on")
            on.busy = True
            assert (await _bitmaps(d, "a"))["on"]["busy"] is True
            for cmd in ("clear", "enable", "disable", "remove"):
                assert await _err(d, f"block-dirty-bitmap-{cmd}", node="a", name="on") == BUSY.format("on")
            assert await _err(d, "block-dirty-bitmap-merge", node="a", target="on", bitmaps=["off"]) == BUSY.format("on")
            assert await _err(d, "block-dirty-bitmap-merge", node="a", target="off", bitmaps=["on"]) == BUSY.format("on")
            assert (await _bitmaps(d, "a"))["off"]["count"] == 65536  # refused merge changed nothing
            on.busy = False
            await _ok(d, "block-dirty-bitmap-remove", node="a", name="on")
            assert sorted(await _bitmaps(d, "a")) == ["fine", "off"]
        finally:
            await d.shutdown()

    asyncio.run(main())
    assert image_bitmaps(tmp_path / "a.qcow2") is None  # nothing was persistent
    assert_qemu_clean(tmp_path / "a.qcow2")


def test_persistence_across_restart(qsd, tmp_path):
    """Session 1 (in process): persistent bitmaps record guest writes and are stored at shutdown.  qemu-img
    sees them with their flags, the image is clean; session 2 (`parablock daemon`) finds them with the same
    counts, and a removed persistent bitmap is gone from the image."""
    img = tmp_path / "p.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "4M")

    async def session1() -> None:
        d = await _daemon()
        try:
            await _ok(d, "blockdev-add", driver="qcow2", **{"node-name": "p"},
                      file={"driver": "file", "filename": str(img)})
            await _ok(d, "block-dirty-bitmap-add", node="p", name="keep", persistent=True)
            await _ok(d, "block-dirty-bitmap-add", node="p", name="small", persistent=True, granularity=4096)
            await _ok(d, "block-dirty-bitmap-add", node="p", name="frozen", persistent=True, disabled=True)
            await _ok(d, "block-dirty-bitmap-add", node="p", name="gone", persistent=True)
            await _ok(d, "block-dirty-bitmap-add", node="p", name="mem")
            p = d.graph.nodes["p"]
            await p.write(0, b"\x44" * 8192)
            await p.write(2 * MiB, b"\x55" * 65536)
            bms = await _bitmaps(d, "p")
            assert bms["keep"] == info("keep", 2 * 65536, persistent=True)
            assert bms["small"] == info("small", 8192 + 65536, 4096, persistent=True)
            assert bms["frozen"] == info("frozen", 0, recording=False, persistent=True)
            await _ok(d, "block-dirty-bitmap-merge", node="p", target="frozen", bitmaps=["small"])
        finally:
            await d.shutdown()

    asyncio.run(session1())
    assert image_bitmaps(img) == [{"flags": ["auto"], "name": "keep", "granularity": 65536},
                                  {"flags": ["auto"], "name": "small", "granularity": 4096},
                                  {"flags": [], "name": "frozen", "granularity": 65536},
                                  {"flags": ["auto"], "name": "gone", "granularity": 65536}]
    assert_qemu_clean(img)
    d = qsd("--blockdev", qcow2_dev("p", "p.qcow2"))
    nodes = ok(d, "query-named-block-nodes")
    assert bitmaps_of(nodes, "p") == [info("gone", 2 * 65536, persistent=True),
                                      info("frozen", 2 * 65536, recording=False, persistent=True),
                                      info("small", 8192 + 65536, 4096, persistent=True),
                                      info("keep", 2 * 65536, persistent=True)]
    # while the daemon runs, the image's bitmaps are flagged in use (a crash would leave them inconsistent)
    assert image_bitmaps(img)[0]["flags"] == ["in-use", "auto"]
    ok(d, "block-dirty-bitmap-remove", node="p", name="gone")
    ok(d, "block-dirty-bitmap-clear", node="p", name="keep")
    assert d.stop() == 0
    assert [(b["name"], b["flags"]) for b in image_bitmaps(img)] == \
        [("keep", ["auto"]), ("small", ["auto"]), ("frozen", [])]
    assert_qemu_clean(img)
    d = qsd("--blockdev", qcow2_dev("p", "p.qcow2"), sock_name="qmp2.sock")
    counts = {b["name"]: b["count"] for b in bitmaps_of(ok(d, "query-named-block-nodes"), "p")}
    assert counts == {"keep": 0, "small": 8192 + 65536, "frozen": 2 * 65536}
    assert d.stop() == 0
