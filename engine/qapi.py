"""QAPI argument layer: QEMU 7.2's command schema, argument validation and keyval syntax.

Layer: pure engine module (standard library only; no I/O, no asyncio, no imports from
``workers`` or ``engine.formats``). It holds a compact declarative copy of the parts of QEMU 7.2's
QAPI schema that parablock's daemon serves, and two input visitors modelled on QEMU's
``qobject-input-visitor.c``:

* the JSON visitor (``validate``), used for QMP arguments and for JSON command-line options;
* the keyval visitor (``from_keyval``), used for ``KEY=VALUE,...`` command-line options, where
  every scalar arrives as a string and is converted per the schema.

Invariants:

* Visiting follows QEMU's order: base members, then the discriminator's variant, each in
  declaration order; a missing or mistyped member is reported before any unexpected member.
* Returned dicts are new objects with wire (kebab-case) keys; absent optional members stay
  absent (defaults are the caller's business).
* Error texts are QEMU's, byte for byte. QEMU names a member in two ways, and so do we: the *full*
  name (``file.inject-error[0].errno``; keyval: ``file.inject-error.0.errno``) in
  missing/unexpected/type messages, and the *bare* name (``errno``, or ``null`` for a list
  element) in enum, alternate and integer-range messages.

Schema notation (close to QAPI's own JSON): a struct is a dict of members, ``*name`` marks an
optional member, ``[T]`` is a list of T and ``@base`` names a base struct. A flat union is
``Union(base, tag, {case: struct})``; a case mapped to ``OPEN`` is accepted with its members
unchecked (drivers and object types parablock does not model). An alternate is
``Alternate(name, {json-kind: type})``.

Deliberate differences from QEMU: when several members are unexpected, QEMU reports the first in
its hash-table order, we report the first in input order. Integer kinds ``size`` and ``number``
are not used by the covered commands and are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "QapiError",
    "validate",
    "command_names",
    "keyval_parse",
    "from_keyval",
    "parse_json",
]


class QapiError(Exception):
    """A QMP-visible argument error: ``desc`` is QEMU's text, ``cls`` its QMP error class."""

    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


# --------------------------------------------------------------------------------------------
# Schema notation
# --------------------------------------------------------------------------------------------

OPEN = "OPEN"  # a union case whose members parablock does not check


@dataclass(frozen=True, slots=True)
class Union:
    base: str
    tag: str
    cases: dict[str, str]


@dataclass(frozen=True, slots=True)
class Alternate:
    name: str
    # keys: "object", "string", "null", "bool", "int"
    branches: dict[str, str]


# Integer kinds: (minimum, maximum, C name used in range errors); ranges are checked after the
# 64-bit visit, like QEMU's visit_type_intN/uintN.
_INTS: dict[str, tuple[int, int, str | None]] = {
    "int": (-(2**63), 2**63 - 1, None),
    "int8": (-(2**7), 2**7 - 1, "int8_t"),
    "int16": (-(2**15), 2**15 - 1, "int16_t"),
    "int32": (-(2**31), 2**31 - 1, "int32_t"),
    "uint8": (0, 2**8 - 1, "uint8_t"),
    "uint16": (0, 2**16 - 1, "uint16_t"),
    "uint32": (0, 2**32 - 1, "uint32_t"),
    "uint64": (0, 2**64 - 1, None),
}
_BUILTINS = {"str", "bool", "null", "any", *_INTS}


def _e(values: str) -> list[str]:
    return values.split()


ENUMS: dict[str, list[str]] = {
    "QMPCapability": _e("oob"),
    "BlockdevDriver": _e(
        "blkdebug blklogwrites blkreplay blkverify bochs cloop compress copy-before-write"
        " copy-on-read dmg file snapshot-access ftp ftps gluster host_cdrom host_device http"
        " https iscsi luks nbd nfs null-aio null-co nvme parallels preallocate qcow qcow2 qed"
        " quorum raw rbd replication ssh throttle vdi vhdx vmdk vpc vvfat"
    ),
    "BlockdevDiscardOptions": _e("ignore unmap"),
    "BlockdevDetectZeroesOptions": _e("off on unmap"),
    "BlockdevOnError": _e("report ignore enospc stop auto"),
    "MirrorSyncMode": _e("top full none incremental bitmap"),
    "BitmapSyncMode": _e("on-success never always"),
    "MirrorCopyMode": _e("background write-blocking"),
    "NewImageMode": _e("existing absolute-paths"),
    "OnOffAuto": _e("auto on off"),
    "BlockdevAioOptions": _e("threads native io_uring"),
    "BlkdebugEvent": _e(
        "l1_update l1_grow_alloc_table l1_grow_write_table l1_grow_activate_table l2_load"
        " l2_update l2_update_compressed l2_alloc_cow_read l2_alloc_write read_aio"
        " read_backing_aio read_compressed write_aio write_compressed vmstate_load"
        " vmstate_save cow_read cow_write reftable_load reftable_grow reftable_update"
        " refblock_load refblock_update refblock_update_part refblock_alloc"
        " refblock_alloc_hookup refblock_alloc_write refblock_alloc_write_blocks"
        " refblock_alloc_write_table refblock_alloc_switch_table cluster_alloc"
        " cluster_alloc_bytes cluster_free flush_to_os flush_to_disk pwritev_rmw_head"
        " pwritev_rmw_after_head pwritev_rmw_tail pwritev_rmw_after_tail pwritev pwritev_zero"
        " pwritev_done empty_image_prepare l1_shrink_write_table l1_shrink_free_l2_clusters"
        " cor_write cluster_alloc_space none"
    ),
    "BlkdebugIOType": _e("read write write-zeroes discard flush block-status"),
    "BlockPermission": _e("consistent-read write write-unchanged resize"),
    "Qcow2OverlapCheckMode": _e("none constant cached all"),
    "BlockdevQcow2EncryptionFormat": _e("aes luks"),
    "BlockdevQcowEncryptionFormat": _e("aes"),
    "BlockExportType": _e("nbd vhost-user-blk fuse vduse-blk"),
    "BlockExportRemoveMode": _e("safe hard"),
    "SocketAddressType": _e("inet unix vsock fd"),
    "ActionCompletionMode": _e("individual grouped"),
    "TransactionActionKind": _e(
        "abort block-dirty-bitmap-add block-dirty-bitmap-remove block-dirty-bitmap-clear"
        " block-dirty-bitmap-enable block-dirty-bitmap-disable block-dirty-bitmap-merge"
        " blockdev-backup blockdev-snapshot blockdev-snapshot-internal-sync"
        " blockdev-snapshot-sync drive-backup"
    ),
    "ObjectType": _e(
        "authz-list authz-listfile authz-pam authz-simple can-bus can-host-socketcan"
        " colo-compare cryptodev-backend cryptodev-backend-builtin cryptodev-backend-lkcf"
        " cryptodev-vhost-user dbus-vmstate filter-buffer filter-dump filter-mirror"
        " filter-redirector filter-replay filter-rewriter input-barrier input-linux iothread"
        " main-loop memory-backend-epc memory-backend-file memory-backend-memfd"
        " memory-backend-ram pef-guest pr-manager-helper qtest rng-builtin rng-egd rng-random"
        " secret secret_keyring sev-guest thread-context s390-pv-guest throttle-group"
        " tls-creds-anon tls-creds-psk tls-creds-x509 tls-cipher-suites x-remote-object"
        " x-vfio-user-server"
    ),
    "MonitorMode": _e("readline control"),
}

