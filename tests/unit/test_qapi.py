"""engine/qapi.py: QMP argument validation, keyval syntax and conversion.

Every expected text in the tables below was checked against qemu-storage-daemon 7.2 (QMP for
``validate``, the command line for keyval); the tests themselves need no QEMU.
"""

# ruff: noqa: E501  (tables of verbatim QEMU texts)
from __future__ import annotations

import pytest

from engine.qapi import (
    QapiError,
    command_names,
    from_keyval,
    keyval_parse,
    parse_json,
    validate,
    visit_json,
)

# (command, arguments, expected desc or None when the arguments are valid)
QMP_CASES = [
    ('block-commit', {'device': 1, 'bogus': 2}, "Invalid parameter type for 'device', expected: string"),
    ('block-commit', {'bogus': 2, 'zzz': 1}, "Parameter 'device' is missing"),
    ('block-commit', {'device': 'x', 'speed': 1.5}, "Invalid parameter type for 'speed', expected: integer"),
    ('block-commit', {'device': 'x', 'speed': 9223372036854775808}, "Invalid parameter type for 'speed', expected: integer"),
    ('block-commit', {'device': 'x', 'speed': 18446744073709551616}, "Invalid parameter type for 'speed', expected: integer"),
    ('block-commit', {'device': 'x', 'speed': '1'}, "Invalid parameter type for 'speed', expected: integer"),
    ('block-commit', {'device': 'x', 'on-error': 1}, "Invalid parameter type for 'on-error', expected: string"),
    ('block-commit', {'device': 'x', 'on-error': 'bogus'}, "Parameter 'on-error' does not accept value 'bogus'"),
    ('block-commit', {'device': 'x', 'on-error': 'auto'}, None),
    ('block-commit', {'device': 'x', 'auto-finalize': 1}, "Invalid parameter type for 'auto-finalize', expected: boolean"),
    ('block-commit', {'device': 'x', 'bottom': 'y'}, "Parameter 'bottom' is unexpected"),
    ('block-commit', None, "Parameter 'device' is missing"),
    ('block-stream', {'device': 'x', 'bottom': 'y'}, None),
    ('blockdev-add', {'driver': 'file', 'node-name': 'a'}, "Parameter 'filename' is missing"),
    ('blockdev-add', {'driver': 'file', 'node-name': 'a', 'filename': 1}, "Invalid parameter type for 'filename', expected: string"),
    ('blockdev-add', {'driver': 'file', 'node-name': 'a', 'filename': '/nonexist', 'bogus': 1}, "Parameter 'bogus' is unexpected"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file'}}, "Parameter 'file.filename' is missing"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file', 'filename': 3}}, "Invalid parameter type for 'file.filename', expected: string"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file', 'filename': '/x', 'zz': 3}}, "Parameter 'file.zz' is unexpected"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file', 'filename': '/x', 'locking': 'zz'}}, "Parameter 'locking' does not accept value 'zz'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 5}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': None}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'qcow2', 'file': 5}}, "Invalid parameter type for 'file', expected: BlockdevRef"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'qcow2', 'file': 'n', 'backing': True}}, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'qcow2', 'file': 'n', 'backing': {'driver': 'file'}}}, "Parameter 'file.backing.filename' is missing"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'qcow2', 'file': 'n', 'backing': {'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 1}}}}, "Invalid parameter type for 'file.backing.file.filename', expected: string"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'backing': 5}, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'backing': None}, None),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'overlap-check': 'bogus'}, "Parameter 'overlap-check' does not accept value 'bogus'"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'overlap-check': 5}, "Invalid parameter type for 'overlap-check', expected: Qcow2OverlapChecks"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'overlap-check': {'template': 'all', 'zz': 1}}, "Parameter 'overlap-check.zz' is unexpected"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'encrypt': {'format': 'zz'}}, "Parameter 'format' does not accept value 'zz'"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'encrypt': {'format': 'luks', 'key-secret': 1}}, "Invalid parameter type for 'encrypt.key-secret', expected: string"),
    ('blockdev-add', {'driver': 'qcow2', 'node-name': 'a', 'file': 'x', 'data-file': 1}, "Invalid parameter type for 'data-file', expected: BlockdevRef"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file', 'filename': '/x', 'cache': 1}}, "Invalid parameter type for 'file.cache', expected: object"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'file', 'filename': '/x', 'cache': {'direct': 1}}}, "Invalid parameter type for 'file.cache.direct', expected: boolean"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [{'event': 'bogus'}]}}, "Parameter 'event' does not accept value 'bogus'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [{'event': 'read_aio', 'errno': 'x'}]}}, "Invalid parameter type for 'file.inject-error[0].errno', expected: integer"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [{'event': 'read_aio'}, {}]}}, "Parameter 'file.inject-error[1].event' is missing"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [{'event': 'read_aio', 'zz': 1}]}}, "Parameter 'file.inject-error[0].zz' is unexpected"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': 5}}, "Invalid parameter type for 'file.inject-error', expected: array"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [5]}}, "Invalid parameter type for 'file.inject-error[0]', expected: object"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'inject-error': [{'event': 'read_aio', 'iotype': 'bogus'}]}}, "Parameter 'iotype' does not accept value 'bogus'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'set-state': [{'event': 'read_aio'}]}}, "Parameter 'file.set-state[0].new_state' is missing"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'take-child-perms': ['zz']}}, "Parameter 'null' does not accept value 'zz'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'take-child-perms': [5]}}, "Invalid parameter type for 'file.take-child-perms[0]', expected: string"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'max-transfer': 1099511627776}}, "Parameter 'max-transfer' expects int32_t"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug', 'image': 'x', 'max-transfer': -2147483649}}, "Parameter 'max-transfer' expects int32_t"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': {'driver': 'blkdebug'}}, "Parameter 'file.image' is missing"),
    ('blockdev-add', {'driver': 5}, "Invalid parameter type for 'driver', expected: string"),
    ('blockdev-add', {}, "Parameter 'driver' is missing"),
    ('blockdev-add', None, "Parameter 'driver' is missing"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'size': -1, 'latency-ns': -1, 'zz': 1}, "Parameter 'zz' is unexpected"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'size': 9223372036854775808}, "Invalid parameter type for 'size', expected: integer"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'latency-ns': 18446744073709551616}, "Parameter 'latency-ns' expects uint64"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'latency-ns': -9223372036854775809}, "Parameter 'latency-ns' expects uint64"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'latency-ns': 'a'}, "Parameter 'latency-ns' expects uint64"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'latency-ns': 1.0}, "Parameter 'latency-ns' expects uint64"),
    ('blockdev-add', {'driver': 'null-co', 'node-name': 'a', 'latency-ns': True}, "Parameter 'latency-ns' expects uint64"),
    ('blockdev-add', {'driver': 'null-aio', 'node-name': 'b', 'read-zeroes': 'on'}, "Invalid parameter type for 'read-zeroes', expected: boolean"),
    ('blockdev-add', {'driver': 'throttle', 'node-name': 'a', 'file': 'x'}, "Parameter 'throttle-group' is missing"),
    ('blockdev-add', {'driver': 'throttle', 'node-name': 'a', 'throttle-group': 1, 'file': 'x'}, "Invalid parameter type for 'throttle-group', expected: string"),
    ('blockdev-add', {'driver': 'copy-on-read', 'node-name': 'a', 'file': 'x', 'bottom': 1}, "Invalid parameter type for 'bottom', expected: string"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 'x', 'cache': {'direct': True, 'no-flush': 'x'}}, "Invalid parameter type for 'cache.no-flush', expected: boolean"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 'x', 'discard': 'zz'}, "Parameter 'discard' does not accept value 'zz'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 'x', 'detect-zeroes': 'zz'}, "Parameter 'detect-zeroes' does not accept value 'zz'"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 5, 'file': 'x'}, "Invalid parameter type for 'node-name', expected: string"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 'x', 'read-only': 'on'}, "Invalid parameter type for 'read-only', expected: boolean"),
    ('blockdev-add', {'driver': 'raw', 'node-name': 'a', 'file': 'x', 'backing': None}, "Parameter 'backing' is unexpected"),
    ('blockdev-add', {'driver': 'vmdk', 'node-name': 'a', 'file': 'x', 'backing': 1}, "Invalid parameter type for 'backing', expected: BlockdevRefOrNull"),
    ('blockdev-reopen', {'options': [{'driver': 'raw'}]}, "Parameter 'options[0].file' is missing"),
    ('blockdev-reopen', {'options': {}}, "Invalid parameter type for 'options', expected: array"),
    ('blockdev-reopen', {'options': [{'driver': 'raw', 'file': 'x', 'zz': 1}]}, "Parameter 'options[0].zz' is unexpected"),
    ('blockdev-del', {}, "Parameter 'node-name' is missing"),
    ('qmp_capabilities', {'enable': ['foo']}, "Parameter 'null' does not accept value 'foo'"),
    ('qmp_capabilities', {'enable': 'foo'}, "Invalid parameter type for 'enable', expected: array"),
    ('block-dirty-bitmap-add', {'node': 'x', 'name': 'y', 'granularity': 4294967296}, "Parameter 'granularity' expects uint32_t"),
    ('block-dirty-bitmap-add', {'node': 'x', 'name': 'y', 'granularity': -1}, "Parameter 'granularity' expects uint32_t"),
    ('block-dirty-bitmap-add', {'node': 'x', 'name': 'y', 'granularity': 'x'}, "Parameter 'granularity' expects uint64"),
    ('block-dirty-bitmap-merge', {'node': 'x', 'target': 'y', 'bitmaps': [1]}, "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ('block-dirty-bitmap-merge', {'node': 'x', 'target': 'y', 'bitmaps': [{'node': 'a'}]}, "Parameter 'bitmaps[0].name' is missing"),
    ('block-dirty-bitmap-merge', {'node': 'x', 'target': 'y', 'bitmaps': 'a'}, "Invalid parameter type for 'bitmaps', expected: array"),
    ('object-add', {'qom-type': 'throttle-group', 'id': 't', 'limits': {'bps-total': 'x'}}, "Invalid parameter type for 'limits.bps-total', expected: integer"),
    ('object-add', {'qom-type': 'throttle-group', 'id': 't', 'limits': {'zz': 1}}, "Parameter 'limits.zz' is unexpected"),
    ('object-add', {'qom-type': 'throttle-group', 'id': 't', 'x-zz': 1}, "Parameter 'x-zz' is unexpected"),
    ('object-add', {'qom-type': 'throttle-group', 'id': 't', 'limits': []}, "Invalid parameter type for 'limits', expected: object"),
    ('object-add', {'qom-type': 'bogus', 'id': 't'}, "Parameter 'qom-type' does not accept value 'bogus'"),
    ('object-add', {'id': 't'}, "Parameter 'qom-type' is missing"),
    ('object-add', {'qom-type': 'throttle-group'}, "Parameter 'id' is missing"),
    ('object-add', {'qom-type': 'throttle-group', 'id': 1}, "Invalid parameter type for 'id', expected: string"),
    ('object-del', {'id': 1}, "Invalid parameter type for 'id', expected: string"),
    ('qom-get', {'path': 'a'}, "Parameter 'property' is missing"),
    ('qom-set', {'path': 'a', 'property': 'b'}, "Parameter 'value' is missing"),
    ('qom-set', {'path': 'nope', 'property': 'b', 'value': [1, {'a': None}]}, None),
    ('query-version', {'a': 1}, "Parameter 'a' is unexpected"),
    ('query-named-block-nodes', {'flat': None}, "Invalid parameter type for 'flat', expected: boolean"),
    ('query-named-block-nodes', {'flat': 1.0}, "Invalid parameter type for 'flat', expected: boolean"),
    ('query-blockstats', {'query-nodes': 1}, "Invalid parameter type for 'query-nodes', expected: boolean"),
    ('nbd-server-start', {'addr': {'type': 'unix', 'data': {}}}, "Parameter 'addr.data.path' is missing"),
    ('nbd-server-start', {'addr': {'type': 'unix', 'path': '/x'}}, "Parameter 'addr.data' is missing"),
    ('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '/run/t/n.sock'}}, 'max-connections': 4294967296}, "Parameter 'max-connections' expects uint32_t"),
    ('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': '/run/t/n.sock'}}, 'max-connections': -1}, "Parameter 'max-connections' expects uint32_t"),
    ('nbd-server-start', {'addr': {'type': 'inet', 'data': {'host': 'h', 'port': 1}}}, "Invalid parameter type for 'addr.data.port', expected: string"),
    ('nbd-server-start', {'addr': {'type': 'inet', 'data': {'host': 'h', 'port': '1', 'to': 70000}}}, "Parameter 'to' expects uint16_t"),
    ('nbd-server-start', {'addr': {'type': 'zz', 'data': {}}}, "Parameter 'type' does not accept value 'zz'"),
    ('nbd-server-start', {'addr': {'data': {}}}, "Parameter 'addr.type' is missing"),
    ('nbd-server-start', {}, "Parameter 'addr' is missing"),
    ('nbd-server-add', {'name': 'x'}, "Parameter 'device' is missing"),
    ('nbd-server-remove', {'name': 'x', 'mode': 'zz'}, "Parameter 'mode' does not accept value 'zz'"),
    ('block-export-add', {'type': 'nbd', 'id': 'e', 'node-name': 'n', 'bitmaps': [{'node': 'a'}]}, "Parameter 'bitmaps[0].name' is missing"),
    ('block-export-add', {'type': 'nbd', 'id': 'e', 'node-name': 'n', 'bitmap': 'b'}, "Parameter 'bitmap' is unexpected"),
    ('block-export-add', {'type': 'nbd', 'id': 'e'}, "Parameter 'node-name' is missing"),
    ('block-export-add', {'type': 'zz', 'id': 'e', 'node-name': 'n'}, "Parameter 'type' does not accept value 'zz'"),
    ('block-export-add', {'type': 'nbd', 'id': 'e', 'node-name': 'n', 'allocation-depth': 'x'}, "Invalid parameter type for 'allocation-depth', expected: boolean"),
    ('block-export-del', {'id': 'e', 'mode': 1}, "Invalid parameter type for 'mode', expected: string"),
    ('transaction', {'actions': [{'type': 'abort', 'data': {'z': 1}}]}, "Parameter 'actions[0].data.z' is unexpected"),
    ('transaction', {'actions': [{'type': 'zz'}]}, "Parameter 'type' does not accept value 'zz'"),
    ('transaction', {'actions': [{'type': 'block-dirty-bitmap-add', 'data': {}}]}, "Parameter 'actions[0].data.node' is missing"),
    ('transaction', {'actions': [{'type': 'abort'}]}, "Parameter 'actions[0].data' is missing"),
    ('transaction', {'actions': [{'type': 'abort', 'data': {}, 'x': 1}]}, "Parameter 'actions[0].x' is unexpected"),
    ('transaction', {'actions': [], 'properties': {'completion-mode': 'zz'}}, "Parameter 'completion-mode' does not accept value 'zz'"),
    ('transaction', {'actions': [{'type': 'blockdev-backup', 'data': {'device': 'd', 'target': 't', 'sync': 'full', 'speed': 'x'}}]}, "Invalid parameter type for 'actions[0].data.speed', expected: integer"),
    ('transaction', {'actions': [{'type': 'drive-backup', 'data': {'device': 'd', 'target': 't', 'sync': 'zz'}}]}, "Parameter 'sync' does not accept value 'zz'"),
    ('transaction', {'actions': [{'type': 'blockdev-snapshot-sync', 'data': {}}]}, "Parameter 'actions[0].data.snapshot-file' is missing"),
    ('transaction', {'actions': [{'type': 'blockdev-snapshot-delete-internal-sync', 'data': {}}]}, "Parameter 'type' does not accept value 'blockdev-snapshot-delete-internal-sync'"),
    ('transaction', {}, "Parameter 'actions' is missing"),
    ('bogus-cmd', {}, ('CommandNotFound', 'The command bogus-cmd has not been found')),
    ('block_resize', {'node-name': 'x', 'size': '1'}, "Invalid parameter type for 'size', expected: integer"),
    ('block_resize', {'node-name': 'x'}, "Parameter 'size' is missing"),
    ('block-job-set-speed', {'device': 'x'}, "Parameter 'speed' is missing"),
    ('block-job-cancel', {'device': 'x', 'force': 'yes'}, "Invalid parameter type for 'force', expected: boolean"),
    ('job-cancel', {'id': 5}, "Invalid parameter type for 'id', expected: string"),
    ('job-dismiss', {}, "Parameter 'id' is missing"),
    ('blockdev-mirror', {'device': 'd', 'target': 't'}, "Parameter 'sync' is missing"),
    ('blockdev-mirror', {'device': 'd', 'target': 't', 'sync': 'full', 'copy-mode': 'zz'}, "Parameter 'copy-mode' does not accept value 'zz'"),
    ('drive-mirror', {'device': 'd', 'target': 't', 'sync': 'full', 'mode': 'zz'}, "Parameter 'mode' does not accept value 'zz'"),
    ('drive-mirror', {'device': 'd', 'target': 't', 'sync': 'full', 'filter-node-name': 'x'}, "Parameter 'filter-node-name' is unexpected"),
    ('drive-backup', {'device': 'd', 'target': 't', 'sync': 'full', 'x-perf': {'max-workers': 'x'}}, "Invalid parameter type for 'x-perf.max-workers', expected: integer"),
    ('blockdev-backup', {'device': 'd', 'target': 't', 'sync': 'full', 'bitmap-mode': 'zz'}, "Parameter 'bitmap-mode' does not accept value 'zz'"),
    ('blockdev-snapshot-delete-internal-sync', {'device': 'd', 'id': 1}, "Invalid parameter type for 'id', expected: string"),
    ('blockdev-snapshot-internal-sync', {'device': 'd'}, "Parameter 'name' is missing"),
    ('blockdev-snapshot', {'node': 'd'}, "Parameter 'overlay' is missing"),
]


