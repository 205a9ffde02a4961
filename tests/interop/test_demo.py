"""``parablock demo`` (the README's first command): the chain it builds passes qemu-img check, and the
estate of vmdk/VHD/VDI/VHDX/QED disks it writes with parablock's own drivers is what qemu-img reads,
converted exactly to qcow2 by the batch it runs."""
from __future__ import annotations

import json

from tests.util import needs_qemu, parablock, qemu_compare, qemu_img, assert_qemu_clean

pytestmark = needs_qemu


def test_demo_builds_and_converts(tmp_path):
    p = parablock("demo", str(tmp_path), timeout=300)
    assert "=== parablock check ===" in p.stdout and "No errors were found on the image." in p.stdout
    assert_qemu_clean(tmp_path / "top.qcow2")
    rep = json.loads((tmp_path / "report.json").read_text())
    assert len(rep["items"]) == 5 and all(i["status"] == "done" and i["verified"] for i in rep["items"])
    fmts = {"web.vmdk": "vmdk", "db.vhd": "vpc", "vbox.vdi": "vdi", "hyperv.vhdx": "vhdx", "legacy.qed": "qed"}
    for item in rep["items"]:
        name = item["name"]
        src = tmp_path / "estate" / name
        assert qemu_compare(src, item["target"], fmts[name], "qcow2").returncode == 0, name
        assert_qemu_clean(item["target"])
        if fmts[name] != "vpc":  # qemu-img has no check for vpc
            assert qemu_img("check", "-f", fmts[name], str(src)).returncode == 0, name
        assert f"{name}: done" in p.stderr