_THROTTLE_KEYS = [
    f"{kind}-{op}{suffix}"
    for kind in ("iops", "bps")
    for op in ("total", "read", "write")
    for suffix in ("", "-max", "-max-length")
] + ["iops-size"]

_BACKUP_COMMON = {
    "*job-id": "str", "device": "str", "sync": "MirrorSyncMode", "*speed": "int",
    "*bitmap": "str", "*bitmap-mode": "BitmapSyncMode", "*compress": "bool",
    "*on-source-error": "BlockdevOnError", "*on-target-error": "BlockdevOnError",
    "*auto-finalize": "bool", "*auto-dismiss": "bool", "*filter-node-name": "str",
    "*x-perf": "BackupPerf",
}  # fmt: skip

_FILE_OPTS = {
    "filename": "str", "*pr-manager": "str", "*locking": "OnOffAuto",
    "*aio": "BlockdevAioOptions", "*aio-max-batch": "int", "*drop-cache": "bool",
    "*x-check-cache-dropped": "bool",
}  # fmt: skip

STRUCTS: dict[str, dict[str, str]] = {
    # ---- block nodes ---------------------------------------------------------------------
    "BlockdevCacheOptions": {"*direct": "bool", "*no-flush": "bool"},
    "BlockdevOptionsBase": {
        "driver": "BlockdevDriver", "*node-name": "str", "*discard": "BlockdevDiscardOptions",
        "*cache": "BlockdevCacheOptions", "*read-only": "bool", "*auto-read-only": "bool",
        "*force-share": "bool", "*detect-zeroes": "BlockdevDetectZeroesOptions",
    },  # fmt: skip
    "BlockdevOptionsFile": dict(_FILE_OPTS),
    "BlockdevOptionsGenericFormat": {"file": "BlockdevRef"},
    "BlockdevOptionsGenericCOWFormat": {"file": "BlockdevRef", "*backing": "BlockdevRefOrNull"},
    "BlockdevOptionsRaw": {"file": "BlockdevRef", "*offset": "int", "*size": "int"},
    "BlockdevOptionsQcow2": {
        "file": "BlockdevRef", "*backing": "BlockdevRefOrNull", "*lazy-refcounts": "bool",
        "*pass-discard-request": "bool", "*pass-discard-snapshot": "bool",
        "*pass-discard-other": "bool", "*overlap-check": "Qcow2OverlapChecks",
        "*cache-size": "int", "*l2-cache-size": "int", "*l2-cache-entry-size": "int",
        "*refcount-cache-size": "int", "*cache-clean-interval": "int",
        "*encrypt": "BlockdevQcow2Encryption", "*data-file": "BlockdevRef",
    },  # fmt: skip
    "BlockdevOptionsQcow": {
        "file": "BlockdevRef", "*backing": "BlockdevRefOrNull",
        "*encrypt": "BlockdevQcowEncryption",
    },  # fmt: skip
    "Qcow2OverlapCheckFlags": {
        "*template": "Qcow2OverlapCheckMode", "*main-header": "bool", "*active-l1": "bool",
        "*active-l2": "bool", "*refcount-table": "bool", "*refcount-block": "bool",
        "*snapshot-table": "bool", "*inactive-l1": "bool", "*inactive-l2": "bool",
        "*bitmap-directory": "bool",
    },  # fmt: skip
    "QCryptoBlockOptionsBase": {"format": "BlockdevQcow2EncryptionFormat"},
    "QCryptoBlockQcowBase": {"format": "BlockdevQcowEncryptionFormat"},
    "QCryptoBlockOptionsSecret": {"*key-secret": "str"},
    "BlockdevOptionsLUKS": {"file": "BlockdevRef", "*key-secret": "str"},
    "BlockdevOptionsThrottle": {"throttle-group": "str", "file": "BlockdevRef"},
    "BlockdevOptionsNull": {"*size": "int", "*latency-ns": "uint64", "*read-zeroes": "bool"},
    "BlockdevOptionsCor": {"file": "BlockdevRef", "*bottom": "str"},
    "BlockdevOptionsPreallocate": {
        "file": "BlockdevRef", "*prealloc-align": "int", "*prealloc-size": "int",
    },  # fmt: skip
    "BlockdevOptionsBlkdebug": {
        "image": "BlockdevRef", "*config": "str", "*align": "int", "*max-transfer": "int32",
        "*opt-write-zero": "int32", "*max-write-zero": "int32", "*opt-discard": "int32",
        "*max-discard": "int32", "*inject-error": "[BlkdebugInjectErrorOptions]",
        "*set-state": "[BlkdebugSetStateOptions]", "*take-child-perms": "[BlockPermission]",
        "*unshare-child-perms": "[BlockPermission]",
    },  # fmt: skip
    "BlkdebugInjectErrorOptions": {
        "event": "BlkdebugEvent", "*state": "int", "*iotype": "BlkdebugIOType",
        "*errno": "int", "*sector": "int", "*once": "bool", "*immediately": "bool",
    },  # fmt: skip
    "BlkdebugSetStateOptions": {"event": "BlkdebugEvent", "*state": "int", "new_state": "int"},
    # ---- jobs ----------------------------------------------------------------------------
    "BackupPerf": {"*use-copy-range": "bool", "*max-workers": "int", "*max-chunk": "int"},
    "BlockdevBackup": {**_BACKUP_COMMON, "target": "str"},
    "DriveBackup": {**_BACKUP_COMMON, "target": "str", "*format": "str", "*mode": "NewImageMode"},
    # ---- bitmaps, snapshots, transactions ------------------------------------------------
    "BlockDirtyBitmap": {"node": "str", "name": "str"},
    "BlockDirtyBitmapAdd": {
        "node": "str", "name": "str", "*granularity": "uint32", "*persistent": "bool",
        "*disabled": "bool",
    },  # fmt: skip
    "BlockDirtyBitmapMerge": {
        "node": "str", "target": "str", "bitmaps": "[BlockDirtyBitmapOrStr]",
    },  # fmt: skip
    "BlockdevSnapshot": {"node": "str", "overlay": "str"},
    "BlockdevSnapshotSync": {
        "*device": "str", "*node-name": "str", "snapshot-file": "str",
        "*snapshot-node-name": "str", "*format": "str", "*mode": "NewImageMode",
    },  # fmt: skip
    "BlockdevSnapshotInternal": {"device": "str", "name": "str"},
    "Abort": {},
    "TransactionProperties": {"*completion-mode": "ActionCompletionMode"},
    "TransactionActionBase": {"type": "TransactionActionKind"},
    # ---- sockets, NBD, exports -----------------------------------------------------------
    "InetSocketAddress": {
        "host": "str", "port": "str", "*numeric": "bool", "*to": "uint16", "*ipv4": "bool",
        "*ipv6": "bool", "*keep-alive": "bool", "*mptcp": "bool",
    },  # fmt: skip
    "UnixSocketAddress": {"path": "str", "*abstract": "bool", "*tight": "bool"},
    "VsockSocketAddress": {"cid": "str", "port": "str"},
    "String": {"str": "str"},
    "SocketAddressBase": {"type": "SocketAddressType"},
    "NbdServerOptions": {
        "addr": "SocketAddress", "*tls-creds": "str", "*tls-authz": "str",
        "*max-connections": "uint32",
    },  # fmt: skip
    "NbdServerStart": {
        "addr": "SocketAddressLegacy", "*tls-creds": "str", "*tls-authz": "str",
        "*max-connections": "uint32",
    },  # fmt: skip
    "BlockExportOptionsBase": {
        "type": "BlockExportType", "id": "str", "*fixed-iothread": "bool", "*iothread": "str",
        "node-name": "str", "*writable": "bool", "*writethrough": "bool",
    },  # fmt: skip
    "BlockExportOptionsNbd": {
        "*name": "str", "*description": "str", "*bitmaps": "[BlockDirtyBitmapOrStr]",
        "*allocation-depth": "bool",
    },  # fmt: skip
    # ---- objects and monitors ------------------------------------------------------------
    "ObjectOptionsBase": {"qom-type": "ObjectType", "id": "str"},
    "ThrottleLimits": {f"*{k}": "int" for k in _THROTTLE_KEYS},
    "ThrottleGroupProperties": {
        "*limits": "ThrottleLimits", **{f"*x-{k}": "int" for k in _THROTTLE_KEYS},
    },  # fmt: skip
    "MonitorOptions": {"*id": "str", "*mode": "MonitorMode", "*pretty": "bool", "chardev": "str"},
}

