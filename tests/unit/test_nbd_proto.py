"""ipc/nbd.py, the NBD protocol sans I/O: handshake, option parsing and replies, transmission framing,
request checks, limits, and the fuzz rule (garbage yields events or NbdProtocolError, never a crash)."""
from __future__ import annotations

import struct

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from ipc import nbd as P


def opt(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", P.IHAVEOPT, code, len(data)) + data


def info_payload(name: str, *reqs: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def meta_payload(export: str, *queries: str) -> bytes:
    raw = export.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def request(typ: int, handle: int = 1, offset: int = 0, length: int = 0, flags: int = 0,
            magic: int = P.REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, typ, handle, offset, length)


def events(conn: P.ServerConnection) -> list[object]:
    out = []
    while True:
        ev = conn.next_event()
        if ev is P.NEED_DATA:
            return out
        out.append(ev)


def negotiated(flags: int = 3) -> P.ServerConnection:
    c = P.ServerConnection()
    c.initiate()
    c.receive_data(struct.pack(">I", flags))
    assert events(c) == []
    assert c.phase is P.Phase.OPTIONS
    return c


def in_transmission(structured: bool = True) -> P.ServerConnection:
    c = negotiated()
    if structured:
        c.reply_ack(P.Opt.STRUCTURED_REPLY)
    c.go()
    return c


# ------------------------------------------------------------------------------------- handshake
def test_greeting_is_fixed_newstyle_with_no_zeroes():
    c = P.ServerConnection()
    g = c.initiate()
    assert g == b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3)
    with pytest.raises(P.NbdStateError, match="cannot accept verb 'initiate'"):
        c.initiate()


def test_unknown_client_flags_are_a_protocol_error():
    c = P.ServerConnection()
    c.initiate()
    c.receive_data(b"\xff\xff\xff\xff")
    with pytest.raises(P.NbdProtocolError, match="Unknown client flags"):
        c.next_event()
    assert c.phase is P.Phase.CLOSED


def test_bad_option_magic_drops():
    c = negotiated()
    c.receive_data(struct.pack(">QII", 0x1234, P.Opt.GO, 0))
    with pytest.raises(P.NbdProtocolError, match="option magic"):
        c.next_event()


def test_options_parse_into_events_even_byte_by_byte():
    stream = (opt(P.Opt.STRUCTURED_REPLY) + opt(P.Opt.LIST)
              + opt(P.Opt.LIST_META_CONTEXT, meta_payload("exp", "qemu:", "base:allocation"))
              + opt(P.Opt.SET_META_CONTEXT, meta_payload("exp"))
              + opt(P.Opt.INFO, info_payload("exp", P.Info.NAME, P.Info.BLOCK_SIZE))
              + opt(P.Opt.GO, info_payload("")) + opt(99, b"xyz"))
    want = [P.OptStructuredReply(), P.OptList(),
            P.OptMetaContext(False, "exp", ("qemu:", "base:allocation")), P.OptMetaContext(True, "exp", ()),
            P.OptInfo(False, "exp", (P.Info.NAME, P.Info.BLOCK_SIZE)), P.OptInfo(True, "", ()),
            P.OptUnsupported(99)]
    whole = negotiated()
    whole.receive_data(stream)
    assert events(whole) == want
    bytewise = negotiated()
    got = []
    for i in range(len(stream)):
        bytewise.receive_data(stream[i:i + 1])
        got += events(bytewise)
    assert got == want


@pytest.mark.parametrize("code,data,msg", [
    (P.Opt.GO, struct.pack(">I", 10) + b"abc", "too short"),
    (P.Opt.GO, info_payload("a") + b"x", "trailing"),
    (P.Opt.INFO, struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0), "UTF-8"),
    (P.Opt.LIST, b"x", "payload"),
    (P.Opt.STRUCTURED_REPLY, b"x", "payload"),
    (P.Opt.SET_META_CONTEXT, meta_payload("e")[:-2], "too short"),
    (P.Opt.GO, struct.pack(">I", 5000) + b"a" * 5000 + struct.pack(">H", 0), "too long"),
])
def test_malformed_options_are_invalid(code, data, msg):
    c = negotiated()
    c.receive_data(opt(code, data))
    (ev,) = events(c)
    assert isinstance(ev, P.OptInvalid) and ev.opt == code and msg in ev.message and not ev.too_big


