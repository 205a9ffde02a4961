"""``parablock batch`` on one machine: mixed conversions and backups, a broken source, re-runs that skip
what is done, --verify digests, incremental backups from a persistent bitmap, --dry-run, bad manifests."""
from __future__ import annotations

import json

import pytest

from tests.util import needs_qemu, parablock, qemu_compare, qemu_img, qemu_io, qemu_json, assert_qemu_clean

pytestmark = needs_qemu

FORMATS = {"web": ("qcow2", "qcow2"), "db": ("vdi", "qcow2"), "win": ("vpc", "qcow2"),
           "plain": ("raw", "raw"), "vm-full": ("qcow2", "qcow2"), "vm-inc": ("qcow2", "qcow2"),
           "esx": ("vmdk", "qcow2"), "hv": ("vhdx", "vmdk"), "old": ("qed", "vhdx")}


def _report(p) -> dict:
    return json.loads(p.stdout)


def _check_good_items(d, rep) -> None:
    by = {i["name"]: i for i in rep["items"]}
    for name, (sfmt, tfmt) in FORMATS.items():
        item = by[name]
        assert item["status"] in ("done", "skipped"), item
        assert qemu_compare(item["source"], item["target"], sfmt, tfmt).returncode == 0, name
        if tfmt == "qcow2":
            assert_qemu_clean(item["target"])
        elif tfmt != "raw":
            assert qemu_img("check", "-f", tfmt, item["target"]).returncode == 0, name
    assert not list((d / "out").glob(".*parablock-part")), "a partial file was left behind"


def test_batch_local_mixed_broken_and_rerun(estate):
    d, imgs, manifest = estate
    p = parablock("batch", str(manifest), "--verify", "--workers", "2", check=False, timeout=300)
    assert p.returncode == 1, p.stderr
    rep = _report(p)
    _check_good_items(d, rep)
    by = {i["name"]: i for i in rep["items"]}
    assert all(by[n]["status"] == "done" and by[n]["verified"] for n in FORMATS)
    assert by["broken"]["status"] == "failed"
    assert "broken.qcow2" in by["broken"]["error"]
    assert "broken: failed:" in p.stderr and "Traceback" not in p.stderr
    assert not (d / "out" / "broken.qcow2").exists()
    assert rep["summary"] == {**rep["summary"], "done": 9, "failed": 2, "skipped": 0, "total": 11}
    # the incremental backup ran after the full one it builds on, and holds only the dirty clusters
    top = [e for e in qemu_json("map", str(d / "out" / "vm-inc.qcow2")) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in top) == 128 * 1024 + 64 * 1024, top
    # the one built on the broken item's target was not run
    assert by["vm-inc-late"]["status"] == "failed"
    assert "comes from item broken, which failed" in by["vm-inc-late"]["error"]
    # the web item asked for compression: its target holds compressed clusters
    assert qemu_json("info", str(d / "out" / "web.qcow2"))["actual-size"] < 3 << 20
    # same digest for the same content, whatever the format
    assert by["db"]["digest"].startswith("sha256:") and by["db"]["digest"] != by["win"]["digest"]

    again = parablock("batch", str(manifest), "--verify", check=False, timeout=300)
    assert again.returncode == 1
    rep2 = _report(again)
    by2 = {i["name"]: i for i in rep2["items"]}
    assert all(by2[n]["status"] == "skipped" for n in FORMATS), rep2
    assert by2["broken"]["status"] == "failed"
    _check_good_items(d, rep2)

    # a source that changed is copied again; the others still skip
    qemu_io("-f", "vdi", "-c", "write -P 0x77 4M 1M", str(imgs["db"]))
    rep3 = _report(parablock("batch", str(manifest), check=False, timeout=300))
    by3 = {i["name"]: i for i in rep3["items"]}
    assert by3["db"]["status"] == "done" and by3["web"]["status"] == "skipped"
    assert qemu_compare(imgs["db"], d / "out" / "db.qcow2", "vdi", "qcow2").returncode == 0
    # a target someone modified is not trusted either
    qemu_io("-f", "qcow2", "-c", "write -P 0x55 0 64k", str(d / "out" / "web.qcow2"))
    rep4 = _report(parablock("batch", str(manifest), check=False, timeout=300))
    assert {i["name"]: i for i in rep4["items"]}["web"]["status"] == "done"
    assert qemu_compare(imgs["web"], d / "out" / "web.qcow2", "qcow2", "qcow2").returncode == 0