# Legacy ("simple") unions wrap each case in {"data": ...}.
_LEGACY_WRAPPED = {
    "abort": "Abort", "block-dirty-bitmap-add": "BlockDirtyBitmapAdd",
    "block-dirty-bitmap-remove": "BlockDirtyBitmap", "block-dirty-bitmap-clear": "BlockDirtyBitmap",
    "block-dirty-bitmap-enable": "BlockDirtyBitmap",
    "block-dirty-bitmap-disable": "BlockDirtyBitmap",
    "block-dirty-bitmap-merge": "BlockDirtyBitmapMerge", "blockdev-backup": "BlockdevBackup",
    "blockdev-snapshot": "BlockdevSnapshot",
    "blockdev-snapshot-internal-sync": "BlockdevSnapshotInternal",
    "blockdev-snapshot-sync": "BlockdevSnapshotSync", "drive-backup": "DriveBackup",
}  # fmt: skip
_SOCKET_CASES = {
    "inet": "InetSocketAddress", "unix": "UnixSocketAddress", "vsock": "VsockSocketAddress",
    "fd": "String",
}  # fmt: skip
for _case, _inner in [*_LEGACY_WRAPPED.items(), *_SOCKET_CASES.items()]:
    STRUCTS[f"{_inner}Wrapper"] = {"data": _inner}

