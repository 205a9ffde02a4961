"""The daemon's graph commands against what qemu-storage-daemon 7.2 answers for the same requests:
blockdev-add (drivers, options, every error text), blockdev-del, query-named-block-nodes,
query-blockstats, query-version / query-commands, throttle-group objects, and the process
(start-up failures, pidfile, --daemonize, SIGTERM).

Every expected text and shape below was first observed on the real qemu-storage-daemon 7.2 with the same
command line and requests (qmp-surface.md §2.1-2.3, §2.9); the tests do not need qsd to run.  Values that
legitimately differ (actual-size, the version package string, the two random digits of ``#blockNNN``
names) are not compared.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

import engine.daemon
from engine.daemon.core import COMMANDS
from tests.daemon.conftest import chain_blockdevs, make_chain
from tests.util import ROOT, assert_qemu_clean, qemu_img

IMPLICIT = re.compile(r"^#block\d{3,}$")  # QEMU's id_generate: counter, then two random digits


def nodes(d, flat: bool = False) -> dict[str, dict]:
    return {n["node-name"]: n for n in d.ok("query-named-block-nodes", flat=flat)}


def names(d) -> list[str]:
    return [n["node-name"] for n in d.ok("query-named-block-nodes")]


def open_paths(pid: int) -> set[str]:
    """Files held open by the daemon and its workers."""
    out: set[str] = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            out |= {f.path for f in p.open_files()}
        except psutil.Error:
            pass
    return out


# ---------------------------------------------------------------------------------------------------
# 1. blockdev-add
# ---------------------------------------------------------------------------------------------------
def test_blockdev_add_drivers_and_options(qsd, tmp_path):
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "r.raw", "-F", "raw", str(tmp_path / "over.qcow2"))
    d = qsd("--object", "throttle-group,id=tg0,limits.bps-total=1048576",
            # keyval and JSON forms on the command line
            "--blockdev", "driver=file,node-name=rf,filename=r.raw,cache.no-flush=on",
            "--blockdev", '{"driver": "raw", "node-name": "rw", "file": "rf", "read-only": true, '
                          '"detect-zeroes": "unmap", "discard": "unmap"}',
            "--blockdev", "driver=null-co,node-name=nc,size=1000,read-zeroes=on",
            "--blockdev", "driver=throttle,node-name=th,throttle-group=tg0,file=nc",
            workers=1)
    # qcow2, backing absent: the chain named in the header is opened with implicit nodes; inline
    # children inherit read-only and cache.* from their parent
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "top", "cache": {"direct": True, "no-flush": True},
                            "detect-zeroes": "on", "file": {"driver": "file", "filename": "top.qcow2"}})
    # backing = inline object, backing null, backing = an existing node
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "ov",
                            "file": {"driver": "file", "filename": "over.qcow2"},
                            "backing": {"driver": "raw", "node-name": "rb",
                                        "file": {"driver": "file", "node-name": "rbf", "filename": "r.raw"}}})
    d.ok("blockdev-add", **{"driver": "file", "node-name": "bf", "filename": "base.qcow2", "read-only": True})
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "b", "file": "bf", "read-only": True,
                            "backing": None})
    d.ok("blockdev-add", **{"driver": "null-aio", "node-name": "na", "detect-zeroes": "on",
                            "latency-ns": 5})

    order = names(d)
    # newest first; a qcow2 node is named before its backing chain is opened (file, node, backing...)
    assert order[:4] == ["na", "b", "bf", "rb"]
    assert order[4:7] == ["rbf", "ov"] + order[6:7] and IMPLICIT.match(order[6])
    imp = order[7:13]
    assert order[13:] == ["th", "nc", "rw", "rf"]
    assert all(IMPLICIT.match(n) for n in imp[:4] + imp[5:]) and imp[4] == "top"
    info = nodes(d)
    chain = [info[n] for n in imp]
    # base, base-file, mid, mid-file, top, top-file (newest first)
    assert [(n["drv"], n["file"], n["ro"], n["backing_file_depth"], n.get("backing_file")) for n in chain] == [
        ("qcow2", "base.qcow2", True, 0, None), ("file", "base.qcow2", True, 0, None),
        ("qcow2", "mid.qcow2", True, 1, "base.qcow2"), ("file", "mid.qcow2", True, 0, None),
        ("qcow2", "top.qcow2", False, 2, "mid.qcow2"), ("file", "top.qcow2", False, 0, None)]
    # cache options are inherited by the file child and the backing chain, detect-zeroes is not
    assert all(n["cache"] == {"no-flush": True, "direct": True, "writeback": True} for n in chain)
    assert [n["detect_zeroes"] for n in chain] == ["off"] * 4 + ["on", "off"]
    # protocol nodes report their size in whole sectors (bdrv_getlength)
    assert chain[1]["image"]["virtual-size"] % 512 == 0
    assert chain[1]["image"]["virtual-size"] == -(-os.path.getsize(tmp_path / "base.qcow2") // 512) * 512

    # raw over file, options from the command line
    assert info["rw"]["ro"] is True and info["rw"]["detect_zeroes"] == "unmap"
    assert info["rw"]["file"] == "r.raw" and info["rw"]["drv"] == "raw"
    assert info["rf"]["cache"] == {"no-flush": True, "direct": False, "writeback": True}
    assert info["rf"]["image"] == {**info["rf"]["image"], "virtual-size": 1048576, "filename": "r.raw",
                                   "format": "file", "dirty-flag": False}

    # null-co with strong options -> json: pseudo-filename (QDict key order), size rounded to sectors,
    # no dirty-flag (null has no bdrv_get_info); latency-ns is not a strong option
    nc_json = 'json:{"read-zeroes": true, "driver": "null-co", "size": 1000}'
    assert info["nc"]["file"] == nc_json
    assert info["nc"]["image"] == {"virtual-size": 1024, "filename": nc_json, "format": "null-co",
                                   "actual-size": 0}
    assert info["na"]["file"] == "null-aio://" and info["na"]["detect_zeroes"] == "on"
    assert info["na"]["image"]["virtual-size"] == 1073741824

    # throttle: a filter; its filtered child counts as backing-image
    th_json = ('json:{"throttle-group": "tg0", "driver": "throttle", "file": '
               '{"read-zeroes": true, "driver": "null-co", "size": 1000}}')
    assert info["th"]["drv"] == "throttle" and info["th"]["file"] == th_json
    assert info["th"]["backing_file_depth"] == 1 and "backing_file" not in info["th"]
    assert info["th"]["image"]["backing-image"]["filename"] == nc_json
    assert info["th"]["image"]["format"] == "throttle" and "dirty-flag" not in info["th"]["image"]
    assert nodes(d, flat=True)["th"]["backing_file_depth"] == 0
    assert "backing-image" not in nodes(d, flat=True)["th"]["image"]

    # inline backing object: read-only, named, header string kept
    assert (info["ov"]["file"], info["ov"]["backing_file"], info["ov"]["backing_file_depth"]) == \
        ("over.qcow2", "r.raw", 1)
    assert info["rb"]["ro"] is True and info["rbf"]["ro"] is True and info["rbf"]["file"] == "r.raw"
    assert info["ov"]["image"]["backing-image"]["format"] == "raw"
    # backing null on an image without a backing file
    assert info["b"]["file"] == "base.qcow2" and "backing_file" not in info["b"]

    # backing = an existing node that is what the header names (mid -> base.qcow2): a plain filename
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "t2", "backing": "b", "read-only": True,
                            "force-share": True, "file": {"driver": "file", "filename": "mid.qcow2"}})
    t2 = nodes(d)["t2"]
    assert (t2["file"], t2["backing_file"], t2["backing_file_depth"]) == ("mid.qcow2", "base.qcow2", 1)
    assert t2["image"]["backing-filename"] == "base.qcow2"
    # backing null on an image whose header names a backing file: overridden
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "m0", "backing": None, "read-only": True,
                            "force-share": True, "file": {"driver": "file", "filename": "over.qcow2"}})
    m0 = nodes(d)["m0"]
    assert m0["file"] == ('json:{"backing": null, "driver": "qcow2", "file": '
                          '{"driver": "file", "filename": "over.qcow2"}}')
    assert "backing_file" not in m0 and m0["backing_file_depth"] == 0
    # backing = another node than the header names: QEMU's "overridden" json: filename, and backing_file
    # follows the node while image.backing-filename keeps the header string
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "m1", "backing": "rb",
                            "file": {"driver": "file", "filename": "top.qcow2", "read-only": True},
                            "read-only": True, "force-share": True})
    m1 = nodes(d)["m1"]
    assert m1["file"] == ('json:{"backing": {"driver": "raw", "file": {"driver": "file", "filename": '
                          '"r.raw"}}, "driver": "qcow2", "file": {"driver": "file", "filename": "top.qcow2"}}')
    assert m1["backing_file"] == "r.raw" and m1["image"]["backing-filename"] == "mid.qcow2"


def test_blockdev_add_errors(qsd, tmp_path):
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "q.qcow2"), "1M")
    d = qsd("--blockdev", "driver=file,node-name=f1,filename=r.raw", workers=1)
    before = names(d)
    cases = [
        ({"driver": "file", "node-name": "f1", "filename": "r.raw"}, "Duplicate nodes with node-name='f1'"),
        ({"driver": "file", "filename": "r.raw"}, "'node-name' must be specified for the root node"),
        ({"driver": "file", "node-name": "1x", "filename": "r.raw"}, "Invalid node-name: '1x'"),
        ({"driver": "file", "node-name": "#x", "filename": "r.raw"}, "Invalid node-name: '#x'"),
        ({"driver": "null-co", "node-name": "", "size": 1}, "Invalid node-name: ''"),
        ({"driver": "file", "node-name": "a" * 32, "filename": "r.raw"}, "Node name too long"),
        ({"driver": "bogus", "node-name": "b"}, "Parameter 'driver' does not accept value 'bogus'"),
        ({"node-name": "b"}, "Parameter 'driver' is missing"),
        ({"driver": "file", "node-name": "b"}, "Parameter 'filename' is missing"),
        ({"driver": "qcow2", "node-name": "b"}, "Parameter 'file' is missing"),
        ({"driver": "file", "node-name": "n1", "filename": "missing.raw"},
         "Could not open 'missing.raw': No such file or directory"),
        ({"driver": "raw", "node-name": "n1", "file": {"driver": "file", "filename": "missing.raw"}},
         "Could not open 'missing.raw': No such file or directory"),
        ({"driver": "null-co", "node-name": "n2", "detect-zeroes": "unmap"},
         "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"),
        ({"driver": "null-co", "node-name": "n2", "detect-zeroes": "bogus"},
         "Parameter 'detect-zeroes' does not accept value 'bogus'"),
        ({"driver": "null-co", "node-name": "n2", "force-share": True},
         "force-share=on can only be used with read-only images"),
        ({"driver": "qcow2", "node-name": "q1", "file": {"driver": "file", "filename": "q.qcow2"},
          "backing": "nope"}, "Could not open backing file: Cannot find device='nope' nor node-name='nope'"),
        ({"driver": "qcow2", "node-name": "q1", "file": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
        ({"driver": "qcow2", "node-name": "q1", "file": "f1"}, "Image is not in qcow2 format"),
        ({"driver": "raw", "node-name": "r1", "file": "f1", "backing": None}, "Parameter 'backing' is unexpected"),
        ({"driver": "throttle", "node-name": "t1", "throttle-group": "nope", "file": "f1"},
         "Throttle group 'nope' does not exist"),
        ({"driver": "throttle", "node-name": "t1", "file": "f1"}, "Parameter 'throttle-group' is missing"),
        # inline children are checked too, and a failed add leaves nothing behind
        ({"driver": "raw", "node-name": "r2", "file": {"driver": "file", "node-name": "1bad", "filename": "r.raw"}},
         "Invalid node-name: '1bad'"),
        ({"driver": "raw", "node-name": "r2", "file": {"driver": "file", "node-name": "f1", "filename": "r.raw"}},
         "Duplicate nodes with node-name='f1'"),
        ({"driver": "raw", "node-name": "f1", "file": {"driver": "file", "node-name": "f9", "filename": "r.raw"}},
         "Duplicate nodes with node-name='f1'"),
        ({"driver": "qcow2", "node-name": "q2", "file": {"driver": "file", "node-name": "qf", "filename": "q.qcow2"},
          "backing": {"driver": "file", "node-name": "bk", "filename": "missing.raw"}},
         "Could not open backing file: Could not open 'missing.raw': No such file or directory"),
    ]
    got = [d.err("blockdev-add", **opts) for opts, _ in cases]
    assert got == [("GenericError", text) for _, text in cases]
    assert names(d) == before  # nothing half-added (no f9, qf, q2, ...)
    # the valid variants of the refused options work
    d.ok("blockdev-add", **{"driver": "null-co", "node-name": "n3", "detect-zeroes": "unmap", "discard": "unmap"})
    d.ok("blockdev-add", **{"driver": "null-co", "node-name": "n4", "force-share": True, "read-only": True})
    d.ok("blockdev-add", **{"driver": "file", "node-name": "a" * 31, "filename": "r.raw", "read-only": True})
    assert names(d) == ["a" * 31, "n4", "n3", "f1"]
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------------
# 2. blockdev-del
# ---------------------------------------------------------------------------------------------------
def test_blockdev_del(qsd, tmp_path):
    make_chain(tmp_path)
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "r.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "w.qcow2"), "1M")
    d = qsd(*chain_blockdevs(), workers=1)
    d.ok("blockdev-add", **{"driver": "raw", "node-name": "r",
                            "file": {"driver": "file", "node-name": "rf", "filename": "r.raw"}})
    # top.qcow2 is open read-write in this daemon: a second reader must share writes (image locking)
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "hdr",
                            "file": {"driver": "file", "filename": "top.qcow2", "read-only": True},
                            "read-only": True, "force-share": True})
    implicit = [n for n in names(d) if n.startswith("#")]
    assert len(implicit) == 5  # hdr's file, mid + file, base + file
    assert d.err("blockdev-del", **{"node-name": "nope"}) == \
        ("GenericError", "Failed to find node with node-name='nope'")
    assert d.err("blockdev-del", **{"node-name": "rf"}) == ("GenericError", "Node rf is not owned by the monitor")
    assert d.err("blockdev-del", **{"node-name": implicit[0]}) == \
        ("GenericError", f"Node {implicit[0]} is not owned by the monitor")
    assert d.err("blockdev-del", **{"node-name": "base"}) == \
        ("GenericError", "Node 'base' is busy: node is used as backing hd of 'mid'")
    assert d.err("blockdev-del", **{"node-name": "top-file"}) == ("GenericError", "Block device top-file is in use")
    # success frees the inline children, and the header chain's implicit nodes
    d.ok("blockdev-del", **{"node-name": "r"})
    d.ok("blockdev-del", **{"node-name": "hdr"})
    left = names(d)
    assert left == ["top", "top-file", "mid", "mid-file", "base", "base-file"]
    assert d.err("blockdev-del", **{"node-name": "rf"}) == \
        ("GenericError", "Failed to find node with node-name='rf'")
    # bottom-up deletion works once nothing uses a node
    for n in ("top", "top-file", "mid", "mid-file", "base", "base-file"):
        d.ok("blockdev-del", **{"node-name": n})
    assert d.ok("query-named-block-nodes") == []
    # a deleted read-write node's image is closed: the daemon holds no fd on it any more
    d.ok("blockdev-add", **{"driver": "qcow2", "node-name": "w",
                            "file": {"driver": "file", "filename": "w.qcow2"}})
    wpath = str(tmp_path / "w.qcow2")
    assert wpath in open_paths(d.proc.pid)
    d.ok("blockdev-del", **{"node-name": "w"})
    assert wpath not in open_paths(d.proc.pid)
    assert str(tmp_path / "top.qcow2") not in open_paths(d.proc.pid)
    assert d.stop() == 0
    for n in ("w", "top", "mid", "base"):
        assert_qemu_clean(tmp_path / f"{n}.qcow2")


# ---------------------------------------------------------------------------------------------------
# 3./4. queries on the reference chain
# ---------------------------------------------------------------------------------------------------
# what qsd 7.2 returns for query-named-block-nodes with chain_blockdevs() (actual-size left out)
QSD_NODE_KEYS = ['backing_file_depth', 'bps', 'bps_rd', 'bps_wr', 'cache', 'detect_zeroes', 'drv', 'encrypted',
                 'file', 'image', 'iops', 'iops_rd', 'iops_wr', 'node-name', 'ro', 'write_threshold']
QSD_CHAIN = [  # node-name, drv, ro, backing_file, backing_file_depth, file
    ("top", "qcow2", False, "mid.qcow2", 2, "top.qcow2"),
    ("top-file", "file", False, None, 0, "top.qcow2"),
    ("mid", "qcow2", False, "base.qcow2", 1, "mid.qcow2"),
    ("mid-file", "file", False, None, 0, "mid.qcow2"),
    ("base", "qcow2", False, None, 0, "base.qcow2"),
    ("base-file", "file", False, None, 0, "base.qcow2"),
]
QCOW2_IMAGE_KEYS = ["actual-size", "cluster-size", "dirty-flag", "filename", "format", "format-specific",
                    "virtual-size"]
BACKED_KEYS = sorted(QCOW2_IMAGE_KEYS + ["backing-filename", "backing-filename-format", "backing-image",
                                         "full-backing-filename"])
FILE_IMAGE_KEYS = ["actual-size", "dirty-flag", "filename", "format", "virtual-size"]
QSD_TOP_IMAGE = {
    "keys": BACKED_KEYS, "virtual-size": 4194304, "filename": "top.qcow2", "cluster-size": 65536,
    "format": "qcow2", "backing-filename": "mid.qcow2", "full-backing-filename": "mid.qcow2",
    "backing-filename-format": "qcow2", "dirty-flag": False,
    "backing-image": {
        "keys": BACKED_KEYS, "virtual-size": 4194304, "filename": "mid.qcow2", "cluster-size": 65536,
        "format": "qcow2", "backing-filename": "base.qcow2", "full-backing-filename": "base.qcow2",
        "backing-filename-format": "qcow2", "dirty-flag": False,
        "backing-image": {"keys": QCOW2_IMAGE_KEYS, "virtual-size": 4194304, "filename": "base.qcow2",
                          "cluster-size": 65536, "format": "qcow2", "dirty-flag": False}}}
QSD_FORMAT_SPECIFIC = {"type": "qcow2", "data": {"compat": "1.1", "compression-type": "zlib",
                                                 "lazy-refcounts": False, "refcount-bits": 16, "corrupt": False,
                                                 "extended-l2": False}}
STATS_KEYS = ['account_failed', 'account_invalid', 'failed_flush_operations', 'failed_rd_operations',
              'failed_unmap_operations', 'failed_wr_operations', 'flush_operations', 'flush_total_time_ns',
              'invalid_flush_operations', 'invalid_rd_operations', 'invalid_unmap_operations',
              'invalid_wr_operations', 'rd_bytes', 'rd_merged', 'rd_operations', 'rd_total_time_ns', 'timed_stats',
              'unmap_bytes', 'unmap_merged', 'unmap_operations', 'unmap_total_time_ns', 'wr_bytes',
              'wr_highest_offset', 'wr_merged', 'wr_operations', 'wr_total_time_ns']


def implemented_commands() -> set[str]:
    """Every command registered by the modules of engine.daemon (the daemon imports those it serves)."""
    import importlib
    import pkgutil

    for m in pkgutil.iter_modules(engine.daemon.__path__):
        importlib.import_module(f"engine.daemon.{m.name}")
    return set(COMMANDS) | {"qmp_capabilities"}


def skeleton(img: dict) -> dict:
    out = {k: v for k, v in img.items() if k not in ("actual-size", "format-specific", "backing-image")}
    out["keys"] = sorted(img)
    if "backing-image" in img:
        out["backing-image"] = skeleton(img["backing-image"])
    return out


def test_queries_on_reference_chain(qsd, tmp_path):
    make_chain(tmp_path)
    d = qsd(*chain_blockdevs(), workers=1)
    sector = lambda n: -(-os.path.getsize(tmp_path / f"{n}.qcow2") // 512) * 512
    for flat in (False, True):
        got = d.ok("query-named-block-nodes", flat=flat)
        assert [(n["node-name"], n["drv"], n["ro"], n.get("backing_file"),
                 n["backing_file_depth"], n["file"]) for n in got] == \
            [(a, b, c, bf, 0 if flat else depth, f) for a, b, c, bf, depth, f in QSD_CHAIN]
        for n in got:
            assert sorted(n) == sorted(QSD_NODE_KEYS + (["backing_file"] if n.get("backing_file") else []))
            assert n["cache"] == {"no-flush": False, "direct": False, "writeback": True}
            assert n["detect_zeroes"] == "off" and n["encrypted"] is False
            assert all(n[k] == 0 for k in ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr",
                                           "write_threshold"))
            if n["drv"] == "file":
                assert skeleton(n["image"]) == {"keys": FILE_IMAGE_KEYS, "filename": n["file"], "format": "file",
                                                "dirty-flag": False, "virtual-size": sector(n["node-name"][:-5])}
            else:
                assert n["image"]["format-specific"] == QSD_FORMAT_SPECIFIC
        top = skeleton(got[0]["image"])
        if flat:
            want = {k: v for k, v in QSD_TOP_IMAGE.items() if k != "backing-image"}
            want["keys"] = [k for k in BACKED_KEYS if k != "backing-image"]
            assert top == want
        else:
            assert top == QSD_TOP_IMAGE
            assert skeleton(got[2]["image"]) == QSD_TOP_IMAGE["backing-image"]

    # query-blockstats: no BlockBackends in a storage daemon; query-nodes lists every node oldest first,
    # format nodes with their file child as "parent", never "backing" (that is BlockBackend-level only)
    assert d.ok("query-blockstats") == []
    assert d.ok("query-blockstats", **{"query-nodes": False}) == []
    stats = d.ok("query-blockstats", **{"query-nodes": True})
    assert [(s["node-name"], s.get("parent", {}).get("node-name")) for s in stats] == [
        ("base-file", None), ("base", "base-file"), ("mid-file", None), ("mid", "mid-file"),
        ("top-file", None), ("top", "top-file")]
    for s in stats:
        assert sorted(s["stats"]) == STATS_KEYS and s["stats"]["timed_stats"] == []
        if s["node-name"].endswith("-file"):
            assert sorted(s) == ["driver-specific", "node-name", "stats"]
            assert s["driver-specific"] == {"discard-bytes-ok": 0, "discard-nb-ok": 0, "driver": "file",
                                            "discard-nb-failed": 0}
        else:
            assert sorted(s) == ["node-name", "parent", "stats"]
            assert sorted(s["parent"]) == ["driver-specific", "node-name", "stats"]

    ver = d.ok("query-version")
    assert sorted(ver) == ["package", "qemu"] and ver["qemu"] == {"micro": 22, "minor": 2, "major": 7}
    assert isinstance(ver["package"], str)
    cmds = d.ok("query-commands")
    got_names = [c["name"] for c in cmds]
    assert all(sorted(c) == ["name"] for c in cmds)
    assert implemented_commands() == set(got_names) and len(got_names) == len(set(got_names))
    for name in ("blockdev-add", "blockdev-del", "query-named-block-nodes", "query-blockstats", "object-add",
                 "object-del", "qom-get", "qom-set", "query-version", "query-commands", "quit"):
        assert name in got_names
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------------
# 5. throttle-group objects
# ---------------------------------------------------------------------------------------------------
LIMIT_KEYS = sorted(f"{kind}-{dir_}{suffix}" for kind in ("iops", "bps") for dir_ in ("total", "read", "write")
                    for suffix in ("", "-max", "-max-length")) + ["iops-size"]


def test_throttle_group_objects(qsd, tmp_path):
    d = qsd("--object", "throttle-group,id=tg0,limits.bps-total=1000,limits.iops-read=7", workers=1)
    lim = d.ok("qom-get", path="tg0", property="limits")
    assert sorted(lim) == sorted(LIMIT_KEYS) and len(lim) == 19
    assert lim == {**{k: 1 if k.endswith("-max-length") else 0 for k in LIMIT_KEYS},
                   "bps-total": 1000, "iops-read": 7}
    bad = [
        ({"bps-total": 100, "bps-read": 10},
         "bps/iops/max total values and read/write values cannot be used at the same time"),
        ({"bps-total": -1}, "bps/iops/max values must be within [0, 1000000000000000]"),
        ({"iops-total": 1000000000000001}, "bps/iops/max values must be within [0, 1000000000000000]"),
        ({"bps-total": 100, "bps-total-max": 50}, "bps_max/iops_max cannot be lower than bps/iops"),
        ({"bps-total-max": 50}, "bps_max/iops_max require corresponding bps/iops values"),
        ({"bps-total": 100, "bps-total-max-length": 5}, "burst length set without burst rate"),
        ({"bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 0}, "the burst length cannot be 0"),
        ({"iops-size": 4096}, "iops size requires an iops value to be set"),
        ({"bogus": 1}, "Parameter 'limits.bogus' is unexpected"),
    ]
    got = [d.err("object-add", **{"qom-type": "throttle-group", "id": "tg1", "limits": lim_})
           for lim_, _ in bad]
    assert got == [("GenericError", t) for _, t in bad]
    assert d.err("object-add", **{"qom-type": "throttle-group", "id": "tg0"}) == \
        ("GenericError", "attempt to add duplicate property 'tg0' to object (type 'container')")
    for oid in ("1bad", "", "a#b"):
        assert d.err("object-add", **{"qom-type": "throttle-group", "id": oid}) == \
            ("GenericError", "Parameter 'id' expects an identifier")
    assert d.err("object-add", **{"qom-type": "bogus", "id": "x1"}) == \
        ("GenericError", "Parameter 'qom-type' does not accept value 'bogus'")
    d.ok("object-add", **{"qom-type": "throttle-group", "id": "a.b-c_d"})

    # qom-set merges: absent keys keep their values; the merged result is validated
    d.ok("qom-set", path="tg0", property="limits", value={"iops-read": 5, "bps-total-max": 3000})
    merged = {**lim, "iops-read": 5, "bps-total-max": 3000}
    assert d.ok("qom-get", path="tg0", property="limits") == merged
    assert d.err("qom-set", path="tg0", property="limits", value={"bps-read": 5}) == \
        ("GenericError", "bps/iops/max total values and read/write values cannot be used at the same time")
    d.ok("qom-set", path="tg0", property="limits", value={})
    assert d.ok("qom-get", path="tg0", property="limits") == merged
    assert d.err("qom-get", path="nope", property="limits") == ("DeviceNotFound", "Device 'nope' not found")
    assert d.err("qom-set", path="nope", property="limits", value={}) == ("DeviceNotFound", "Device 'nope' not found")
    assert d.err("qom-get", path="tg0", property="nope") == \
        ("GenericError", "Property 'throttle-group.nope' not found")
    assert d.err("qom-set", path="tg0", property="nope", value=1) == \
        ("GenericError", "Property 'throttle-group.nope' not found")

    # a group in use by a throttle node cannot be deleted; once the node is gone it can
    d.ok("blockdev-add", **{"driver": "throttle", "node-name": "th", "throttle-group": "tg0",
                            "file": {"driver": "null-co"}})
    assert d.err("object-del", id="tg0") == ("GenericError", "object 'tg0' is in use, can not be deleted")
    assert d.err("object-del", id="nope") == ("GenericError", "object 'nope' not found")
    d.ok("blockdev-del", **{"node-name": "th"})
    assert d.ok("query-named-block-nodes") == []
    d.ok("object-del", id="tg0")
    assert d.err("qom-get", path="tg0", property="limits") == ("DeviceNotFound", "Device 'tg0' not found")
    assert d.err("blockdev-add", **{"driver": "throttle", "node-name": "th", "throttle-group": "tg0",
                                    "file": {"driver": "null-co"}}) == \
        ("GenericError", "Throttle group 'tg0' does not exist")
    d.ok("object-add", **{"qom-type": "throttle-group", "id": "tg0"})  # the id is free again
    assert d.stop() == 0


# ---------------------------------------------------------------------------------------------------
# 6./7. the process: start-up failures, pidfile, --daemonize, SIGTERM
# ---------------------------------------------------------------------------------------------------
def daemon_argv(sock, *args: str) -> list[str]:
    return [sys.executable, "-m", "engine", "daemon", "--workers", "1",
            "--chardev", f"socket,id=mon0,path={sock},server=on,wait=off", "--monitor", "chardev=mon0", *args]


ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_startup_failure_pidfile_and_sigterm(qsd, tmp_path):
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "qsd.pid"
    # a bad --blockdev after the monitor: exit 1, one stderr line, nothing left behind
    # (qsd 7.2 itself leaves the monitor socket behind; parablock cleans up)
    for bad, text in (("driver=file,node-name=f,filename=missing.raw",
                       "Could not open 'missing.raw': No such file or directory"),
                      ("driver=null-co,node-name=1x", "Invalid node-name: '1x'")):
        p = subprocess.run(daemon_argv(sock, "--pidfile", str(pidfile), "--blockdev", bad), check=False,
                           cwd=tmp_path,
                           env=ENV, capture_output=True, text=True, timeout=60)
        assert p.returncode == 1, p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].endswith(text), p.stderr
        assert p.stdout == ""
        assert not sock.exists() and not pidfile.exists()

    # --pidfile is written while running (holding the daemon's pid) and removed after quit
    d = qsd("--pidfile", str(pidfile), workers=1)
    assert int(pidfile.read_text()) == d.proc.pid
    assert d.stop() == 0
    assert not pidfile.exists()

    # SIGTERM: exit 0, images flushed and closed, socket and pidfile removed
    make_chain(tmp_path)
    d = qsd("--pidfile", str(pidfile), *chain_blockdevs(), workers=1)
    assert len(d.ok("query-named-block-nodes")) == 6
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(timeout=30) == 0
    assert not d.sock.exists() and not pidfile.exists()
    for n in ("top", "mid", "base"):
        assert_qemu_clean(tmp_path / f"{n}.qcow2")


def run_to_files(argv: list[str], cwd) -> tuple[int, str, str]:
    """Run the (daemonizing) parent with stdout/stderr in files, not pipes: a daemon that keeps a pipe
    open would make ``capture_output`` wait for it (see test_daemonize_detaches_stdio)."""
    out, err = cwd / "parent.out", cwd / "parent.err"
    with open(out, "w") as o, open(err, "w") as e:
        try:
            rc = subprocess.run(argv, check=False, cwd=cwd, env=ENV, stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                                timeout=DAEMONIZE_TIMEOUT).returncode
        except subprocess.TimeoutExpired:
            pidfile = cwd / "qsd.pid"
            if pidfile.exists():  # the daemon started but the parent never returned: stop the daemon
                quit_daemon(cwd / "qmp.sock", int(pidfile.read_text()))
            pytest.fail(f"the --daemonize parent did not return within {DAEMONIZE_TIMEOUT}s")
    return rc, out.read_text(), err.read_text()


def quit_daemon(sock, pid: int) -> None:
    """``quit`` a daemon that is not our child, poll its pid until it is gone, and check that none of
    its processes (workers, fork server) outlives it; whatever is left is killed."""
    proc = psutil.Process(pid)
    kids = proc.children(recursive=True)
    try:
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        assert qmp.cmd_raw("quit") == {"return": {}}
        try:
            qmp.close()
        except EOFError:  # the daemon hung up after quit, as qemu-storage-daemon does
            pass
        try:
            proc.wait(timeout=30)
        except psutil.TimeoutExpired:
            raise AssertionError(f"daemon {pid} did not exit after quit") from None
        _, alive = psutil.wait_procs(kids, timeout=10)
        assert not alive, f"daemon left processes behind: {alive}"
    finally:
        for p in (proc, *kids):
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    p.kill()
            except psutil.Error:
                pass


DAEMONIZE_TIMEOUT = 5  # the daemon is up in well under a second


def test_daemonize(tmp_path):
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "qsd.pid"
    rc, out, err = run_to_files(daemon_argv(sock, "--daemonize", "--pidfile", str(pidfile),
                                            "--blockdev", "driver=null-co,node-name=n0"), tmp_path)
    assert (rc, out, err) == (0, "", "")
    # it is serving already when the parent returns, in its own session
    assert sock.exists() and pidfile.exists()
    pid = int(pidfile.read_text())
    try:
        assert os.getsid(pid) == pid
        qmp = QEMUMonitorProtocol(str(sock))
        qmp.connect(negotiate=True)
        assert [n["node-name"] for n in qmp.cmd_raw("query-named-block-nodes")["return"]] == ["n0"]
        qmp.close()
    finally:
        quit_daemon(sock, pid)
    assert not sock.exists() and not pidfile.exists()
    # start-up failure with --daemonize: the parent reports it on one line and exits 1
    rc, out, err = run_to_files(daemon_argv(sock, "--daemonize", "--pidfile", str(pidfile), "--blockdev",
                                            "driver=file,node-name=f,filename=missing.raw"), tmp_path)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.endswith("Could not open 'missing.raw': No such file or directory\n")
    assert not sock.exists() and not pidfile.exists()


def test_daemonize_detaches_stdio(tmp_path):
    sock, pidfile = tmp_path / "qmp.sock", tmp_path / "qsd.pid"
    rc, _, _ = run_to_files(daemon_argv(sock, "--daemonize", "--pidfile", str(pidfile)), tmp_path)
    assert rc == 0
    pid = int(pidfile.read_text())
    try:
        held = open_paths(pid)
    finally:
        quit_daemon(sock, pid)
    assert not {str(tmp_path / "parent.out"), str(tmp_path / "parent.err")} & held