@pytest.mark.parametrize(("command", "args", "expected"), QMP_CASES)
def test_validate_matches_qsd(command, args, expected):
    if expected is None:
        validate(command, args)
        return
    with pytest.raises(QapiError) as info:
        validate(command, args)
    if isinstance(expected, tuple):
        assert (info.value.cls, info.value.desc) == expected
    else:
        assert info.value.cls == "GenericError"
        assert info.value.desc == expected


def test_unknown_command():
    with pytest.raises(QapiError) as info:
        validate("bogus-cmd", None)
    assert info.value.cls == "CommandNotFound"
    assert info.value.desc == "The command bogus-cmd has not been found"


def test_validate_returns_copy_without_defaults():
    args = {"job-id": "j", "device": "top", "speed": 0}
    out = validate("block-commit", args)
    assert out == args and out is not args
    assert "on-error" not in out and "auto-finalize" not in out


def test_validate_nested_union_and_alternates():
    args = {
        "driver": "qcow2",
        "node-name": "top",
        "file": {"driver": "file", "filename": "/i/top.qcow2", "cache": {"direct": True}},
        "backing": None,
        "overlap-check": "none",
    }
    assert validate("blockdev-add", args) == args
    chained = {"driver": "raw", "node-name": "r", "file": "r-file"}
    assert validate("blockdev-add", chained) == chained