_GENERIC_FORMATS = ["bochs", "cloop", "compress", "dmg", "parallels", "vdi", "vhdx", "vpc"]

UNIONS: dict[str, Union] = {
    "BlockdevOptions": Union(
        "BlockdevOptionsBase",
        "driver",
        {
            **{d: OPEN for d in ENUMS["BlockdevDriver"]},
            **{d: "BlockdevOptionsGenericFormat" for d in _GENERIC_FORMATS},
            "file": "BlockdevOptionsFile",
            "host_device": "BlockdevOptionsFile",
            "host_cdrom": "BlockdevOptionsFile",
            "raw": "BlockdevOptionsRaw",
            "qcow2": "BlockdevOptionsQcow2",
            "qcow": "BlockdevOptionsQcow",
            "qed": "BlockdevOptionsGenericCOWFormat",
            "vmdk": "BlockdevOptionsGenericCOWFormat",
            "luks": "BlockdevOptionsLUKS",
            "throttle": "BlockdevOptionsThrottle",
            "null-co": "BlockdevOptionsNull",
            "null-aio": "BlockdevOptionsNull",
            "blkdebug": "BlockdevOptionsBlkdebug",
            "copy-on-read": "BlockdevOptionsCor",
            "preallocate": "BlockdevOptionsPreallocate",
        },
    ),
    "BlockdevQcow2Encryption": Union(
        "QCryptoBlockOptionsBase", "format",
        {"aes": "QCryptoBlockOptionsSecret", "luks": "QCryptoBlockOptionsSecret"},
    ),  # fmt: skip
    "BlockdevQcowEncryption": Union(
        "QCryptoBlockQcowBase", "format", {"aes": "QCryptoBlockOptionsSecret"}
    ),
    "TransactionAction": Union(
        "TransactionActionBase", "type", {k: f"{v}Wrapper" for k, v in _LEGACY_WRAPPED.items()}
    ),
    "SocketAddress": Union("SocketAddressBase", "type", dict(_SOCKET_CASES)),
    "SocketAddressLegacy": Union(
        "SocketAddressBase", "type", {k: f"{v}Wrapper" for k, v in _SOCKET_CASES.items()}
    ),
    "BlockExportOptions": Union(
        "BlockExportOptionsBase",
        "type",
        {"nbd": "BlockExportOptionsNbd", "vhost-user-blk": OPEN, "fuse": OPEN, "vduse-blk": OPEN},
    ),
    "ObjectOptions": Union(
        "ObjectOptionsBase",
        "qom-type",
        {**{t: OPEN for t in ENUMS["ObjectType"]}, "throttle-group": "ThrottleGroupProperties"},
    ),
}

ALTERNATES: dict[str, Alternate] = {
    a.name: a
    for a in (
        Alternate("BlockdevRef", {"object": "BlockdevOptions", "string": "str"}),
        Alternate(
            "BlockdevRefOrNull", {"object": "BlockdevOptions", "string": "str", "null": "null"}
        ),
        Alternate("BlockDirtyBitmapOrStr", {"string": "str", "object": "BlockDirtyBitmap"}),
        Alternate(
            "Qcow2OverlapChecks",
            {"object": "Qcow2OverlapCheckFlags", "string": "Qcow2OverlapCheckMode"},
        ),
    )
}

_JOB_ID = {"id": "str"}
_BLOCK_JOB = {"device": "str"}
_STREAM_COMMIT_TAIL = {
    "*speed": "int", "*on-error": "BlockdevOnError", "*filter-node-name": "str",
    "*auto-finalize": "bool", "*auto-dismiss": "bool",
}  # fmt: skip

