"""Shared set-up of the batch tests: a directory of mixed images (made by qemu-img and qemu-io) and a
manifest of conversions and backups over them, one of which has a broken source."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.util import QEMU_IMG, qemu_img, qemu_io

MiB = 1 << 20


def make_estate(d: Path) -> dict[str, Path]:
    """Source images of several formats with known patterns; returns name -> path."""
    src = d / "src"
    src.mkdir()
    imgs = {}
    qemu_img("create", "-q", "-f", "qcow2", str(src / "web.qcow2"), "48M")
    qemu_io("-f", "qcow2", "-c", "write -P 0xa1 1M 3M", "-c", "write -P 0xa2 40M 100k", str(src / "web.qcow2"))
    imgs["web"] = src / "web.qcow2"
    qemu_img("create", "-q", "-f", "vdi", str(src / "db.vdi"), "24M")
    qemu_io("-f", "vdi", "-c", "write -P 0xb1 0 2M", "-c", "write -P 0xb2 20M 64k", str(src / "db.vdi"))
    imgs["db"] = src / "db.vdi"
    qemu_img("create", "-q", "-f", "vpc", str(src / "win.vhd"), "16M")
    qemu_io("-f", "vpc", "-c", "write -P 0xc1 3M 1M", str(src / "win.vhd"))
    imgs["win"] = src / "win.vhd"
    # what a VMware / Hyper-V / old KVM estate brings
    qemu_img("convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized", str(src / "web.qcow2"),
             str(src / "esx.vmdk"))
    imgs["esx"] = src / "esx.vmdk"
    qemu_img("create", "-q", "-f", "vhdx", str(src / "hv.vhdx"), "20M")
    qemu_io("-f", "vhdx", "-c", "write -P 0xe1 9M 1M", "-c", "write -P 0xe2 19M 512", str(src / "hv.vhdx"))
    imgs["hv"] = src / "hv.vhdx"
    qemu_img("create", "-q", "-f", "qed", str(src / "old.qed"), "12M")
    qemu_io("-f", "qed", "-c", "write -P 0xf1 5M 200k", str(src / "old.qed"))
    imgs["old"] = src / "old.qed"
    raw = src / "plain.img"
    with open(raw, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(os.urandom(2 * MiB))
    imgs["plain"] = raw
    # a live disk with a persistent dirty bitmap: the full backup is taken, then the guest writes
    qemu_img("create", "-q", "-f", "qcow2", str(src / "vm.qcow2"), "32M")
    qemu_io("-f", "qcow2", "-c", "write -P 0xd1 0 8M", str(src / "vm.qcow2"))
    qemu_img("bitmap", "--add", str(src / "vm.qcow2"), "nightly")
    qemu_io("-f", "qcow2", "-c", "write -P 0xd2 2M 128k", "-c", "write -P 0xd3 30M 4k", str(src / "vm.qcow2"))
    imgs["vm"] = src / "vm.qcow2"
    broken = src / "broken.qcow2"
    broken.write_bytes(b"QFI\xfb" + b"\xff" * 508)
    imgs["broken"] = broken
    return imgs


def manifest_items() -> list[dict]:
    return [
        {"name": "vm-inc-late", "kind": "backup", "sync": "incremental", "bitmap": "nightly",
         "source": "src/vm.qcow2", "source_format": "qcow2", "target": "out/vm-inc-late.qcow2",
         "backing": "broken.qcow2", "backing_format": "qcow2"},
        {"name": "web", "source": "src/web.qcow2", "target": "out/web.qcow2", "compress": True},
        {"name": "db", "source": "src/db.vdi", "target": "out/db.qcow2"},
        {"name": "esx", "source": "src/esx.vmdk", "target": "out/esx.qcow2", "verify": True},
        {"name": "hv", "source": "src/hv.vhdx", "target": "out/hv.vmdk", "format": "vmdk"},
        {"name": "old", "source": "src/old.qed", "target": "out/old.vhdx", "format": "vhdx"},
        {"name": "win", "source": "src/win.vhd", "source_format": "vpc", "target": "out/win.qcow2",
         "options": {"cluster_size": "4k"}},
        {"name": "plain", "source": "src/plain.img", "source_format": "raw", "target": "out/plain.raw",
         "format": "raw"},
        {"name": "vm-full", "kind": "backup", "source": "src/vm.qcow2", "source_format": "qcow2",
         "target": "out/vm-full.qcow2"},
        # listed before the full backup it builds on: it waits for that item (its backing file)
        {"name": "vm-inc", "kind": "backup", "sync": "incremental", "bitmap": "nightly",
         "source": "src/vm.qcow2", "source_format": "qcow2", "target": "out/vm-inc.qcow2",
         "backing": "vm-full.qcow2", "backing_format": "qcow2"},
        {"name": "broken", "source": "src/broken.qcow2", "source_format": "qcow2",
         "target": "out/broken.qcow2"},
    ]


@pytest.fixture
def estate(tmp_path):
    if not QEMU_IMG:
        pytest.skip("qemu-img not installed")
    imgs = make_estate(tmp_path)
    (tmp_path / "out").mkdir()
    manifest = tmp_path / "batch.json"
    manifest.write_text(json.dumps({"defaults": {"format": "qcow2"}, "item": manifest_items()}))
    return tmp_path, imgs, manifest
