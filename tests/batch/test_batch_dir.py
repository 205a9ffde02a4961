"""``parablock batch DIR --target-dir OUT``: a directory of vmdk/vhd/vdi/... images converted to qcow2
in one command, extent and backing files left to the images that use them."""
from __future__ import annotations

import json

from tests.util import needs_qemu, parablock, qemu_compare, qemu_img, qemu_io, assert_qemu_clean

pytestmark = needs_qemu


def _estate(d):
    d.mkdir()
    made = {}
    for name, fmt, opts, size in [
        ("web.vmdk", "vmdk", [], "32M"),
        ("big.vmdk", "vmdk", ["-o", "subformat=twoGbMaxExtentSparse"], "24M"),
        ("flat.vmdk", "vmdk", ["-o", "subformat=monolithicFlat"], "8M"),
        ("fixed.vhd", "vpc", ["-o", "subformat=fixed"], "8M"),
        ("dyn.vhd", "vpc", [], "8M"),
        ("vbox.vdi", "vdi", [], "8M"),
        ("hyperv.vhdx", "vhdx", [], "8M"),
        ("old.qed", "qed", [], "8M"),
        ("base.qcow2", "qcow2", [], "8M"),
        ("disk.img", "raw", [], "4M"),
    ]:
        qemu_img("create", "-q", "-f", fmt, *opts, str(d / name), size)
        qemu_io("-f", fmt, "-c", f"write -P {len(made) + 1} 1M 1M", str(d / name))
        made[name] = fmt
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(d / "top.qcow2"))
    qemu_io("-f", "qcow2", "-c", "write -P 0x66 2M 64k", str(d / "top.qcow2"))
    made["top.qcow2"] = "qcow2"
    (d / "notes.txt").write_text("not an image\n")
    return made


def test_convert_a_directory_in_one_command(tmp_path):
    src, out = tmp_path / "estate", tmp_path / "kvm"
    made = _estate(src)
    p = parablock("batch", str(src), "--target-dir", str(out), "-p", "--verify",
                  "--save-manifest", str(tmp_path / "m.json"), timeout=300)
    rep = json.loads(p.stdout)
    converted = {i["name"]: i for i in rep["items"]}
    # the backing file is read through its overlay; vmdk extent files belong to their descriptor
    assert "base.qcow2: left out: the backing file of top.qcow2" in p.stderr
    assert "big-s001.vmdk: left out: an extent of big.vmdk" in p.stderr
    assert "flat-flat.vmdk" not in converted and "notes.txt" not in converted
    assert set(converted) == set(made) - {"base.qcow2"}
    for name, item in converted.items():
        assert item["status"] == "done" and item["verified"], item
        assert qemu_compare(src / name, item["target"], made[name], "qcow2").returncode == 0, name
        assert_qemu_clean(item["target"])
    assert (out / "web.qcow2").exists() and (out / "fixed.qcow2").exists()
    assert "batch: 10/10 items" in p.stderr
    # the saved manifest runs the same items; the directory run's state makes a re-run skip them all
    saved = json.loads((tmp_path / "m.json").read_text())
    assert {i["name"] for i in saved["item"]} == set(converted)
    again = json.loads(parablock("batch", str(src), "--target-dir", str(out), timeout=300).stdout)
    assert {i["status"] for i in again["items"]} == {"skipped"}


def test_directory_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    p = parablock("batch", str(tmp_path / "empty"), "--target-dir", str(tmp_path / "o"), check=False)
    assert p.returncode == 1 and "no disk images found" in p.stderr
    p = parablock("batch", str(tmp_path / "empty"), check=False)
    assert p.returncode == 1 and "give --target-dir" in p.stderr
    p = parablock("batch", str(tmp_path / "empty"), "--target-dir", str(tmp_path / "o"), "-O", "qcow3",
                  check=False)
    assert p.returncode == 1 and "Unknown target format 'qcow3'" in p.stderr and "Traceback" not in p.stderr