# Command name -> argument struct (inline dict or a STRUCTS/UNIONS name). Order = QEMU's.
COMMANDS: dict[str, dict[str, str] | str] = {
    "qmp_capabilities": {"*enable": "[QMPCapability]"},
    "quit": {},
    "query-version": {},
    "query-commands": {},
    "query-named-block-nodes": {"*flat": "bool"},
    "query-blockstats": {"*query-nodes": "bool"},
    "query-jobs": {},
    "query-block-jobs": {},
    "blockdev-add": "BlockdevOptions",
    "blockdev-del": {"node-name": "str"},
    "blockdev-reopen": {"options": "[BlockdevOptions]"},
    "object-add": "ObjectOptions",
    "object-del": {"id": "str"},
    "qom-get": {"path": "str", "property": "str"},
    "qom-set": {"path": "str", "property": "str", "value": "any"},
    "block-commit": {
        "*job-id": "str", "device": "str", "*base-node": "str", "*base": "str",
        "*top-node": "str", "*top": "str", "*backing-file": "str", **_STREAM_COMMIT_TAIL,
    },  # fmt: skip
    "block-stream": {
        "*job-id": "str", "device": "str", "*base": "str", "*base-node": "str",
        "*backing-file": "str", "*bottom": "str", **_STREAM_COMMIT_TAIL,
    },  # fmt: skip
    "blockdev-mirror": {
        "*job-id": "str", "device": "str", "target": "str", "*replaces": "str",
        "sync": "MirrorSyncMode", "*speed": "int", "*granularity": "uint32",
        "*buf-size": "int", "*on-source-error": "BlockdevOnError",
        "*on-target-error": "BlockdevOnError", "*filter-node-name": "str",
        "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool", "*auto-dismiss": "bool",
    },  # fmt: skip
    "drive-mirror": {
        "*job-id": "str", "device": "str", "target": "str", "*format": "str",
        "*node-name": "str", "*replaces": "str", "sync": "MirrorSyncMode",
        "*mode": "NewImageMode", "*speed": "int", "*granularity": "uint32",
        "*buf-size": "int", "*on-source-error": "BlockdevOnError",
        "*on-target-error": "BlockdevOnError", "*unmap": "bool",
        "*copy-mode": "MirrorCopyMode", "*auto-finalize": "bool", "*auto-dismiss": "bool",
    },  # fmt: skip
    "blockdev-backup": "BlockdevBackup",
    "drive-backup": "DriveBackup",
    "block-dirty-bitmap-add": "BlockDirtyBitmapAdd",
    "block-dirty-bitmap-remove": "BlockDirtyBitmap",
    "block-dirty-bitmap-clear": "BlockDirtyBitmap",
    "block-dirty-bitmap-enable": "BlockDirtyBitmap",
    "block-dirty-bitmap-disable": "BlockDirtyBitmap",
    "block-dirty-bitmap-merge": "BlockDirtyBitmapMerge",
    "blockdev-snapshot": "BlockdevSnapshot",
    "blockdev-snapshot-sync": "BlockdevSnapshotSync",
    "blockdev-snapshot-internal-sync": "BlockdevSnapshotInternal",
    "blockdev-snapshot-delete-internal-sync": {"device": "str", "*id": "str", "*name": "str"},
    "transaction": {"actions": "[TransactionAction]", "*properties": "TransactionProperties"},
    "job-pause": _JOB_ID,
    "job-resume": _JOB_ID,
    "job-cancel": _JOB_ID,
    "job-complete": _JOB_ID,
    "job-finalize": _JOB_ID,
    "job-dismiss": _JOB_ID,
    "block-job-set-speed": {"device": "str", "speed": "int"},
    "block-job-cancel": {"device": "str", "*force": "bool"},
    "block-job-pause": _BLOCK_JOB,
    "block-job-resume": _BLOCK_JOB,
    "block-job-complete": _BLOCK_JOB,
    "block-job-finalize": _JOB_ID,
    "block-job-dismiss": _JOB_ID,
    "nbd-server-start": "NbdServerStart",
    "nbd-server-stop": {},
    "nbd-server-add": {
        "*name": "str", "*description": "str", "device": "str", "*writable": "bool",
        "*bitmap": "str",
    },  # fmt: skip
    "nbd-server-remove": {"name": "str", "*mode": "BlockExportRemoveMode"},
    "block-export-add": "BlockExportOptions",
    "block-export-del": {"id": "str", "*mode": "BlockExportRemoveMode"},
    "query-block-exports": {},
    "block_resize": {"*device": "str", "*node-name": "str", "size": "int"},
}

# Types ``from_keyval`` accepts (the command-line option types of qemu-storage-daemon).
KEYVAL_TYPES = frozenset(
    {"BlockdevOptions", "ObjectOptions", "NbdServerOptions", "BlockExportOptions", "MonitorOptions"}
)


def command_names() -> list[str]:
    """The QMP commands whose arguments this module knows, in schema order."""
    return list(COMMANDS)


# --------------------------------------------------------------------------------------------
# The input visitor
# --------------------------------------------------------------------------------------------

_Path = tuple[str | int, ...]