def test_uint64_negative_wraps_like_qemu():
    out = validate("blockdev-add", {"driver": "null-co", "node-name": "n", "latency-ns": -1})
    assert out["latency-ns"] == 2**64 - 1


def test_open_union_cases_pass_through():
    args = {"driver": "nbd", "node-name": "n", "server": {"type": "unix", "path": "/s"}}
    assert validate("blockdev-add", args) == args


def test_transaction_actions():
    args = {
        "actions": [
            {"type": "block-dirty-bitmap-add", "data": {"node": "n", "name": "b0"}},
            {"type": "blockdev-backup", "data": {"device": "d", "target": "t", "sync": "full"}},
            {"type": "abort", "data": {}},
        ],
        "properties": {"completion-mode": "grouped"},
    }
    assert validate("transaction", args) == args


def test_command_names_cover_the_daemon_surface():
    names = command_names()
    for name in ("qmp_capabilities", "blockdev-add", "block-commit", "transaction",
                 "block-export-add", "job-dismiss", "block_resize", "query-block-exports"):
        assert name in names
    assert "blockdev-create" not in names
    assert len(names) == len(set(names))


# ---- keyval syntax ------------------------------------------------------------------------

KEYVAL_OK = [
    ("a=1,b=2", None, {"a": "1", "b": "2"}),
    ("a=1,", None, {"a": "1"}),
    ("", None, {}),
    ("a=x,,y", None, {"a": "x,y"}),
    ("a=x,,", None, {"a": "x,"}),
    ("a=", None, {"a": ""}),
    ("a=1,a=2", None, {"a": "2"}),
    ("a.b=1,a.c.d=2", None, {"a": {"b": "1", "c": {"d": "2"}}}),
    ("a.1=x,a.0=y", None, {"a": ["y", "x"]}),
    ("a.0.b=1,a.1.b=2", None, {"a": [{"b": "1"}, {"b": "2"}]}),
    ("null-co,node-name=n", "driver", {"driver": "null-co", "node-name": "n"}),
    ("driver=x,node-name=n", "driver", {"driver": "x", "node-name": "n"}),
    ("null-co,driver=null-aio", "driver", {"driver": "null-aio"}),
    ("a_b=1", None, {"a_b": "1"}),
    ("__com.redhat_x=1", None, {"__com.redhat_x": "1"}),
    ("a=b=c", None, {"a": "b=c"}),
]


