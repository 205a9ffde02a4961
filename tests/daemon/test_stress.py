"""``parablock stress``: the verifying model (pure), the runner in process on qcow2 (with a backing
file) and raw, against ``parablock daemon``'s NBD export, while a mirror and a backup job run on the
exported node (the job's target is then checked with qemu-img compare), and a deliberately corrupted
byte that the verifier must catch (exit 1, one line)."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from engine.stress import DiskModel, Mismatch, RangeSet, StressError, parse_mix
from tests.daemon.conftest import MiB, make_chain
from tests.daemon.test_nbd import start, uri
from tests.util import ROOT, assert_qemu_clean, needs_qemu, parablock, qemu_compare, qemu_img, qemu_io


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------
def test_rangeset_matches_a_set_of_ints():
    rnd = random.Random(5)
    rs, ref = RangeSet(), set()
    for _ in range(2000):
        a = rnd.randrange(200)
        b = a + rnd.randrange(1, 30)
        if rnd.random() < 0.5:
            rs.add(a, b)
            ref |= set(range(a, b))
        else:
            rs.remove(a, b)
            ref -= set(range(a, b))
        q = rnd.randrange(220)
        got = {i for s, e in rs.overlapping(q, q + 25) for i in range(s, e)}
        assert got == {i for i in ref if q <= i < q + 25}
        assert all(e < s2 for e, s2 in zip(rs.ends, rs.starts[1:]))  # disjoint, not adjacent
    assert rs.total() == len(ref)


def test_model_semantics():
    m = DiskModel(bytes(100))
    # two overlapping writes in flight together: their intersection is unknown, the rest is known
    w1 = m.begin_write("write", 0, 50)
    w2 = m.begin_write("write", 40, 20)
    m.end_write(w2, b"\x02" * 20)
    m.end_write(w1, b"\x01" * 50)
    assert m.unknown.overlapping(0, 100) == [(40, 50)]
    assert m.check(0, b"\x01" * 40 + b"\x77" * 10 + b"\x02" * 10, "t") == 50
    # a later write settles the racy range
    w3 = m.begin_write("write", 30, 30)
    m.end_write(w3, b"\x03" * 30)
    assert m.unknown.total() == 0
    # a read overlapping a write in flight skips exactly the bytes that write touches
    r = m.begin_read(0, 100)
    w4 = m.begin_write("zero", 90, 10)
    m.end_write(w4, None)
    assert m.end_read(r, b"\x01" * 30 + b"\x03" * 30 + bytes(30) + b"\x55" * 10, "t") == 90
    # discard: unknown until written again
    d = m.begin_write("discard", 0, 10)
    m.end_write(d, None)
    assert m.check(0, b"\x99" * 10 + b"\x01" * 20, "t") == 20
    with pytest.raises(Mismatch) as exc:
        m.check(0, b"\x99" * 10 + b"\x01" * 19 + b"\x00", "read x")
    assert (exc.value.offset, exc.value.expected, exc.value.got) == (29, 1, 0)
    assert "mismatch at offset 29 (0x1d): expected 0x01, got 0x00" in exc.value.line()


def test_parse_mix():
    assert parse_mix("read=1,write=2")["write"] == 2
    for bad in ("read", "bogus=1", "read=x", "read=0", "read=-1"):
        with pytest.raises(StressError):
            parse_mix(bad)


# ---------------------------------------------------------------------------------------------------
# in process
# ---------------------------------------------------------------------------------------------------
def _json(p) -> dict:
    return json.loads(p.stdout)


def _assert_clean_run(rep: dict) -> None:
    assert rep["mismatch"] is None
    assert rep["total"]["ops"] > 0
    assert rep["verified_in_run"] > 0 and rep["verified_final"] > 0
    for k in ("read", "write", "zero", "discard"):
        assert rep["operations"][k]["ops"] > 0, k
        assert set(rep["operations"][k]["latency_us"]) == {"p50", "p90", "p99", "max"}


@needs_qemu
def test_in_process_qcow2_with_backing(tmp_path):
    paths = make_chain(tmp_path)
    p = parablock("stress", "-c", "1500", "-j", "8", "--seed", "3", "--size-max", "96k", "--output", "json",
                  str(paths["top"]))
    _assert_clean_run(_json(p))
    assert_qemu_clean(paths["top"])
    assert_qemu_clean(paths["base"])


@needs_qemu
def test_in_process_raw_sequential_aligned_and_human_output(tmp_path):
    img = tmp_path / "r.raw"
    qemu_img("create", "-q", "-f", "raw", str(img), "4M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 0 2M", str(img))
    p = parablock("stress", "-f", "raw", "-c", "800", "-t", "20", "-j", "6", "--pattern", "sequential",
                  "--align", "4k", "--size-min", "4k", "--size-max", "64k", "--mix",
                  "read=40,write=30,zero=10,discard=10,flush=10", str(img))
    out = p.stdout
    assert "no mismatch" in out and "IOPS" in out and "MB/s" in out and "p99" in out
    assert out.splitlines()[-2].startswith("verified ")


def test_usage_errors(tmp_path):
    p = parablock("stress", check=False)
    assert p.returncode == 1 and p.stderr == "parablock: stress needs exactly one of IMAGE or --nbd URI\n"
    p = parablock("stress", "--nbd", f"nbd+unix:///x?socket={tmp_path}/none.sock", check=False)
    assert p.returncode == 1 and p.stderr.startswith("parablock: stress: ") and "Traceback" not in p.stderr
    assert len(p.stderr.splitlines()) == 1


@needs_qemu
def test_corruption_is_detected_in_process(tmp_path):
    img = tmp_path / "c.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(img), "2M")
    p = parablock("stress", "-c", "300", "--inject-corruption", str(img), check=False)
    assert p.returncode == 1
    assert p.stderr.startswith("parablock: stress: mismatch at offset ")
    assert "expected 0x" in p.stderr and ", got 0x" in p.stderr and len(p.stderr.splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# over NBD, against the daemon, alone and while jobs run
# ---------------------------------------------------------------------------------------------------
def _stress_proc(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine", "stress", "--output", "json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"stress rc={proc.returncode}: {err}\n{out}"
    rep = json.loads(out)
    _assert_clean_run(rep)
    return rep


def _src_tgt(tmp_path, size: str = "8M"):
    src, tgt = tmp_path / "src.qcow2", tmp_path / "tgt.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), size)
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), size)
    qemu_io("-c", "write -P 0x31 0 3M", str(src))
    return src, tgt


def _daemon(qsd, tmp_path, src, tgt):
    return start(qsd, tmp_path,
                 "--blockdev", f"driver=qcow2,node-name=src,file.driver=file,file.filename={src}",
                 "--blockdev", f"driver=qcow2,node-name=tgt,file.driver=file,file.filename={tgt}",
                 "--export", "type=nbd,id=e0,node-name=src,writable=on")


@needs_qemu
def test_nbd_stress_and_corruption(qsd, tmp_path):
    src, tgt = _src_tgt(tmp_path)
    d, sock = _daemon(qsd, tmp_path, src, tgt)
    u = uri(sock, "src")
    rep = _json(parablock("stress", "--nbd", u, "-c", "1500", "-j", "12", "--connections", "3",
                          "--size-min", "1", "--size-max", "80k", "--seed", "11", "--output", "json"))
    _assert_clean_run(rep)
    p = parablock("stress", "--nbd", u, "-c", "200", "-j", "4", "--pattern", "sequential",
                  "--inject-corruption", check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.startswith("parablock: stress: mismatch at offset ") and len(p.stderr.splitlines()) == 1
    assert d.stop() == 0
    assert_qemu_clean(src)


@needs_qemu
def test_nbd_stress_during_mirror(qsd, tmp_path):
    src, tgt = _src_tgt(tmp_path)
    d, sock = _daemon(qsd, tmp_path, src, tgt)
    d.ok("blockdev-mirror", **{"job-id": "m"}, device="src", target="tgt", sync="full")
    proc = _stress_proc("--nbd", uri(sock, "src"), "-t", "2.5", "-j", "8", "--seed", "21")
    d.wait_event("BLOCK_JOB_READY", device="m")
    assert d.ok("query-jobs")[0]["status"] in ("running", "ready")  # the job still runs under the load
    rep = _finish(proc)
    assert rep["operations"]["write"]["ops"] > 50
    d.ok("job-complete", id="m")
    d.wait_job_gone("m")
    assert d.stop() == 0
    cmp = qemu_compare(src, tgt, "qcow2", "qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert_qemu_clean(tgt)


@needs_qemu
def test_nbd_stress_during_backup(qsd, tmp_path):
    src, tgt = _src_tgt(tmp_path)
    before = tmp_path / "before.qcow2"
    shutil.copyfile(src, before)
    d, sock = _daemon(qsd, tmp_path, src, tgt)
    d.ok("blockdev-backup", **{"job-id": "b"}, device="src", target="tgt", sync="full", speed=MiB // 4)
    proc = _stress_proc("--nbd", uri(sock, "src"), "-t", "2", "-j", "8", "--seed", "31")
    rep = _finish(proc)
    assert rep["operations"]["write"]["ops"] > 50
    assert d.ok("query-jobs")[0]["id"] == "b"  # the load ran while the backup did
    d.ok("block-job-set-speed", device="b", speed=0)
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="b")
    assert "error" not in done["data"], done
    assert d.stop() == 0
    cmp = qemu_compare(before, tgt, "qcow2", "qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert qemu_compare(before, src, "qcow2", "qcow2").returncode == 1  # the source did change
    assert_qemu_clean(tgt)
    assert_qemu_clean(src)


@needs_qemu
def test_nbd_stress_during_commit(qsd, tmp_path):
    """Verified load on the active layer while an intermediate commit copies mid into base: the load
    sees no mismatch, and base ends up holding exactly what mid held over base before the job."""
    from tests.daemon.conftest import chain_blockdevs, make_chain

    paths = make_chain(tmp_path, "8M")
    qemu_io("-c", "write -P 0x42 4M 2M", str(paths["mid"]))
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", str(paths["mid"]), str(expected))  # mid over base, before the job
    d, sock = start(qsd, tmp_path, *chain_blockdevs(), "--export", "type=nbd,id=e0,node-name=top,writable=on")
    d.ok("block-commit", **{"job-id": "c"}, device="top", **{"top-node": "mid", "base-node": "base"},
         speed=MiB // 2)
    proc = _stress_proc("--nbd", uri(sock, "top"), "-t", "2", "-j", "8", "--seed", "41")
    rep = _finish(proc)
    assert rep["operations"]["write"]["ops"] > 50
    assert d.ok("query-jobs")[0]["id"] == "c"  # the load ran while the commit did
    d.ok("block-job-set-speed", device="c", speed=0)
    done = d.wait_event("BLOCK_JOB_COMPLETED", device="c")
    assert "error" not in done["data"], done
    assert d.stop() == 0
    cmp = qemu_compare(expected, paths["base"], "raw", "qcow2")
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    for p in paths.values():
        assert_qemu_clean(p)


@needs_qemu
def test_nbd_stress_with_injected_faults_finishes_exact(qsd, tmp_path):
    """A stress run over an export whose image sits on blkdebug, with write and read errors injected
    (each once, after the baseline): the errors reach the client, are counted, and everything the run
    could know reads back exactly; the image stays valid."""
    import json as _json_mod

    src = tmp_path / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "8M")
    qemu_io("-c", "write -P 0x31 0 3M", str(src))
    spec = {"driver": "qcow2", "node-name": "src", "backing": None,
            "file": {"driver": "blkdebug", "image": {"driver": "file", "filename": str(src)},
                     "set-state": [{"event": "write_aio", "state": 1, "new_state": 2}],
                     "inject-error": [{"event": "write_aio", "state": 2, "errno": 5, "once": True},
                                      {"event": "read_aio", "state": 2, "errno": 5, "once": True,
                                       "iotype": "read"}]}}
    d, sock = start(qsd, tmp_path, "--blockdev", _json_mod.dumps(spec),
                    "--export", "type=nbd,id=e0,node-name=src,writable=on")
    p = parablock("stress", "--nbd", uri(sock, "src"), "-c", "800", "-j", "6", "--seed", "51",
                  "--tolerate-errors", "--output", "json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    rep = _json_mod.loads(p.stdout)
    assert sum(op.get("errors", 0) for op in rep["operations"].values()) >= 2
    _assert_clean_run(rep)
    assert d.stop() == 0
    assert_qemu_clean(src)