def test_verify_on_rerun_of_unverified_items(estate):
    d, _imgs, manifest = estate
    parablock("batch", str(manifest), check=False, timeout=300)
    rep = _report(parablock("batch", str(manifest), "--verify", check=False, timeout=300))
    by = {i["name"]: i for i in rep["items"]}
    for n in FORMATS:  # done before, not verified: verified now, not copied again
        assert by[n]["status"] == "skipped" and by[n]["verified"] and by[n]["digest"], by[n]


def test_incremental_backup_from_a_persistent_bitmap(tmp_path):
    src = tmp_path / "vm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "32M")
    qemu_io("-f", "qcow2", "-c", "write -P 0x11 0 16M", str(src))
    man = tmp_path / "m.toml"
    man.write_text('[[item]]\nname = "full"\nkind = "backup"\nsource = "vm.qcow2"\nsource_format = "qcow2"\n'
                   'target = "full.qcow2"\n')
    parablock("batch", str(man), "-q", timeout=300)
    # from now on the guest's writes are tracked; then it writes
    qemu_img("bitmap", "--add", str(src), "nightly")
    qemu_io("-f", "qcow2", "-c", "write -P 0x22 1M 64k", "-c", "write -P 0x33 20M 200k", str(src))
    man2 = tmp_path / "inc.toml"
    man2.write_text('[[item]]\nname = "inc1"\nkind = "backup"\nsync = "incremental"\nbitmap = "nightly"\n'
                    'bitmap_mode = "on-success"\nsource = "vm.qcow2"\nsource_format = "qcow2"\n'
                    'target = "inc1.qcow2"\nbacking = "full.qcow2"\nbacking_format = "qcow2"\nverify = true\n')
    rep = _report(parablock("batch", str(man2), timeout=300))
    assert rep["items"][0]["status"] == "done" and rep["items"][0]["verified"], rep
    inc = tmp_path / "inc1.qcow2"
    assert qemu_compare(src, inc, "qcow2", "qcow2").returncode == 0
    assert_qemu_clean(inc)
    info = qemu_json("info", str(inc))
    assert info["backing-filename"] == "full.qcow2" and info["backing-filename-format"] == "qcow2"
    # only the dirty clusters are in the incremental image
    top = [e for e in json.loads(qemu_img("map", "--output=json", str(inc)).stdout) if e["depth"] == 0
           and e["data"]]
    assert sum(e["length"] for e in top) == 64 * 1024 + 256 * 1024, top
    # bitmap_mode on-success cleared the bitmap: a second incremental copies nothing
    man3 = tmp_path / "inc2.toml"
    man3.write_text(man2.read_text().replace("inc1", "inc2").replace("full.qcow2", "inc1.qcow2"))
    parablock("batch", str(man3), "-q", timeout=300)
    top2 = [e for e in json.loads(qemu_img("map", "--output=json", str(tmp_path / "inc2.qcow2")).stdout)
            if e["depth"] == 0 and e["data"]]
    assert top2 == []
    assert qemu_compare(src, tmp_path / "inc2.qcow2", "qcow2", "qcow2").returncode == 0
    assert qemu_img("check", str(src)).returncode == 0


def test_dry_run_plans_with_measure_and_changes_nothing(estate):
    d, imgs, manifest = estate
    p = parablock("batch", str(manifest), "--dry-run", timeout=120)
    doc = json.loads(p.stdout)
    by = {e["name"]: e for e in doc["plan"]}
    want = qemu_json("measure", "-O", "qcow2", "-f", "vdi", str(imgs["db"]))
    assert by["db"]["measure"]["required"] == want["required"]
    assert by["db"]["measure"]["fully-allocated"] == want["fully-allocated"]
    want_win = qemu_json("measure", "-O", "qcow2", "-o", "cluster_size=4k", "-f", "vpc", str(imgs["win"]))
    assert by["win"]["measure"]["required"] == want_win["required"]
    assert by["plain"]["measure"]["required"] == 8 << 20
    assert by["broken"]["action"] == "fail" and by["broken"]["error"]
    assert by["vm-inc"]["sync"] == "incremental"
    assert all(by[n]["action"] == "run" for n in FORMATS)
    assert list((d / "out").iterdir()) == []
    assert not (d / "batch.json.state.json").exists()
    assert "db: run convert" in p.stderr


