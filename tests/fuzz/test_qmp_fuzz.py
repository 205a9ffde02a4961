"""QMP monitor fuzz against a running ``parablock daemon``: garbage bytes, messages beyond the 64 MiB
limit (with the daemon's memory watched), nesting beyond 1024, wrong-typed and valid-looking arguments
for every command engine.qapi knows.  After each input the connection gets error replies or is dropped,
an already-connected second client still gets answers, and the daemon never dies or prints a
traceback."""
from __future__ import annotations

import json
import threading
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import qapi
from tests.daemon.conftest import start_daemon
from tests.fuzz.daemon_util import Qmp, assert_alive
from tests.util import needs_qemu, qemu_img

MiB = 1 << 20
SETTINGS = {"derandomize": True, "database": None, "deadline": None,
                "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = tmp_path_factory.mktemp("qmpfuzz")
    qemu_img("create", "-q", "-f", "qcow2", str(d / "a.qcow2"), "4M")
    qemu_img("create", "-q", "-f", "raw", str(d / "r.raw"), "1M")
    q = start_daemon(d, "--blockdev", "driver=qcow2,node-name=n0,file.driver=file,file.filename=a.qcow2",
                     "--blockdev", "driver=raw,node-name=ro,read-only=on,file.driver=file,file.filename=r.raw")
    watcher = Qmp(q.sock)
    yield q, watcher
    watcher.close()
    assert q.stop() == 0
    err = q.proc.stderr.read().decode() if q.proc.stderr else ""
    assert "Traceback" not in err, err


def _check_lines(lines: list[bytes]) -> None:
    for ln in lines:
        m = json.loads(ln)
        assert isinstance(m, dict) and ({"error", "return", "event"} & m.keys()), m
        if "error" in m:
            assert "internal error" not in m["error"]["desc"], m


TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b'"execute"', b'"arguments"',
          b'"id"', b'"query-version"', b'"qmp_capabilities"', b"null", b"true", b"1e999", b"-0", b"nul",
          b"\xff\xfe", b"\x00", b'"\\u0000"', b'"\\ud800"', b"'", b"9" * 40, b'"exec-oob"']
garbage = st.one_of(st.binary(max_size=3000),
                    st.lists(st.sampled_from(TOKENS), max_size=200).map(b"".join))


@needs_qemu
def test_garbage_bytes(daemon):
    d, watcher = daemon

    @settings(max_examples=80, **SETTINGS)
    @given(st.booleans(), garbage)
    def one(negotiate, data):
        c = Qmp(d.sock, negotiate=negotiate)
        try:
            c.send(data)
            _check_lines(c.drain_to_eof())
        finally:
            c.close()
        assert_alive(d, watcher)

    one()


def _rss_tree(pid: int) -> int:
    p = psutil.Process(pid)
    total = p.memory_info().rss
    for k in p.children(recursive=True):
        try:
            total += k.memory_info().rss
        except psutil.Error:
            pass
    return total


@needs_qemu
def test_huge_messages_keep_memory_bounded(daemon):
    d, watcher = daemon
    base = _rss_tree(d.proc.pid)
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], _rss_tree(d.proc.pid))
            except psutil.Error:
                return
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    try:
        c = Qmp(d.sock)
        chunk = b"a" * MiB
        # three messages of 66 MiB each (the limit is 64 MiB): inside a string, as a long array, and as a top-level string
        for head, body, tail in ((b'{"execute": "query-version", "arguments": {"x": "', chunk, b'"}}'),
                                 (b'{"execute": "query-version", "arguments": {"x": [', b"1," * (MiB // 2),
                                  b"1]}}"),
                                 (b'"', chunk, b'"')):
            c.send(head)
            for _ in range(66):
                c.send(body)
            c.send(tail + b'{"execute": "query-version", "id": "after"}')
            m = c.msg()
            assert m["error"]["desc"] == "JSON token size limit exceeded", m
            assert "return" in c.reply("after")
            assert_alive(d, watcher)
        # an endless message with no closing brace: the connection is dropped or stays bounded
        c.send(b'{"x": "')
        for _ in range(100):
            c.send(chunk)
        assert_alive(d, watcher)
        c.close()
    finally:
        stop.set()
        t.join()
    # the 64 MiB buffer of the one message being collected is allowed, not a copy per message
    assert peak[0] - base < 200 * MiB, f"daemon RSS grew by {(peak[0] - base) / MiB:.0f} MiB"
    time.sleep(0.2)
    assert_alive(d, watcher)


@needs_qemu
@pytest.mark.parametrize("depth", [1024, 1025, 5000, 100_000])
def test_deep_nesting(daemon, depth):
    d, watcher = daemon
    c = Qmp(d.sock)
    # arrays, objects and a mix, each followed by a request that must still be answered
    for open_, close_ in ((b"[", b"]"), (b'{"a":', b"}"), (b'[{"a":', b"}]")):
        c.send(b'{"execute": "query-version", "arguments": ' + open_ * depth + b"1" + close_ * depth + b"}")
        c.send(b'{"execute": "query-version", "id": "sync"}')
        while True:
            m = c.msg()
            if m.get("id") == "sync":
                assert "return" in m
                break
            assert "error" in m and "internal error" not in m["error"]["desc"], m
    c.close()
    assert_alive(d, watcher)


def _arg_names(cmd: str) -> list[str]:
    return list(_arg_types(cmd))


def _arg_types(cmd: str) -> dict[str, str]:
    spec = qapi.COMMANDS[cmd]
    if isinstance(spec, str):
        spec = qapi.STRUCTS.get(spec, {})
        if not spec and cmd in qapi.COMMANDS and isinstance(qapi.COMMANDS[cmd], str):
            u = qapi.UNIONS.get(qapi.COMMANDS[cmd])
            spec = getattr(u, "base", {}) if u is not None else {}
            spec = qapi.STRUCTS.get(spec, {}) if isinstance(spec, str) else spec
    return {k.lstrip("*"): v for k, v in spec.items()} if isinstance(spec, dict) else {}


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                      st.sampled_from([0, -1, 1 << 63, (1 << 64) - 1, 1 << 64, 4096, 1.5, float("1e308")]),
                      st.text(max_size=20), st.sampled_from(["n0", "ro", "nope", "", "a.qcow2", "x" * 5000]))