class _Visitor:
    """One walk over an argument tree; ``keyval`` selects QEMU's keyval flavour."""

    def __init__(self, keyval: bool) -> None:
        self.keyval = keyval

    # -- names --------------------------------------------------------------------------
    def full(self, path: _Path) -> str:
        out = ""
        for seg in path:
            if isinstance(seg, int):
                out += f".{seg}" if self.keyval else f"[{seg}]"
            else:
                out += f".{seg}" if out else seg
        return out

    @staticmethod
    def bare(path: _Path) -> str:
        if not path or isinstance(path[-1], int):
            return "null"
        return path[-1]

    def type_error(self, path: _Path, expected: str) -> QapiError:
        return QapiError(f"Invalid parameter type for '{self.full(path)}', expected: {expected}")

    def keyval_scalar(self, value: object, path: _Path) -> str:
        if isinstance(value, str):
            return value
        raise QapiError(f"Parameters '{self.full(path)}.*' are unexpected")

    # -- dispatch -----------------------------------------------------------------------
    def visit(self, tname: str, value: object, path: _Path) -> object:
        if tname.startswith("["):
            return self.visit_list(tname[1:-1], value, path)
        if tname in _INTS:
            return self.visit_int(tname, value, path)
        if tname == "str":
            if self.keyval:
                return self.keyval_scalar(value, path)
            if not isinstance(value, str):
                raise self.type_error(path, "string")
            return value
        if tname == "bool":
            return self.visit_bool(value, path)
        if tname == "null":
            if value is not None:
                raise self.type_error(path, "null")
            return None
        if tname == "any":
            return value
        if tname in ENUMS:
            return self.visit_enum(tname, value, path)
        if tname in ALTERNATES:
            return self.visit_alternate(ALTERNATES[tname], value, path)
        if tname in STRUCTS or tname in UNIONS:
            if not isinstance(value, dict):
                raise self.type_error(path, "object")
            return self.visit_object(tname, value, path)
        raise AssertionError(f"schema names unknown type {tname!r}")

    def visit_list(self, elem: str, value: object, path: _Path) -> list[object]:
        if not isinstance(value, list):
            raise self.type_error(path, "array")
        return [self.visit(elem, item, (*path, i)) for i, item in enumerate(value)]

    def visit_bool(self, value: object, path: _Path) -> bool:
        if self.keyval:
            text = self.keyval_scalar(value, path)
            if text in ("on", "yes", "true", "y"):
                return True
            if text in ("off", "no", "false", "n"):
                return False
            raise QapiError(f"Parameter '{self.full(path)}' expects 'on' or 'off'")
        if not isinstance(value, bool):
            raise self.type_error(path, "boolean")
        return value

    def visit_int(self, kind: str, value: object, path: _Path) -> int:
        lo, hi, cname = _INTS[kind]
        unsigned = kind.startswith("u")
        if self.keyval:
            text = self.keyval_scalar(value, path)
            number = _strto64(text, unsigned)
            if number is None:
                raise QapiError(f"Parameter '{self.full(path)}' expects integer")
        elif unsigned:
            # QEMU: uint64 accepts any JSON integer in [-2^63, 2^64), wrapping negatives.
            if not _is_json_int(value) or not -(2**63) <= value < 2**64:  # type: ignore[operator]
                raise QapiError(f"Parameter '{self.full(path)}' expects uint64")
            number = value % 2**64  # type: ignore[operator]
        else:
            if not _is_json_int(value) or not -(2**63) <= value < 2**63:  # type: ignore[operator]
                raise self.type_error(path, "integer")
            number = value  # type: ignore[assignment]
        if cname is not None and not lo <= number <= hi:
            raise QapiError(f"Parameter '{self.bare(path)}' expects {cname}")
        return number

    def visit_enum(self, tname: str, value: object, path: _Path) -> str:
        if self.keyval:
            text = self.keyval_scalar(value, path)
        elif isinstance(value, str):
            text = value
        else:
            raise self.type_error(path, "string")
        if text not in ENUMS[tname]:
            raise QapiError(f"Parameter '{self.bare(path)}' does not accept value '{text}'")
        return text

    def visit_alternate(self, alt: Alternate, value: object, path: _Path) -> object:
        if isinstance(value, dict):
            kind = "object"
        elif isinstance(value, str):
            kind = "string"
        elif value is None:
            kind = "null"
        elif isinstance(value, bool):
            kind = "bool"
        elif _is_json_int(value):
            kind = "int"
        else:
            kind = "other"
        branch = alt.branches.get(kind)
        if branch is None:
            raise QapiError(
                f"Invalid parameter type for '{self.bare(path)}', expected: {alt.name}"
            )
        return self.visit(branch, value, path)

    def visit_object(self, tname: str, value: dict[str, object], path: _Path) -> dict[str, object]:
        out: dict[str, object] = {}
        if tname in UNIONS:
            union = UNIONS[tname]
            self.visit_members(STRUCTS[union.base], value, path, out)
            case = union.cases[out[union.tag]]  # type: ignore[index]
            if case == OPEN:
                for key, item in value.items():
                    out.setdefault(key, item)
                return out
            self.visit_members(STRUCTS[case], value, path, out)
        else:
            self.visit_members(STRUCTS[tname], value, path, out)
        for key in value:
            if key not in out:
                raise QapiError(f"Parameter '{self.full((*path, key))}' is unexpected")
        return out

    def visit_members(
        self,
        members: dict[str, str],
        value: dict[str, object],
        path: _Path,
        out: dict[str, object],
    ) -> None:
        for spec, tname in members.items():
            optional = spec.startswith("*")
            name = spec[1:] if optional else spec
            if name not in value:
                if optional:
                    continue
                raise QapiError(f"Parameter '{self.full((*path, name))}' is missing")
            out[name] = self.visit(tname, value[name], (*path, name))


def _is_json_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strto64(text: str, unsigned: bool) -> int | None:
    """C ``strtoll``/``strtoull`` with base 0 and QEMU's "whole string" rule; None = error.

    Leading whitespace and a sign are allowed; ``0x`` selects hex, a leading ``0`` octal.
    The unsigned form wraps negative values like ``strtoull`` does.
    """
    s = text.lstrip(" \t\n\v\f\r")
    negative = False
    if s[:1] in ("+", "-"):
        negative = s[0] == "-"
        s = s[1:]
    if s[:2].lower() == "0x" and len(s) > 2 and s[2] in "0123456789abcdefABCDEF":
        base, digits = 16, s[2:]
    elif s[:1] == "0":
        base, digits = 8, s
    else:
        base, digits = 10, s
    allowed = "0123456789abcdefABCDEF"[: base + (6 if base == 16 else 0)]
    if not digits or any(c not in allowed for c in digits):
        return None
    magnitude = int(digits, base)
    if unsigned:
        if magnitude >= 2**64:
            return None
        return (-magnitude) % 2**64 if negative else magnitude
    number = -magnitude if negative else magnitude
    if not -(2**63) <= number < 2**63:
        return None
    return number


def validate(command: str, args: dict[str, object] | None) -> dict[str, object]:
    """Check QMP ``arguments`` of ``command`` against QEMU 7.2's schema.

    Returns a new dict with the same wire keys (absent optionals stay absent; unsigned integers
    given as negative JSON numbers come back wrapped, as QEMU stores them).

    Raises QapiError: ``CommandNotFound`` for an unknown command, else ``GenericError`` with
    QEMU's missing/unexpected/type/enum/range text.
    """
    spec = COMMANDS.get(command)
    if spec is None:
        raise QapiError(f"The command {command} has not been found", "CommandNotFound")
    value: dict[str, object] = {} if args is None else args
    visitor = _Visitor(keyval=False)
    if isinstance(spec, str):
        return visitor.visit_object(spec, value, ())
    out: dict[str, object] = {}
    visitor.visit_members(spec, value, (), out)
    for key in value:
        if key not in out:
            raise QapiError(f"Parameter '{key}' is unexpected")
    return out


def visit_json(type_name: str, value: object) -> dict[str, object]:
    """Visit an already-parsed JSON object as ``type_name`` (JSON command-line options).

    Raises QapiError as ``validate`` does.
    """
    if type_name not in KEYVAL_TYPES:
        raise ValueError(f"no command-line type {type_name!r}")
    return _Visitor(keyval=False).visit(type_name, value, ())  # type: ignore[return-value]