@pytest.mark.parametrize(("text", "implied", "expected"), KEYVAL_OK)
def test_keyval_parse(text, implied, expected):
    assert keyval_parse(text, implied) == expected


KEYVAL_ERRORS = [
    ("null-co,node-name", "driver", "Expected '=' after parameter 'node-name'"),
    ("driver=null-co,null-aio", "driver", "Expected '=' after parameter 'null-aio'"),
    ("null-co,,x,node-name=a", "driver", "Invalid parameter ''"),
    (",node-name=a", "driver", "Invalid parameter ''"),
    ("=x", None, "Invalid parameter ''"),
    ("a..b=x", None, "Invalid parameter 'a..b'"),
    (".a=x", None, "Invalid parameter '.a'"),
    ("a.=x", None, "Invalid parameter 'a.'"),
    ("a b=x", None, "Invalid parameter 'a b'"),
    ("1=x", None, "Invalid parameter '1'"),
    ("a.1=x,a.b=y", None, "Parameters 'a.*' used inconsistently"),
    ("a.b=1,a.0=2", None, "Parameters 'a.*' used inconsistently"),
    ("a.0.b=1,a.0.0=2", None, "Parameters 'a.0.*' used inconsistently"),
    ("cache.direct=on,cache=x", None, "Parameters 'cache.*' used inconsistently"),
    ("cache=x,cache.direct=on", None, "Parameters 'cache.*' used inconsistently"),
    ("a.0=x,a.2=y", None, "Parameter 'a.1' missing"),
    ("a" * 128 + "=1", None, f"Parameter '{'a' * 128}' is too long"),
    ("x." + "a" * 128 + "=1", None, f"Parameter fragment '{'a' * 128}' is too long"),
    ("help", "driver", "Help is not available for this option"),
    ("null-co,help", "driver", "Help is not available for this option"),
    ("?", "driver", "Help is not available for this option"),
]