json_any = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                          st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                        max_leaves=12)
COMMANDS = [c for c in qapi.command_names() if c != "quit"]


@st.composite
def command(draw):
    cmd = draw(st.sampled_from(COMMANDS))
    names = _arg_names(cmd)
    keys = draw(st.lists(st.sampled_from(names), unique=True, max_size=len(names))) if names else []
    args = {k: draw(json_any) for k in keys}
    if draw(st.booleans()):
        args.update(draw(st.dictionaries(st.text(max_size=8), json_any, max_size=2)))
    return cmd, args


@needs_qemu
def test_every_command_with_random_typed_arguments(daemon):
    d, watcher = daemon
    c = Qmp(d.sock)
    n = [0]

    @settings(max_examples=400, **SETTINGS)
    @given(command(), st.booleans())
    def one(cmd_args, wrap_arguments):
        cmd, args = cmd_args
        n[0] += 1
        req = {"execute": cmd, "id": n[0]}
        if wrap_arguments or args:
            req["arguments"] = args
        c.send(json.dumps(req).encode())
        m = c.reply(n[0])
        assert "return" in m or "error" in m, m
        if "error" in m:
            assert "internal error" not in m["error"]["desc"], (req, m)
        assert d.proc.poll() is None

    try:
        one()
    finally:
        c.close()
    assert_alive(d, watcher)


NAMES = ["n0", "ro", "nope", "j0", "bm0", "", "#block123", "a" * 200]


def typed_value(t: str) -> st.SearchStrategy:
    """A value that looks right for the schema type ``t`` (sometimes just off)."""
    if t == "str":
        return st.sampled_from(NAMES)
    if t in ("bool",):
        return st.booleans()
    if t in qapi._INTS or t == "int":
        return st.sampled_from([0, 1, -1, 512, 65536, 1 << 31, (1 << 63) - 1, -(1 << 63), 1 << 64])
    if t in qapi.ENUMS:
        return st.sampled_from(qapi.ENUMS[t] + ["bogus"])
    if t.startswith("[") and t.endswith("]"):
        return st.lists(typed_value(t[1:-1]), max_size=3)
    if t in qapi.STRUCTS:
        items = {k.lstrip("*"): v for k, v in qapi.STRUCTS[t].items()}
        return st.fixed_dictionaries({}, optional={k: typed_value(v) for k, v in items.items()
                                                   if v in ("str", "bool", "int") or v in qapi.ENUMS})
    return json_any


@st.composite
def valid_looking_command(draw):
    cmd = draw(st.sampled_from([c for c in COMMANDS if c not in ("blockdev-del", "nbd-server-start")]))
    types = _arg_types(cmd)
    keys = draw(st.lists(st.sampled_from(sorted(types)), unique=True, max_size=len(types))) if types else []
    return cmd, {k: draw(typed_value(types[k])) for k in keys}


@needs_qemu
def test_random_valid_looking_commands(daemon):
    d, watcher = daemon
    c = Qmp(d.sock)
    n = [0]

    @settings(max_examples=250, **SETTINGS)
    @given(valid_looking_command())
    def one(cmd_args):
        cmd, args = cmd_args
        n[0] += 1
        c.send(json.dumps({"execute": cmd, "id": f"v{n[0]}", "arguments": args}).encode())
        m = c.reply(f"v{n[0]}")
        assert "return" in m or "error" in m, m
        if "error" in m:
            assert "internal error" not in m["error"]["desc"], (cmd, args, m)
        assert d.proc.poll() is None

    try:
        one()
    finally:
        c.close()
    assert_alive(d, watcher)


@needs_qemu
def test_every_command_with_each_argument_of_the_wrong_type(daemon):
    """Deterministic sweep: every argument of every command gets every wrong JSON type once."""
    d, watcher = daemon
    c = Qmp(d.sock)
    rid = 0
    for cmd in COMMANDS:
        for name in _arg_names(cmd) or ["bogus"]:
            for value in (None, True, 123, -1, 1.5, "str", [], {}, [1, "a"], {"a": {"b": []}}):
                rid += 1
                c.send(json.dumps({"execute": cmd, "id": rid, "arguments": {name: value}}).encode())
                m = c.reply(rid)
                if "error" in m:
                    assert "internal error" not in m["error"]["desc"], (cmd, name, value, m)
    c.close()
    assert_alive(d, watcher)