def test_oversized_option_is_skipped_then_too_big():
    c = negotiated()
    big = P.MAX_OPTION_LENGTH + 10
    c.receive_data(struct.pack(">QII", P.IHAVEOPT, P.Opt.SET_META_CONTEXT, big) + b"q" * 1000)
    assert events(c) == []
    c.receive_data(b"q" * (big - 1000) + opt(P.Opt.LIST))
    assert events(c) == [P.OptInvalid(P.Opt.SET_META_CONTEXT, "option too long", too_big=True), P.OptList()]


def test_oversized_export_name_drops():
    c = negotiated()
    c.receive_data(struct.pack(">QII", P.IHAVEOPT, P.Opt.EXPORT_NAME, P.MAX_OPTION_LENGTH + 1))
    with pytest.raises(P.NbdProtocolError):
        c.next_event()


def test_non_fixed_client_is_dropped_on_unknown_option():
    c = negotiated(flags=0)
    c.receive_data(opt(77))
    with pytest.raises(P.NbdProtocolError, match="non-fixed"):
        c.next_event()


def test_export_name_reply_zero_padding():
    for flags, size in ((3, 10), (1, 134)):
        c = negotiated(flags)
        c.receive_data(opt(P.Opt.EXPORT_NAME, b"disk"))
        assert events(c) == [P.OptExportName("disk")]
        out = c.export_name_reply(1 << 20, 0x43)
        assert len(out) == size and out[:10] == struct.pack(">QH", 1 << 20, 0x43)
        assert c.phase is P.Phase.TRANSMISSION


def test_option_replies_layout():
    c = negotiated()
    r = c.reply_info_export(P.Opt.GO, 4096, 0x0D6D)
    assert r == struct.pack(">QIII", P.OPTION_REPLY_MAGIC, 7, P.Rep.INFO, 12) + struct.pack(">HQH", 0, 4096, 0xD6D)
    r = c.reply_info_block_size(P.Opt.GO, 1, 4096, 32 << 20)
    assert r[-14:] == struct.pack(">HIII", 3, 1, 4096, 32 << 20)
    r = c.reply_error(P.Opt.INFO, P.Rep.ERR_UNKNOWN, "no")
    assert struct.unpack(">QIII", r[:20]) == (P.OPTION_REPLY_MAGIC, 6, 0x80000006, 2) and r[20:] == b"no"
    r = c.reply_server(P.Opt.LIST, "ab", "desc")
    assert r[20:] == struct.pack(">I", 2) + b"abdesc"
    r = c.reply_meta_context(P.Opt.SET_META_CONTEXT, 3, "base:allocation")
    assert r[20:] == struct.pack(">I", 3) + b"base:allocation"
    assert not c.structured
    c.reply_ack(P.Opt.STRUCTURED_REPLY)
    assert c.structured
    out = c.go()
    assert struct.unpack(">QIII", out) == (P.OPTION_REPLY_MAGIC, 7, 1, 0)
    assert c.phase is P.Phase.TRANSMISSION
    with pytest.raises(P.NbdStateError, match="phase 'transmission' cannot accept verb 'option-reply'"):
        c.reply_ack(P.Opt.LIST)


def test_abort_closes():
    c = negotiated()
    c.receive_data(opt(P.Opt.ABORT))
    assert events(c) == [P.OptAbort()]
    assert struct.unpack(">QIII", c.abort())[2] == P.Rep.ACK
    assert c.phase is P.Phase.CLOSED
    c.receive_data(b"garbage")
    assert c.next_event() is P.NEED_DATA