@pytest.mark.parametrize(("text", "implied", "expected"), KEYVAL_ERRORS)
def test_keyval_parse_errors(text, implied, expected):
    with pytest.raises(QapiError) as info:
        keyval_parse(text, implied)
    assert info.value.desc == expected


# ---- keyval conversion --------------------------------------------------------------------

def _kv(type_name, text, implied):
    return from_keyval(type_name, keyval_parse(text, implied))


CONVERT_OK = [
    ("BlockdevOptions", "null-co,node-name=a,size=0x10", {"driver": "null-co", "node-name": "a", "size": 16}),
    ("BlockdevOptions", "null-co,node-name=a,size=010", {"driver": "null-co", "node-name": "a", "size": 8}),
    ("BlockdevOptions", "null-co,node-name=a,size= 1", {"driver": "null-co", "node-name": "a", "size": 1}),
    ("BlockdevOptions", "null-co,node-name=a,size=-1", {"driver": "null-co", "node-name": "a", "size": -1}),
    ("BlockdevOptions", "null-co,node-name=a,latency-ns=-1", {"driver": "null-co", "node-name": "a", "latency-ns": 2**64 - 1}),
    ("BlockdevOptions", "null-co,node-name=a,read-zeroes=y", {"driver": "null-co", "node-name": "a", "read-zeroes": True}),
    ("BlockdevOptions", "null-co,node-name=a,read-zeroes=no", {"driver": "null-co", "node-name": "a", "read-zeroes": False}),
    ("BlockdevOptions", "raw,node-name=r,file=f0", {"driver": "raw", "node-name": "r", "file": "f0"}),
    ("BlockdevOptions", "qcow2,node-name=q,file=f,backing=", {"driver": "qcow2", "node-name": "q", "file": "f", "backing": ""}),
    ("BlockdevOptions", "raw,node-name=r,file.driver=file,file.filename=/i,,x,cache.direct=on",
     {"driver": "raw", "node-name": "r", "file": {"driver": "file", "filename": "/i,x"}, "cache": {"direct": True}}),
    ("BlockdevOptions",
     "raw,node-name=r,file.driver=blkdebug,file.image=i,file.inject-error.0.event=read_aio,"
     "file.inject-error.0.errno=5,file.inject-error.0.once=on,file.set-state.0.event=write_aio,"
     "file.set-state.0.new_state=2,file.take-child-perms.0=write",
     {"driver": "raw", "node-name": "r", "file": {
         "driver": "blkdebug", "image": "i",
         "inject-error": [{"event": "read_aio", "errno": 5, "once": True}],
         "set-state": [{"event": "write_aio", "new_state": 2}],
         "take-child-perms": ["write"]}}),
    ("ObjectOptions", "throttle-group,id=tg0,limits.bps-total=1000",
     {"qom-type": "throttle-group", "id": "tg0", "limits": {"bps-total": 1000}}),
    ("ObjectOptions", "throttle-group,id=tg0,x-bps-total=1000",
     {"qom-type": "throttle-group", "id": "tg0", "x-bps-total": 1000}),
    ("MonitorOptions", "m0,mode=control,pretty=on", {"chardev": "m0", "mode": "control", "pretty": True}),
    ("BlockExportOptions", "nbd,id=e,node-name=n,writable=on,bitmaps.0=b0,bitmaps.1.node=n,bitmaps.1.name=b1",
     {"type": "nbd", "id": "e", "node-name": "n", "writable": True,
      "bitmaps": ["b0", {"node": "n", "name": "b1"}]}),
]


