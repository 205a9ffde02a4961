"""The same manifest on a Dask ``LocalCluster`` on loopback (``parablock batch --scheduler``): every good
item exact, the broken one reported, a re-run skipping what is done, items placed on the host named."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.batch.test_batch import FORMATS, _check_good_items
from tests.util import ROOT, needs_qemu, parablock

distributed = pytest.importorskip("distributed")
pytestmark = needs_qemu


_CLUSTER = """
import sys
from distributed import LocalCluster
with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, host="127.0.0.1",
                  dashboard_address=None, silence_logs=40) as c:
    print(c.scheduler_address, flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


class _Cluster:
    def __init__(self, address: str) -> None:
        self.scheduler_address = address


@pytest.fixture
def cluster():
    """A LocalCluster on loopback, in a process of its own: its workers (and the helper processes
    multiprocessing starts for them) are gone when that process ends, not left in the test process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CLUSTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://"), "the LocalCluster did not start"
        yield _Cluster(address)
    finally:
        proc.stdin.close()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_batch_on_local_cluster(estate, cluster):
    d, _imgs, manifest = estate
    doc = json.loads(manifest.read_text())
    for it in doc["item"]:
        if it["name"] in ("web", "db"):
            it["host"] = "127.0.0.1"  # where the files are
    doc["item"].append({"name": "elsewhere", "source": "src/plain.img", "source_format": "raw",
                        "target": "out/elsewhere.qcow2", "host": "192.0.2.1"})
    manifest.write_text(json.dumps(doc))
    p = parablock("batch", str(manifest), "--scheduler", cluster.scheduler_address, "--verify", "-p",
                  "--workers", "1", check=False, timeout=300)
    assert p.returncode == 1, p.stderr
    rep = json.loads(p.stdout)
    assert rep["where"] == cluster.scheduler_address
    _check_good_items(d, rep)
    by = {i["name"]: i for i in rep["items"]}
    assert all(by[n]["status"] == "done" and by[n]["verified"] for n in FORMATS), rep
    assert by["broken"]["status"] == "failed" and "broken.qcow2" in by["broken"]["error"]
    assert by["elsewhere"]["status"] == "failed" and "no Dask worker on host '192.0.2.1'" in by["elsewhere"]["error"]
    assert not (d / "out" / "elsewhere.qcow2").exists()
    assert "batch: 12/12 items" in p.stderr and "Traceback" not in p.stderr

    again = parablock("batch", str(manifest), "--scheduler", cluster.scheduler_address, "--verify",
                      check=False, timeout=300)
    rep2 = json.loads(again.stdout)
    by2 = {i["name"]: i for i in rep2["items"]}
    assert all(by2[n]["status"] == "skipped" for n in FORMATS), rep2
    assert by2["broken"]["status"] == "failed"
    # the state is the same file a local run uses: a local re-run skips too
    local = json.loads(parablock("batch", str(manifest), check=False, timeout=300).stdout)
    assert all(i["status"] == "skipped" for i in local["items"] if i["name"] in FORMATS)


def test_unreachable_scheduler_is_a_clear_error(estate):
    _d, _imgs, manifest = estate
    p = parablock("batch", str(manifest), "--scheduler", "tcp://127.0.0.1:9", check=False, timeout=120)
    assert p.returncode == 1
    assert "Could not connect to the Dask scheduler at tcp://127.0.0.1:9" in p.stderr
    assert "Traceback" not in p.stderr
