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