def from_keyval(type_name: str, tree: dict[str, object]) -> dict[str, object]:
    """Convert a ``keyval_parse`` tree (string leaves) to a typed dict per the schema.

    ``type_name`` is one of BlockdevOptions, ObjectOptions, NbdServerOptions,
    BlockExportOptions, MonitorOptions. Integers accept C syntax (``0x10``, ``010``, sign,
    leading blanks); booleans accept on/yes/true/y and off/no/false/n. Open union cases keep
    their members as strings.

    Raises QapiError with QEMU's keyval texts ("Parameter 'size' expects integer", "Parameter
    'x' expects 'on' or 'off'", "Parameters 'x.*' are unexpected", ...); ValueError for a type
    that is not a command-line type.
    """
    if type_name not in KEYVAL_TYPES:
        raise ValueError(f"no command-line type {type_name!r}")
    return _Visitor(keyval=True).visit(type_name, tree, ())  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Keyval syntax (util/keyval.c)
# --------------------------------------------------------------------------------------------


def _qapi_name_len(s: str) -> int:
    """Length of the QAPI name at the start of ``s`` (QEMU's parse_qapi_name), or -1."""
    i = 0
    if s[:1] == "_":
        if s[1:2] != "_":
            return -1
        i = 2
        while i < len(s) and (s[i].isascii() and s[i].isalnum() or s[i] in "-."):
            i += 1
        if s[i : i + 1] != "_":
            return -1
        i += 1
    if not (i < len(s) and s[i].isascii() and s[i].isalpha()):
        return -1
    i += 1
    while i < len(s) and (s[i].isascii() and s[i].isalnum() or s[i] in "-_"):
        i += 1
    return i


def _index_len(s: str) -> int:
    i = 0
    while i < len(s) and s[i] in "0123456789":
        i += 1
    return i


def _is_help(s: str) -> bool:
    return s in ("help", "?")


def keyval_parse(text: str, implied_key: str | None = None) -> dict[str, object]:
    """Parse QEMU's ``KEY=VALUE,...`` syntax into a tree of dicts, lists and strings.

    Dotted keys make nested dicts, all-numeric fragments make lists (indexes in any order, no
    gaps), ``,,`` is a literal comma, a repeated key keeps its last value. With
    ``implied_key``, a first parameter without ``=`` is that key's value (up to the next
    comma). ``help``/``?`` as a parameter is refused, as qemu-storage-daemon's options do.

    Raises QapiError with QEMU's texts: "Invalid parameter 'a..b'", "Expected '=' after
    parameter 'x'", "Parameters 'a.*' used inconsistently", "Parameter 'a.1' missing",
    "Parameter 'x' is too long", "Help is not available for this option".
    """
    tree = _keyval_tokens(text, implied_key, allow_help=False)
    assert isinstance(tree, dict)
    return tree


def keyval_parse_help(text: str, implied_key: str | None) -> tuple[dict[str, object], bool]:
    """Like ``keyval_parse`` but accept ``help``/``?``; returns (tree, help_requested)."""
    help_flag: list[bool] = []
    tree = _keyval_tokens(text, implied_key, allow_help=True, help_out=help_flag)
    return tree, bool(help_flag)


def _keyval_tokens(
    text: str,
    implied_key: str | None,
    *,
    allow_help: bool,
    help_out: list[bool] | None = None,
) -> dict[str, object]:
    root: dict[str, object] = {}
    pos = 0
    implied = implied_key
    while pos < len(text):
        pos = _keyval_one(root, text, pos, implied, allow_help, help_out)
        implied = None
    result = _listify(root, [])
    assert isinstance(result, dict)
    return result


def _keyval_one(
    root: dict[str, object],
    text: str,
    pos: int,
    implied_key: str | None,
    allow_help: bool,
    help_out: list[bool] | None,
) -> int:
    rest = text[pos:]
    length = _span(rest)
    if length and rest[length : length + 1] != "=":
        if _is_help(rest[:length]):
            if not allow_help:
                raise QapiError("Help is not available for this option")
            assert help_out is not None
            help_out.append(True)
            pos += length
            return pos + 1 if text[pos : pos + 1] == "," else pos
        if implied_key is not None:
            _put(root, [implied_key], rest[:length], implied_key)
            pos += length
            return pos + 1 if text[pos : pos + 1] == "," else pos
    key_end = length
    key = rest[:key_end]
    # Split the key into fragments, validating each like keyval_parse_one.
    fragments: list[str] = []
    s = 0
    while True:
        frag = key[s:]
        if fragments and _index_len(frag) > 0:
            flen = _index_len(frag)
        else:
            flen = max(_qapi_name_len(frag), 0)
        if not flen or (s + flen < key_end and key[s + flen] != "."):
            raise QapiError(f"Invalid parameter '{key}'")
        if flen >= 128:
            whole = s == 0 and s + flen == key_end
            raise QapiError(
                f"Parameter{'' if whole else ' fragment'} '{key[s : s + flen]}' is too long"
            )
        fragments.append(key[s : s + flen])
        s += flen
        if s >= key_end:
            break
        s += 1  # the '.'
    after = rest[key_end : key_end + 1]
    if after != "=":
        raise QapiError(f"Expected '=' after parameter '{key}'")
    # Value: up to an unescaped comma; ",," is a comma.
    i = pos + key_end + 1
    value: list[str] = []
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                value.append(",")
                i += 2
                continue
            i += 1
            break
        value.append(text[i])
        i += 1
    _put(root, fragments, "".join(value), key)
    return i


def _span(s: str) -> int:
    """strcspn(s, "=,")."""
    for i, c in enumerate(s):
        if c in "=,":
            return i
    return len(s)


