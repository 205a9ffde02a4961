"""on-error policies (report, ignore, stop, enospc) of a commit job, with write errors injected into the
base image's driver (qmp-surface.md §5.1 scenario 11).  In process: the fault is a wrapper around the
driver's write that fails a chosen number of times with a chosen errno."""
from __future__ import annotations

import asyncio
import errno
import os

import pytest

from tests.daemon.conftest import MiB, make_chain
from tests.daemon.test_commit_stream import reads
from tests.daemon.test_mirror import _add_chain, _daemon
from tests.util import assert_qemu_clean, needs_qemu

pytestmark = needs_qemu


def inject_write_errors(driver, times: int, err: int) -> dict:
    state = {"left": times}
    orig = driver.write

    def write(offset: int, data: bytes) -> None:
        if state["left"] > 0:
            state["left"] -= 1
            raise OSError(err, os.strerror(err))
        orig(offset, data)

    driver.write = write
    return state


@pytest.mark.parametrize("policy,err,expect", [
    ("report", errno.EIO, "report"),
    ("ignore", errno.EIO, "ignore"),
    ("stop", errno.EIO, "stop"),
    ("enospc", errno.EIO, "report"),
    ("enospc", errno.ENOSPC, "stop"),
])
def test_commit_on_error(tmp_path, policy, err, expect):
    paths = make_chain(tmp_path)

    async def main() -> None:
        d, ev, pool = await _daemon(tmp_path, workers=0)
        try:
            await _add_chain(d, tmp_path)
            inject_write_errors(d.graph.nodes["base"].driver, 1, err)
            await d.execute("block-commit", {"job-id": "c", "device": "top", "top-node": "mid",
                                             "base-node": "base", "on-error": policy, "auto-dismiss": False})
            e = await ev.wait("BLOCK_JOB_ERROR", device="c")
            assert e["data"] == {"device": "c", "operation": "write", "action": expect}
            if expect == "stop":
                await ev.wait("JOB_STATUS_CHANGE", id="c", status="paused")
                info = (await d.execute("query-block-jobs", {}))[0]
                assert info["paused"] is True
                assert info["io-status"] == ("nospace" if err == errno.ENOSPC else "failed")
                await d.execute("job-resume", {"id": "c"})
            done = await ev.wait("JOB_STATUS_CHANGE", id="c", status="concluded")
            assert done
            completed = [x for x in ev.items if x["event"] == "BLOCK_JOB_COMPLETED"][0]["data"]
            info = (await d.execute("query-jobs", {}))[0]
            if expect == "report":
                assert completed["error"] == os.strerror(err)
                assert info["error"] == os.strerror(err)
            else:
                assert "error" not in completed and "error" not in info
                assert completed["offset"] == completed["len"] == 4 * MiB
                blk = (await d.execute("query-block-jobs", {}))[0]
                assert blk["io-status"] == "ok"
        finally:
            await d.shutdown()
            if pool:
                pool.close()

    asyncio.run(main())
    for p in paths.values():
        assert_qemu_clean(p)
    if expect != "report":  # the failed chunk was retried: base holds mid's data
        reads(str(paths["base"]), (0xaa, 0, MiB), (0xbb, MiB, MiB))