@pytest.mark.parametrize("text,msg", [
    ('[[item]]\nsource = "a"\n', "'target' (a path) is required"),
    ('[[item]]\nsource = "a"\ntarget = "b"\nformat = "qcow3"\n', "format must be one of"),
    ('[[item]]\nsource = "a"\ntarget = "b"\nkind = "backup"\nsync = "incremental"\n',
     "an incremental backup needs 'bitmap'"),
    ('[[item]]\nsource = "a"\ntarget = "b"\nformat = "raw"\ncompress = true\n', "compression needs format qcow2"),
    ('[[item]]\nsource = "a"\ntarget = "b"\n[[item]]\nsource = "c"\ntarget = "b"\n', "the name 'b' is used twice"),
    ('[[item]]\nsource = "a"\ntarget = "b"\nbogus = 1\n', "unknown key 'bogus'"),
    ("[[item]\n", "not valid TOML"),
    ('[[item]]\nsource = "a"\ntarget = "x/b"\nbacking = "c"\nbacking_format = "qcow2"\n'
     '[[item]]\nsource = "a"\ntarget = "x/c"\nbacking = "b"\nbacking_format = "qcow2"\n',
     "depends on itself"),
])
def test_bad_manifests(tmp_path, text, msg):
    man = tmp_path / "m.toml"
    man.write_text(text)
    p = parablock("batch", str(man), check=False)
    assert p.returncode == 1
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert p.stdout == ""
    assert sorted(x.name for x in tmp_path.iterdir()) == ["m.toml"]


def test_progress_display_and_report_file(estate):
    d, _imgs, manifest = estate
    p = parablock("batch", str(manifest), "-p", "--report", str(d / "report.json"), check=False, timeout=300)
    assert p.returncode == 1
    assert p.stdout == ""
    rep = json.loads((d / "report.json").read_text())
    assert rep["summary"]["done"] == 9
    # not a terminal: status lines and one line per finished item on stderr
    assert "batch: 11/11 items" in p.stderr
    for n in FORMATS:
        assert f"{n}: done" in p.stderr
    assert "broken: failed:" in p.stderr


def test_killed_batch_resumes(tmp_path):
    """kill -9 in the middle of a batch: the re-run skips what was finished and redoes the rest; no
    target is ever a partial copy under its final name."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.util import ROOT

    names = [f"d{i}" for i in range(4)]
    for i, n in enumerate(names):
        with open(tmp_path / f"{n}.raw", "wb") as f:
            f.truncate(8 << 20)
            f.seek(i << 20)
            f.write(bytes([0x40 + i]) * (3 << 20))
    man = tmp_path / "m.json"
    # 8 MiB/s and one item at a time: the batch takes ~4 s, long enough to be killed in the middle
    man.write_text(json.dumps({"defaults": {"rate": "8M", "source_format": "raw"},
                               "item": [{"name": n, "source": f"{n}.raw", "target": f"{n}.qcow2"} for n in names]}))
    proc = subprocess.Popen([sys.executable, "-m", "engine", "batch", str(man), "-j", "1", "-q"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    state = tmp_path / "m.json.state.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if state.exists() and len(json.loads(state.read_text())["items"]) >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = set(json.loads(state.read_text())["items"])
    assert finished and finished != set(names)
    for n in names:  # under its final name a target is complete or absent
        t = tmp_path / f"{n}.qcow2"
        if t.exists():
            assert n in finished or qemu_compare(tmp_path / f"{n}.raw", t, "raw", "qcow2").returncode == 0
    rep = _report(parablock("batch", str(man), timeout=300))
    by = {i["name"]: i["status"] for i in rep["items"]}
    assert {n for n, s in by.items() if s == "skipped"} == finished
    assert all(s in ("done", "skipped") for s in by.values())
    for n in names:
        assert qemu_compare(tmp_path / f"{n}.raw", tmp_path / f"{n}.qcow2", "raw", "qcow2").returncode == 0
    assert not list(tmp_path.glob(".*parablock-part"))
