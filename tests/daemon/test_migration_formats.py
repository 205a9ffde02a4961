"""The formats people migrate from, opened in the daemon with ``blockdev-add`` and read by qemu-img over
the NBD export: what qemu-img and qemu-io wrote comes back byte for byte; writable exports of them take
qemu-io's writes, which qemu-img then reads from the image file itself."""
from __future__ import annotations

import pytest

from tests.daemon.test_nbd import start, uri
from tests.util import needs_qemu, qemu_img, qemu_io

pytestmark = needs_qemu

CASES = [
    ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"]), ("vpc", []), ("vpc", ["-o", "subformat=fixed"]),
    ("vhdx", []), ("vdi", []), ("vdi", ["-o", "static=on"]), ("qed", []),
]


def _make(tmp_path, fmt, opts):
    img = tmp_path / f"disk.{fmt}"
    if fmt == "vmdk" and opts:  # streamOptimized is append-only: write it by conversion
        raw = tmp_path / "src.raw"
        qemu_img("create", "-q", "-f", "raw", str(raw), "8M")
        qemu_io("-f", "raw", "-c", "write -P 0x5a 64k 1M", "-c", "write -P 0x6b 7M 4k", str(raw))
        qemu_img("convert", "-f", "raw", "-O", "vmdk", *opts, str(raw), str(img))
    else:
        qemu_img("create", "-q", "-f", fmt, *opts, str(img), "8M")
        qemu_io("-f", fmt, "-c", "write -P 0x5a 64k 1M", "-c", "write -P 0x6b 7M 4k", str(img))
    return img


@pytest.mark.parametrize("fmt,opts", CASES, ids=[f"{f}{'-' + o[1] if o else ''}" for f, o in CASES])
def test_blockdev_add_reads_over_nbd(qsd, tmp_path, fmt, opts):
    img = _make(tmp_path, fmt, opts)
    d, sock = start(qsd, tmp_path, "--blockdev",
                    f"driver={fmt},node-name=n0,file.driver=file,file.filename={img}",
                    "--export", "type=nbd,id=e0,node-name=n0")
    nodes = {n["node-name"]: n for n in d.ok("query-named-block-nodes")}
    assert nodes["n0"]["drv"] == fmt
    assert qemu_img("compare", "-U", "-f", "raw", "-F", fmt, uri(sock, "n0"), str(img)).returncode == 0
    d.stop()


@pytest.mark.parametrize("fmt,opts", [c for c in CASES if "subformat=streamOptimized" not in c[1]],
                         ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_writable_export_of_each_format(qsd, tmp_path, fmt, opts):
    img = _make(tmp_path, fmt, opts)
    d, sock = start(qsd, tmp_path, "--blockdev",
                    f"driver={fmt},node-name=n0,file.driver=file,file.filename={img}",
                    "--export", "type=nbd,id=e0,node-name=n0,writable=on")
    qemu_io("-f", "raw", "-c", "write -P 0x7c 2M 1M", "-c", "write -P 0x7d 5M 4k", "-c", "write -z 64k 64k",
            uri(sock, "n0"))
    d.stop()
    qemu_io("-f", fmt, "-c", "read -P 0x7c 2M 1M", "-c", "read -P 0x7d 5M 4k", "-c", "read -P 0 64k 64k",
            "-c", "read -P 0x5a 128k 960k", "-c", "read -P 0x6b 7M 4k", str(img))
    if fmt in ("vmdk", "vhdx", "vdi", "qed"):
        assert qemu_img("check", "-f", fmt, str(img)).returncode == 0
