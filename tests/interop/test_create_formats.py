"""``parablock create`` for the formats people migrate from: the same echo line as qemu-img 7.2 for the
same options, and an image qemu-img reads with the virtual size qemu-img would have given it."""
from __future__ import annotations

import json

import pytest

from engine.cli.main import main
from tests.util import needs_qemu, qemu_img, qemu_io, run

pytestmark = needs_qemu

CASES = [
    ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized,adapter_type=lsilogic"]),
    ("vmdk", ["-o", "adapter_type=ide,toolsversion=1,subformat=monolithicFlat"]),
    ("vmdk", ["-o", "zeroed_grain=off,toolsversion=2"]),
    ("vpc", []), ("vpc", ["-o", "subformat=fixed,force_size=on"]), ("vpc", ["-o", "force_size=off"]),
    ("vhdx", []), ("vhdx", ["-o", "block_size=1M,log_size=2M,subformat=fixed"]),
    ("vhdx", ["-o", "block_state_zero=off,subformat=dynamic"]),
    ("vdi", []), ("vdi", ["-o", "static=on"]),
    ("qed", []), ("qed", ["-o", "cluster_size=4k,table_size=2"]),
]


@pytest.mark.parametrize("fmt,opts", CASES, ids=[f"{f}-{'-'.join(o[1:]) or 'default'}" for f, o in CASES])
def test_create_echo_and_size_like_qemu_img(tmp_path, capsys, fmt, opts):
    theirs, ours = tmp_path / f"q.{fmt}", tmp_path / f"p.{fmt}"
    want = qemu_img("create", "-f", fmt, *opts, str(theirs), "8M").stdout
    rc = main(["create", "-f", fmt, *opts, str(ours), "8M"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.replace(str(ours), "X") == want.replace(str(theirs), "X")
    q = json.loads(qemu_img("info", "-f", fmt, "--output=json", str(theirs)).stdout)
    p = json.loads(qemu_img("info", "-f", fmt, "--output=json", str(ours)).stdout)
    assert p["virtual-size"] == q["virtual-size"]
    assert p.get("cluster-size") == q.get("cluster-size")
    if fmt in ("vmdk", "vhdx", "vdi", "qed"):
        assert qemu_img("check", "-f", fmt, str(ours)).returncode == 0


@pytest.mark.parametrize("fmt,opts", [("vpc", "subformat=fixed"), ("vdi", "static=on")])
def test_preallocated_outputs_stay_as_sparse_as_qemu_img(tmp_path, fmt, opts):
    src = tmp_path / "s.raw"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(10 << 20)
        f.write(b"\x5a" * (1 << 20))
    ours, theirs = tmp_path / f"p.{fmt}", tmp_path / f"q.{fmt}"
    assert main(["convert", "-O", fmt, "-o", opts, str(src), str(ours)]) == 0
    qemu_img("convert", "-O", fmt, "-o", opts, str(src), str(theirs))
    assert qemu_img("compare", "-f", fmt, "-F", fmt, str(ours), str(theirs)).returncode == 0
    assert ours.stat().st_blocks <= theirs.stat().st_blocks + 128  # within 64 KiB of qemu-img's
    assert ours.stat().st_blocks < 4 << 11  # not 64 MiB of written zeros


def test_vmdk_check_like_qemu_img(tmp_path, capsys):
    img = tmp_path / "c.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(img), "8M")
    qemu_io("-f", "vmdk", "-c", "write -P 1 0 64k", str(img))
    for args in ([], ["--output=json"], ["-r", "all"]):
        want = run(["qemu-img", "check", *args, str(img)], check=False)
        rc = main(["check", *args, str(img)])
        out, err = capsys.readouterr()
        assert rc == want.returncode and out == want.stdout, (args, out, err)
    with open(img, "r+b") as f:  # the grain now points past the end of the file
        f.truncate(64 << 10)
    want = run(["qemu-img", "check", str(img)], check=False)
    rc = main(["check", str(img)])
    _out, err = capsys.readouterr()
    assert rc == want.returncode == 1
    assert err.replace("parablock:", "qemu-img:") == want.stderr


def test_check_of_an_image_whose_backing_file_is_missing(tmp_path, capsys):
    qemu_img("create", "-q", "-f", "qed", str(tmp_path / "b.qed"), "8M")
    qemu_img("create", "-q", "-f", "qed", "-b", "b.qed", "-F", "qed", str(tmp_path / "t.qed"))
    (tmp_path / "b.qed").unlink()
    want = run(["qemu-img", "check", str(tmp_path / "t.qed")], check=False)
    rc = main(["check", str(tmp_path / "t.qed")])
    _out, err = capsys.readouterr()
    assert rc == want.returncode == 1
    assert err.replace("parablock:", "qemu-img:") == want.stderr