def _put(root: dict[str, object], fragments: list[str], value: str, key: str) -> None:
    cur = root
    consumed = 0
    for frag in fragments[:-1]:
        consumed += len(frag)
        old = cur.get(frag)
        if old is None:
            new: dict[str, object] = {}
            cur[frag] = new
            cur = new
        elif isinstance(old, dict):
            cur = old
        else:
            raise QapiError(f"Parameters '{key[:consumed]}.*' used inconsistently")
        consumed += 1
    last = fragments[-1]
    if isinstance(cur.get(last), dict):
        raise QapiError(f"Parameters '{key}.*' used inconsistently")
    cur[last] = value


def _listify(node: dict[str, object], path: list[str]) -> dict[str, object] | list[object]:
    has_index = has_member = False
    for key in list(node):
        if key[:1].isdigit():
            has_index = True
        else:
            has_member = True
        child = node[key]
        if isinstance(child, dict):
            node[key] = _listify(child, [*path, key])
    prefix = "".join(f"{p}." for p in path)
    if has_index and has_member:
        raise QapiError(f"Parameters '{prefix}*' used inconsistently")
    if not has_index:
        return node
    elements: dict[int, object] = {}
    for key, child in node.items():
        elements[min(int(key), 2**31 - 1)] = child
    items: list[object] = []
    for i in range(max(elements) + 1):
        if i not in elements:
            raise QapiError(f"Parameter '{prefix}{i}' missing")
        items.append(elements[i])
    return items


# --------------------------------------------------------------------------------------------
# JSON with QEMU's extensions (single-quoted strings), for JSON command-line options
# --------------------------------------------------------------------------------------------


class _JsonParser:
    """A small recursive-descent parser for QEMU's JSON dialect (qobject/json-parser.c).

    Numbers: integers in int64 or uint64 range stay integers, others become floats, as QEMU's
    QNum does.
    """

    _WS = " \t\n\r"

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> QapiError:
        return QapiError(f"JSON parse error, {what}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in self._WS:
            self.pos += 1

    def parse_document(self) -> object:
        value = self.value()
        self.skip()
        if self.pos < len(self.text):
            raise QapiError("Expecting at most one JSON value")
        return value

    def value(self) -> object:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("premature EOI")
        c = self.text[self.pos]
        if c == "{":
            return self.obj()
        if c == "[":
            return self.arr()
        if c in "\"'":
            return self.string()
        if c == "-" or c.isdigit():
            return self.number()
        if c.isalpha():
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos].isalpha():
                self.pos += 1
            word = self.text[start : self.pos]
            consts = {"true": True, "false": False, "null": None}
            if word in consts:
                return consts[word]
            raise self.error(f"invalid keyword '{word}'")
        raise self.error("expecting value")

    def expect(self, ch: str, what: str) -> None:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("premature EOI")
        if self.text[self.pos] != ch:
            raise self.error(what)
        self.pos += 1

    def peek(self) -> str:
        self.skip()
        if self.pos >= len(self.text):
            raise self.error("premature EOI")
        return self.text[self.pos]

    def obj(self) -> dict[str, object]:
        self.pos += 1
        out: dict[str, object] = {}
        if self.peek() == "}":
            self.pos += 1
            return out
        while True:
            key = self.value()
            if not isinstance(key, str):
                raise self.error("key is not a string in object")
            self.expect(":", "missing : in object pair")
            out[key] = self.value()
            c = self.peek()
            self.pos += 1
            if c == "}":
                return out
            if c != ",":
                raise self.error("expected separator in dict")
            if self.peek() == "}":
                raise self.error("expecting value")

    def arr(self) -> list[object]:
        self.pos += 1
        out: list[object] = []
        if self.peek() == "]":
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            c = self.peek()
            self.pos += 1
            if c == "]":
                return out
            if c != ",":
                raise self.error("expected separator in list")
            if self.peek() == "]":
                raise self.error("expecting value")

    def string(self) -> str:
        quote = self.text[self.pos]
        self.pos += 1
        out: list[str] = []
        escapes = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
                   "r": "\r", "t": "\t"}  # fmt: skip
        while True:
            if self.pos >= len(self.text):
                raise self.error("premature EOI")
            c = self.text[self.pos]
            self.pos += 1
            if c == quote:
                return "".join(out)
            if c == "\\":
                if self.pos >= len(self.text):
                    raise self.error("premature EOI")
                e = self.text[self.pos]
                self.pos += 1
                if e == "u":
                    digits = self.text[self.pos : self.pos + 4]
                    if len(digits) < 4 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                        raise self.error("invalid escape sequence in string")
                    out.append(chr(int(digits, 16)))
                    self.pos += 4
                elif e in escapes:
                    out.append(escapes[e])
                else:
                    raise self.error("invalid escape sequence in string")
            else:
                out.append(c)

    def number(self) -> int | float:
        start = self.pos
        text = self.text
        if text[self.pos] == "-":
            self.pos += 1
        while self.pos < len(text) and text[self.pos].isdigit():
            self.pos += 1
        is_float = False
        if self.pos < len(text) and text[self.pos] == ".":
            is_float = True
            self.pos += 1
            while self.pos < len(text) and text[self.pos].isdigit():
                self.pos += 1
        if self.pos < len(text) and text[self.pos] in "eE":
            is_float = True
            self.pos += 1
            if self.pos < len(text) and text[self.pos] in "+-":
                self.pos += 1
            while self.pos < len(text) and text[self.pos].isdigit():
                self.pos += 1
        literal = text[start : self.pos]
        try:
            if not is_float:
                number = int(literal)
                if -(2**63) <= number < 2**64:
                    return number
            return float(literal)
        except ValueError:
            raise self.error("expecting value") from None


def parse_json(text: str) -> object:
    """Parse one JSON value in QEMU's dialect (single-quoted strings allowed).

    Raises QapiError: "JSON parse error, premature EOI", "JSON parse error, invalid keyword
    'x'", "Expecting at most one JSON value", and similar.
    """
    return _JsonParser(text).parse_document()