# ---------------------------------------------------------------------------------- transmission
def test_requests_and_write_payload():
    c = in_transmission()
    stream = request(P.Cmd.READ, 7, 512, 4096) + request(P.Cmd.WRITE, 8, 0, 5) + b"hello" + \
        request(P.Cmd.BLOCK_STATUS, 9, 0, 100, flags=P.CmdFlags.REQ_ONE) + request(P.Cmd.DISC, 10)
    c.receive_data(stream[:40])
    got = events(c)
    assert got == [P.Request(0, P.Cmd.READ, 7, 512, 4096)]
    c.receive_data(stream[40:])
    assert events(c) == [P.Request(0, P.Cmd.WRITE, 8, 0, 5, b"hello"),
                         P.Request(P.CmdFlags.REQ_ONE, P.Cmd.BLOCK_STATUS, 9, 0, 100),
                         P.Request(0, P.Cmd.DISC, 10, 0, 0)]


def test_bad_request_magic_and_oversized_write_drop():
    c = in_transmission()
    c.receive_data(request(P.Cmd.READ, magic=0xDEADBEEF))
    with pytest.raises(P.NbdProtocolError, match="request magic"):
        c.next_event()
    c = in_transmission()
    c.receive_data(request(P.Cmd.WRITE, length=P.MAX_BUFFER_SIZE + 1))
    with pytest.raises(P.NbdProtocolError, match="larger than max len"):
        c.next_event()
    # an oversized READ is a request (answered EINVAL), not a framing error
    c = in_transmission()
    c.receive_data(request(P.Cmd.READ, length=P.MAX_BUFFER_SIZE + 1))
    (ev,) = events(c)
    msg = f"len ({P.MAX_BUFFER_SIZE + 1}) is larger than max len ({P.MAX_BUFFER_SIZE})"
    assert P.check_request(ev, 1 << 40, True, True, 1) == (P.NBD_EINVAL, msg)


def test_reply_layouts():
    c = in_transmission()
    assert c.simple_reply(5, 0, b"ab") == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 0, 5) + b"ab"
    assert c.chunk_none(5) == struct.pack(">IHHQI", P.STRUCTURED_REPLY_MAGIC, 1, 0, 5, 0)
    assert c.chunk_data(5, 1024, b"xy", False) == struct.pack(">IHHQI", P.STRUCTURED_REPLY_MAGIC, 0, 1, 5, 10) + \
        struct.pack(">Q", 1024) + b"xy"
    assert c.chunk_hole(5, 0, 512, True)[20:] == struct.pack(">QI", 0, 512)
    bs = c.chunk_block_status(5, 2, [(4096, 3), (512, 0)], True)
    assert struct.unpack(">IHHQI", bs[:20])[1:] == (1, 5, 5, 20)
    assert bs[20:] == struct.pack(">IIIII", 2, 4096, 3, 512, 0)
    err = c.error_reply(5, P.NBD_EPERM, "ro")
    assert struct.unpack(">IHHQI", err[:20])[1:3] == (1, P.Chunk.ERROR) and err[20:] == struct.pack(">IH", 1, 2) + b"ro"
    plain = in_transmission(structured=False)
    assert plain.error_reply(6, P.NBD_EINVAL) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, 22, 6)
    with pytest.raises(P.NbdStateError, match="structured"):
        plain.chunk_none(6)


