"""``parablock --workers N <command>``: the qemu-img commands run on the worker pool, give the same
answers as in-process, and leave no process behind (the autouse fixture checks)."""
from __future__ import annotations

import json

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img


@needs_qemu
def test_commands_on_the_pool(tmp_path, capsys):
    img = str(tmp_path / "a.qcow2")
    assert main(["--workers", "2", "create", "-q", "-f", "qcow2", img, "8M"]) == 0
    assert main(["--workers", "2", "io", "-c", "write -P 7 0 3M", "-c", "write -z 1M 64k",
                 "-c", "read -P 7 0 1M", "-c", "read -P 0 1M 64k", img]) == 0
    capsys.readouterr()
    assert main(["--workers", "2", "map", "--output=json", img]) == 0
    pool_map = capsys.readouterr().out
    assert main(["map", "--output=json", img]) == 0
    assert capsys.readouterr().out == pool_map
    assert json.loads(pool_map) == json.loads(qemu_img("map", "--output=json", img).stdout)
    assert main(["--workers", "2", "check", img]) == 0
    assert main(["--workers", "1", "compare", "-f", "qcow2", "-F", "qcow2", img, img]) == 0
    assert qemu_img("check", img).returncode == 0


def test_bad_worker_count(capsys):
    assert main(["--workers", "0", "info", "x"]) == 1
    assert "Invalid value for '--workers'" in capsys.readouterr().err


@needs_qemu
def test_convert_more_coroutines_than_slots(tmp_path):
    """``-m 16`` with one worker (8 slots): the converter keeps no more windows in flight than it has slots
    (it used to wait forever for a ninth slot), and still leaves one for the fallback path."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(96 << 20)
        for i in range(24):  # data in every 4 MiB window
            f.seek(i * (4 << 20) + 4096 * (i % 5))
            f.write(bytes([i + 1]) * 70000)
    for fmt in ("raw", "qcow2"):
        out = tmp_path / f"out.{fmt}"
        assert main(["convert", "--workers", "1", "-m", "16", "-f", "raw", "-O", fmt, str(src), str(out)]) == 0
        assert qemu_img("compare", "-f", "raw", "-F", fmt, str(src), str(out)).returncode == 0
    # -n onto a compressed qcow2 target: every cluster takes the fallback path, whose large writes lease
    # a slot of their own
    src2 = tmp_path / "src2.raw"
    src2.write_bytes(bytes([9]) * (40 << 20))
    out2 = tmp_path / "out2.qcow2"
    assert main(["convert", "-c", "-f", "raw", "-O", "qcow2", str(src), str(out2)]) == 0
    assert main(["convert", "--workers", "1", "-m", "16", "-n", "-f", "raw", "-O", "qcow2", str(src2),
                 str(out2)]) == 0
    expected = tmp_path / "expected.raw"
    with open(src, "rb") as f:
        f.seek(40 << 20)
        expected.write_bytes(src2.read_bytes() + f.read())
    assert qemu_img("check", str(out2)).returncode == 0
    assert qemu_img("compare", "-f", "raw", "-F", "qcow2", str(expected), str(out2)).returncode == 0