@pytest.mark.parametrize(("type_name", "text", "expected"), CONVERT_OK)
def test_from_keyval(type_name, text, expected):
    implied = {"BlockdevOptions": "driver", "ObjectOptions": "qom-type",
               "MonitorOptions": "chardev", "BlockExportOptions": "type"}[type_name]
    assert _kv(type_name, text, implied) == expected


def test_nbd_server_keyval_has_no_implied_key():
    out = _kv("NbdServerOptions", "addr.type=inet,addr.host=::1,addr.port=10809,max-connections=4", None)
    assert out == {"addr": {"type": "inet", "host": "::1", "port": "10809"}, "max-connections": 4}


CONVERT_ERRORS = [
    ("BlockdevOptions", "null-co,node-name=a,size=1k", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=a,size=1 ", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=a,size=", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=a,size=9223372036854775808", "Parameter 'size' expects integer"),
    ("BlockdevOptions", "null-co,node-name=a,latency-ns=abc", "Parameter 'latency-ns' expects integer"),
    ("BlockdevOptions", "null-co,node-name=a,read-zeroes=maybe", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=a,read-zeroes=", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=a,read-zeroes=ON", "Parameter 'read-zeroes' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=a,cache.direct=x", "Parameter 'cache.direct' expects 'on' or 'off'"),
    ("BlockdevOptions", "null-co,node-name=a,cache.zz=on", "Parameter 'cache.zz' is unexpected"),
    ("BlockdevOptions", "null-co,node-name.x=1", "Parameters 'node-name.*' are unexpected"),
    ("BlockdevOptions", "null-co,node-name=n,cache.direct.x=1", "Parameters 'cache.direct.*' are unexpected"),
    ("BlockdevOptions", "node-name=a", "Parameter 'driver' is missing"),
    ("BlockdevOptions", "zz", "Parameter 'driver' does not accept value 'zz'"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=blkdebug,file.image=i,file.inject-error.0.event=read_aio,"
     "file.inject-error.0.errno=x", "Parameter 'file.inject-error.0.errno' expects integer"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=blkdebug,file.image=i,file.inject-error.0.event=read_aio,"
     "file.inject-error.1.zz=1", "Parameter 'file.inject-error.1.event' is missing"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=blkdebug,file.image=i,file.inject-error=x",
     "Invalid parameter type for 'file.inject-error', expected: array"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=blkdebug,file.image=i,file.take-child-perms.0=zz",
     "Parameter 'null' does not accept value 'zz'"),
    ("BlockdevOptions", "raw,node-name=r,file.driver=blkdebug,file.image=i,file.max-transfer=99999999999",
     "Parameter 'max-transfer' expects int32_t"),
    ("ObjectOptions", "throttle-group,id=tg0,limits.bps-total=1k", "Parameter 'limits.bps-total' expects integer"),
    ("ObjectOptions", "throttle-group,id=tg0,limits=x", "Invalid parameter type for 'limits', expected: object"),
    ("ObjectOptions", "throttle-group", "Parameter 'id' is missing"),
    ("ObjectOptions", "id=x", "Parameter 'qom-type' is missing"),
    ("MonitorOptions", "", "Parameter 'chardev' is missing"),
    ("MonitorOptions", "c,mode=bogus", "Parameter 'mode' does not accept value 'bogus'"),
    ("BlockExportOptions", "nbd,id=e,node-name=n,bitmap=b", "Parameter 'bitmap' is unexpected"),
    ("BlockExportOptions", "nbd,id=e,node-name=n,bitmaps.0.node=a", "Parameter 'bitmaps.0.name' is missing"),
]


@pytest.mark.parametrize(("type_name", "text", "expected"), CONVERT_ERRORS)
def test_from_keyval_errors(type_name, text, expected):
    implied = {"BlockdevOptions": "driver", "ObjectOptions": "qom-type",
               "MonitorOptions": "chardev", "BlockExportOptions": "type"}[type_name]
    with pytest.raises(QapiError) as info:
        _kv(type_name, text, implied)
    assert info.value.desc == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("addr.type=unix", "Parameter 'addr.path' is missing"),
        ("addr.type=zz", "Parameter 'type' does not accept value 'zz'"),
        ("addr.path=/x", "Parameter 'addr.type' is missing"),
        ("addr.type=unix,addr.path=/s,max-connections=x", "Parameter 'max-connections' expects integer"),
        ("addr.type=unix,addr.path=/s,max-connections=4294967296", "Parameter 'max-connections' expects uint32_t"),
        ("addr.type=unix,addr.path=/s,max-connections=-1", "Parameter 'max-connections' expects uint32_t"),
        ("addr.type=inet,addr.host=h,addr.port=0,addr.to=70000", "Parameter 'to' expects uint16_t"),
        ("addr.type=inet,addr.host=h,addr.port=0,addr.to=x", "Parameter 'addr.to' expects integer"),
    ],
)
def test_nbd_server_keyval_errors(text, expected):
    with pytest.raises(QapiError) as info:
        _kv("NbdServerOptions", text, None)
    assert info.value.desc == expected