@pytest.mark.parametrize("req,writable,structured,ctx,want", [
    (P.Request(0, P.Cmd.READ, 1, 0, 512), False, False, 0, None),
    (P.Request(0, P.Cmd.WRITE, 1, 0, 512), False, True, 0, P.NBD_EPERM),
    (P.Request(0, P.Cmd.TRIM, 1, 0, 512), False, True, 0, P.NBD_EPERM),
    (P.Request(0, P.Cmd.WRITE_ZEROES, 1, 0, 512), True, True, 0, None),
    (P.Request(0, P.Cmd.READ, 1, 4096, 1), True, True, 0, P.NBD_EINVAL),
    (P.Request(0, P.Cmd.READ, 1, 1 << 62, 1), True, True, 0, P.NBD_EINVAL),
    (P.Request(P.CmdFlags.DF, P.Cmd.READ, 1, 0, 1), True, False, 0, P.NBD_EINVAL),
    (P.Request(P.CmdFlags.DF, P.Cmd.READ, 1, 0, 1), True, True, 0, None),
    (P.Request(P.CmdFlags.REQ_ONE, P.Cmd.READ, 1, 0, 1), True, True, 0, P.NBD_EINVAL),
    (P.Request(P.CmdFlags.NO_HOLE, P.Cmd.WRITE_ZEROES, 1, 0, 1), True, True, 0, None),
    (P.Request(0, P.Cmd.BLOCK_STATUS, 1, 0, 1), True, True, 0, P.NBD_EINVAL),
    (P.Request(0, P.Cmd.BLOCK_STATUS, 1, 0, 0), True, True, 1, P.NBD_EINVAL),
    (P.Request(P.CmdFlags.REQ_ONE, P.Cmd.BLOCK_STATUS, 1, 0, 4096), True, True, 1, None),
    (P.Request(0, 42, 1, 0, 0), True, True, 1, P.NBD_EINVAL),
    (P.Request(1 << 7, P.Cmd.WRITE, 1, 0, 1), True, True, 0, P.NBD_EINVAL),
    (P.Request(0, P.Cmd.FLUSH, 1, 1 << 40, 0), True, True, 0, None),
])
def test_check_request(req, writable, structured, ctx, want):
    res = P.check_request(req, 4096, writable, structured, ctx)
    assert (res[0] if res else None) == want


def test_meta_context_matching():
    avail = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"]
    assert P.match_meta_contexts([], avail, True) == avail
    assert P.match_meta_contexts([], avail, False) == []
    assert P.match_meta_contexts(["qemu:dirty-bitmap:"], avail, True) == avail[2:]
    assert P.match_meta_contexts(["qemu:dirty-bitmap:"], avail, False) == []
    assert P.match_meta_contexts(["qemu:"], avail, True) == avail[1:]
    assert P.match_meta_contexts(["qemu:dirty-bitmap:b", "base:allocation", "nope:x"], avail, False) == \
        ["base:allocation", "qemu:dirty-bitmap:b"]


def test_errno_mapping():
    import errno

    assert P.nbd_errno(errno.EACCES) == P.NBD_EPERM
    assert P.nbd_errno(errno.ENOSPC) == P.NBD_ENOSPC
    assert P.nbd_errno(errno.ENOTSUP) == P.NBD_ENOTSUP
    assert P.nbd_errno(errno.ENOENT) == P.NBD_EINVAL
    assert P.nbd_errno(None) == P.NBD_EIO


# ------------------------------------------------------------------------------------------- fuzz
@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20), st.sampled_from([0, 1, 2]))
def test_garbage_never_crashes(chunks, start):
    """Any input yields events or NbdProtocolError; the connection never raises anything else."""
    c = P.ServerConnection()
    c.initiate()
    prefix = [b"", struct.pack(">I", 3), struct.pack(">I", 3)][start]
    if start == 2:
        c.receive_data(prefix)
        events(c)
        c.reply_ack(P.Opt.STRUCTURED_REPLY)
        c.go()
        prefix = b""
    try:
        c.receive_data(prefix)
        for chunk in chunks:
            c.receive_data(chunk)
            for ev in events(c):
                assert isinstance(ev, (P.Request, P.OptExportName, P.OptAbort, P.OptList, P.OptInfo,
                                       P.OptStructuredReply, P.OptMetaContext, P.OptUnsupported, P.OptInvalid))
    except P.NbdProtocolError:
        assert c.phase is P.Phase.CLOSED


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 12), st.binary(max_size=200))
def test_any_option_payload_parses(code, data):
    ev = P.parse_option(code, data)
    assert ev is not None