def test_from_keyval_refuses_non_cmdline_types():
    with pytest.raises(ValueError):
        from_keyval("BlockDirtyBitmap", {})


# ---- JSON dialect -------------------------------------------------------------------------

def test_json_and_keyval_forms_agree():
    text = "raw,node-name=r,read-only=on,file.driver=file,file.filename=/i/x,file.aio-max-batch=4"
    as_json = visit_json("BlockdevOptions", parse_json(
        '{"driver": "raw", "node-name": "r", "read-only": true,'
        ' "file": {"driver": "file", "filename": "/i/x", "aio-max-batch": 4}}'))
    assert _kv("BlockdevOptions", text, "driver") == as_json


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{'driver': 'null-co', 'node-name': 'q'}", {"driver": "null-co", "node-name": "q"}),
        ('{"a": [1, -0, 1.5, 18446744073709551615, 18446744073709551616, true, null]}',
         {"a": [1, 0, 1.5, 18446744073709551615, 1.8446744073709552e19, True, None]}),
        ('{"s": "a\\u00e9\\n\\\'"}', {"s": "a\u00e9\n\'"}),
    ],
)
def test_parse_json(text, expected):
    assert parse_json(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{bad json", "JSON parse error, invalid keyword 'bad'"),
        ('{"a":', "JSON parse error, premature EOI"),
        ('{"a":1,}', "JSON parse error, expecting value"),
        ('{"a":1} x', "Expecting at most one JSON value"),
        ('{"a":1}{}', "Expecting at most one JSON value"),
    ],
)
def test_parse_json_errors(text, expected):
    with pytest.raises(QapiError) as info:
        parse_json(text)
    assert info.value.desc == expected


def test_json_float_is_not_an_integer():
    with pytest.raises(QapiError) as info:
        visit_json("BlockdevOptions", parse_json('{"driver":"null-co","node-name":"q","size":1e3}'))
    assert info.value.desc == "Invalid parameter type for 'size', expected: integer"
