"""``parablock io``: a qemu-io compatible exerciser for scripts and tests.

Each ``-c`` string is one qemu-io command line.  The commands print what qemu-io 7.2 prints, byte for
byte except for the timing numbers: ``read``/``write``/``discard`` report "read N/N bytes at offset O"
and qemu's statistics line, ``map`` lists allocation runs of the top image, ``info`` dumps the format
specific information in qemu's (hash-table) key order, ``abort`` crashes the process without closing the
image.  Options inside a command are parsed like GNU getopt (permuting), numbers like qemu_strtosz.
The exit status is 1 if any command failed, as qemu-io's.

Layer: engine.cli (composition root).
"""
from __future__ import annotations

import errno as _errno
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import click

from engine.block import is_allocated_above
from engine.cli.common import PROG, CliExit, cache_options, make_executor
from engine.driver import BlockDriver, probe_format
from engine.errors import BlockError, os_error_text
from engine.image import open_image
from engine.cli.main import cli

BDRV_REQUEST_MAX_BYTES = 2147483136
INT64_MAX = (1 << 63) - 1
U64_MAX = (1 << 64) - 1
SECTOR = 512


# --------------------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------------------
class _CStdout:
    """stdout buffered the way C stdio buffers it: line-buffered on a terminal, otherwise in 4 KiB blocks.

    qemu-io's ``abort`` loses whatever is still buffered; so does ours, whatever PYTHONUNBUFFERED says.
    """

    BUFSIZ = 4096

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.size = 0
        self.tty: bool | None = None

    def write(self, text: str) -> None:
        if self.tty is None:
            try:
                self.tty = sys.stdout.isatty()
            except (AttributeError, ValueError):
                self.tty = False
        self.parts.append(text)
        self.size += len(text)
        if self.size >= self.BUFSIZ or (self.tty and "\n" in text):
            self.flush()

    def flush(self) -> None:
        if self.parts:
            sys.stdout.write("".join(self.parts))
            self.parts.clear()
            self.size = 0
        sys.stdout.flush()

    def discard(self) -> None:
        self.parts.clear()
        self.size = 0


_stdout = _CStdout()


def out(text: str) -> None:
    _stdout.write(text)


def err(text: str) -> None:
    """stderr is unbuffered (and, as in C, does not flush stdout first)."""
    sys.stderr.write(text)
    sys.stderr.flush()


def error_report(msg: str) -> None:
    err(f"{PROG}: {msg}\n")


def strerror(code: int) -> str:
    return os.strerror(code)


class CmdFailed(Exception):
    """A command ended with a negative errno (already reported)."""

    def __init__(self, code: int = _errno.EINVAL) -> None:
        super().__init__(code)
        self.code = code


def io_errno(exc: BaseException) -> int:
    if isinstance(exc, BlockError):
        return exc.errno or _errno.EIO
    if isinstance(exc, OSError):
        return exc.errno or _errno.EIO
    return _errno.EIO


# --------------------------------------------------------------------------------------------------
# qemu's number parsing and rendering
# --------------------------------------------------------------------------------------------------
_SPACE = " \t\n\v\f\r"
_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def _strtoull(s: str, pos: int, base: int) -> tuple[int, int, int]:
    """C strtoull from ``pos``: (value, end index, error); error is 0, EINVAL (no digits) or ERANGE."""
    i = pos
    while i < len(s) and s[i] in _SPACE:
        i += 1
    neg = False
    if i < len(s) and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    digits = "0123456789abcdef"[:base]
    if base == 16 and s[i:i + 2].lower() == "0x" and i + 2 < len(s) and s[i + 2].lower() in digits:
        i += 2
    start = i
    while i < len(s) and s[i].lower() in digits:
        i += 1
    if i == start:
        return 0, pos, _errno.EINVAL
    value = int(s[start:i], base)
    if value > U64_MAX:
        return U64_MAX, i, _errno.ERANGE
    if neg:
        value = (-value) & U64_MAX
    return value, i, 0


def qemu_strtosz(s: str) -> tuple[int, int]:
    """qemu 7.2's qemu_strtosz (whole string): (value, 0) or (0, -errno); warns for hex with suffix."""
    val, end, e = _strtoull(s, 0, 10)
    if e:
        return 0, -(_errno.EINVAL if e == _errno.EINVAL or end < len(s) else e)
    if "-" in s[:end]:
        return 0, -_errno.EINVAL
    hexnum = False
    valf = 0
    if val == 0 and end < len(s) and s[end] in "xX":
        val, end, e = _strtoull(s, 0, 16)
        if e:
            return 0, -(_errno.EINVAL if e == _errno.EINVAL or end < len(s) else e)
        if end < len(s) and s[end] == ".":
            return 0, -_errno.EINVAL
        hexnum = True
    elif end < len(s) and s[end] == ".":
        f = end
        j = f + 1
        while j < len(s) and s[j].isdigit() and s[j].isascii():
            j += 1
        if j == f + 1:
            end = f + 1  # strtod failed: just skip the '.'
        else:
            k = j
            if k < len(s) and s[k] in "eE":
                m = k + 1
                if m < len(s) and s[m] in "+-":
                    m += 1
                if m < len(s) and s[m].isdigit():
                    return 0, -_errno.EINVAL  # an exponent makes the whole input invalid
            frac = float(s[f:j])
            valf = min(int(frac * 2.0 ** 64), U64_MAX)
            end = j
    shift = _SUFFIX.get(s[end].lower()) if end < len(s) else None
    if shift is not None:
        if hexnum:
            err(f"{PROG}: warning: Using a multiplier suffix on hex numbers is deprecated: {s}\n")
        end += 1
    else:
        shift = 0
    if end != len(s):
        return 0, -_errno.EINVAL
    if shift == 0:
        if valf:
            return 0, -_errno.EINVAL
        return val, 0
    mul = 1 << shift
    full = valf * mul
    total = val * mul + (full >> 64) + ((full & U64_MAX) >> 63)
    if total > U64_MAX:
        return 0, -_errno.ERANGE
    return total, 0


def cvtnum(s: str) -> int:
    """qemu-io's cvtnum: the value, or a negative errno."""
    value, rc = qemu_strtosz(s)
    if rc < 0:
        return rc
    if value > INT64_MAX:
        return -_errno.ERANGE
    return value


def print_cvtnum_err(rc: int, arg: str) -> None:
    if rc == -_errno.EINVAL:
        out(f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}\n")
    elif rc == -_errno.ERANGE:
        out(f"Parsing error: argument too large -- {arg}\n")
    else:
        out(f"Parsing error: {arg}\n")


def parse_num(arg: str) -> int:
    v = cvtnum(arg)
    if v < 0:
        print_cvtnum_err(v, arg)
        raise CmdFailed(-v)
    return v


def c_strtol0(s: str) -> int | None:
    """C ``strtol(s, &end, 0)`` requiring ``*end == 0``; None when garbage follows."""
    i = 0
    while i < len(s) and s[i] in _SPACE:
        i += 1
    neg = False
    if i < len(s) and s[i] in "+-":
        neg = s[i] == "-"
        i += 1
    rest = s[i:]
    if rest[:2].lower() == "0x" and len(rest) > 2 and rest[2].lower() in "0123456789abcdef":
        base, digits, body = 16, "0123456789abcdef", rest[2:]
    elif rest[:1] == "0":
        base, digits, body = 8, "01234567", rest
    else:
        base, digits, body = 10, "0123456789", rest
    j = 0
    while j < len(body) and body[j].lower() in digits:
        j += 1
    if j == 0:
        # no conversion: end == s; valid only for the empty string
        return 0 if s == "" else None
    if j != len(body):
        return None
    v = int(body[:j], base)
    return -v if neg else v


def parse_pattern(arg: str) -> int:
    p = c_strtol0(arg)
    if p is None or p < 0 or p > 255:
        out(f"{arg} is not a valid pattern byte\n")
        raise CmdFailed(_errno.EINVAL)
    return p


def cvtstr(value: float) -> str:
    """qemu-io's cvtstr: '64 KiB', '1.500 KiB', '32 bytes'."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB")):
        if value >= float(1 << shift):
            s = "%.3f" % (value / float(1 << shift))
            break
    else:
        suffix = " bytes"
        s = "%f" % value
    i = s.find(".000")
    return s[:i] + suffix if i >= 0 else s + suffix


def _tdiv(value: float, ns: int) -> float:
    seconds = ns / 1e9
    if seconds == 0:
        return math.inf if value > 0 else math.nan
    return value / seconds


def timestr(ns: int, verbose: bool) -> str:
    sec, rem = divmod(ns, 1_000_000_000)
    frac = rem / 1e9
    if verbose or sec:
        return "%u:%02u:%05.2f" % (sec // 3600, (sec % 3600) // 60, sec % 60 + frac)
    return "%05.2f sec" % frac


def print_report(op: str, ns: int, offset: int, count: int, total: int, cnt: int, cflag: bool) -> None:
    ts = timestr(ns, cflag)
    if not cflag:
        out(f"{op} {total}/{count} bytes at offset {offset}\n")
        out("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n"
            % (cvtstr(float(total)), cnt, ts, cvtstr(_tdiv(float(total), ns)), _tdiv(float(cnt), ns)))
    else:
        out("%d,%d,%s,%.3f,%.3f\n" % (total, cnt, ts, _tdiv(float(total), ns), _tdiv(float(cnt), ns)))


def dump_buffer(buf: bytes, offset: int) -> None:
    lines = []
    for i in range(0, len(buf), 16):
        chunk = buf[i:i + 16]
        hexpart = "".join("%02x " % b for b in chunk)
        asc = "".join(chr(b) if (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) else "." for b in chunk)
        lines.append("%08x:  %s %s\n" % (offset + i, hexpart, asc))
    out("".join(lines))


# --------------------------------------------------------------------------------------------------
# qemu's QDict order and the "Format specific information" dump
# --------------------------------------------------------------------------------------------------
def _qdict_bucket(key: str) -> int:
    b = key.encode()
    v = (0x238F13AF * len(b)) & 0xFFFFFFFF
    for i, c in enumerate(b):
        v = (v + (c << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * v + 12345) & 0xFFFFFFFF) % 512


def qdict_order(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """Entries in QDict iteration order: by hash bucket, the newest insertion first within a bucket."""
    items = list(d.items())
    idx = {k: i for i, (k, _) in enumerate(items)}
    return sorted(items, key=lambda kv: (_qdict_bucket(kv[0]), -idx[kv[0]]))


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def dump_qobject(indent: int, obj: Any, lines: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in qdict_order(obj):
            if v is None:
                continue
            key = k.replace("-", " ")
            composite = isinstance(v, (dict, list))
            if composite:
                lines.append(f"{' ' * (indent * 4)}{key}:\n")
                dump_qobject(indent + 1, v, lines)
            else:
                lines.append(f"{' ' * (indent * 4)}{key}: {_scalar(v)}\n")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            composite = isinstance(v, (dict, list))
            if composite:
                lines.append(f"{' ' * (indent * 4)}[{i}]:\n")
                dump_qobject(indent + 1, v, lines)
            else:
                lines.append(f"{' ' * (indent * 4)}[{i}]: {_scalar(v)}\n")
    else:
        lines.append(_scalar(obj))


# --------------------------------------------------------------------------------------------------
# GNU getopt (permuting, as glibc's getopt without POSIXLY_CORRECT)
# --------------------------------------------------------------------------------------------------
def getopt(argv: list[str], optstring: str, operands: list[str]) -> Iterator[tuple[str, str | None]]:
    """Yield the options of ``argv[1:]`` one by one, collecting operands into ``operands`` (glibc's
    permuting getopt).  An unknown option or a missing argument is reported like glibc and raises
    _GetoptError at that point, after the options before it were handled."""
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            operands.extend(argv[i + 1:])
            return
        if not a.startswith("-") or a == "-":
            operands.append(a)
            i += 1
            continue
        j = 1
        while j < len(a):
            c = a[j]
            pos = optstring.find(c)
            if c == ":" or pos < 0:
                err(f"{argv[0]}: invalid option -- '{c}'\n")
                raise _GetoptError()
            if pos + 1 < len(optstring) and optstring[pos + 1] == ":":
                if j + 1 < len(a):
                    yield c, a[j + 1:]
                elif i + 1 < len(argv):
                    i += 1
                    yield c, argv[i]
                else:
                    err(f"{argv[0]}: option requires an argument -- '{c}'\n")
                    raise _GetoptError()
                break
            yield c, None
            j += 1
        i += 1


class _GetoptError(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# the session: an open node and the commands
# --------------------------------------------------------------------------------------------------
@dataclass
class CmdInfo:
    name: str
    func: Callable[["Session", list[str]], int]
    argmin: int = 0
    argmax: int = 0
    args: str = ""
    oneline: str = ""
    altname: str | None = None
    write: bool = False


@dataclass
class Session:
    node: BlockDriver
    read_only: bool
    probed_raw: bool = False
    quit: bool = False
    commands: dict[str, CmdInfo] = field(default_factory=dict)

    # --- helpers ------------------------------------------------------------------------------------
    def usage(self, ct: CmdInfo) -> int:
        out(f"{ct.name} {ct.args} -- {ct.oneline}\n")
        return -_errno.EINVAL

    def check_request(self, offset: int, length: int) -> None:
        size = self.node.size()
        if offset < 0 or length < 0 or offset > size or length > size - offset:
            raise BlockError("request beyond end of device", errno=_errno.EIO)

    def check_probed_raw(self, offset: int, data: bytes) -> None:
        """QEMU refuses writes that would make a probed raw image probe as another format."""
        if not self.probed_raw or offset >= SECTOR or not data:
            return
        head = bytearray(self.node.read(0, min(SECTOR, self.node.size())))
        head.extend(bytes(SECTOR - len(head)))
        n = min(len(data), SECTOR - offset)
        head[offset:offset + n] = data[:n]
        if probe_format(bytes(head), self.node.filename) != "raw":
            raise BlockError("Operation not permitted", errno=_errno.EPERM)

    def is_allocated(self, offset: int, length: int) -> tuple[bool, int]:
        """bdrv_is_allocated: the top node alone; n == 0 at the end of the image."""
        size = self.node.size()
        if offset >= size:
            return False, 0
        length = min(length, size - offset)
        if length <= 0:
            return False, 0
        return is_allocated_above(self.node, self.node.backing, offset, length)

    # --- dispatch -----------------------------------------------------------------------------------
    def find(self, name: str) -> CmdInfo | None:
        for ct in self.commands.values():
            if ct.name == name or ct.altname == name:
                return ct
        return None

    def run(self, line: str) -> int:
        try:
            argv = shlex.split(line)
        except ValueError:
            argv = line.split()
        if not argv:
            return 0
        ct = self.find(argv[0])
        if ct is None:
            err(f'command "{argv[0]}" not found\n')
            return -_errno.EINVAL
        n = len(argv) - 1
        if n < ct.argmin or (ct.argmax != -1 and n > ct.argmax):
            if ct.argmax == -1:
                err(f"bad argument count {n} to {argv[0]}, expected at least {ct.argmin} arguments\n")
            elif ct.argmin == ct.argmax:
                err(f"bad argument count {n} to {argv[0]}, expected {ct.argmin} arguments\n")
            else:
                err(f"bad argument count {n} to {argv[0]}, expected between {ct.argmin} and "
                    f"{ct.argmax} arguments\n")
            return -_errno.EINVAL
        if ct.write and self.read_only:
            error_report("Block node is read-only")
            return -_errno.EPERM
        try:
            return ct.func(self, argv)
        except CmdFailed as exc:
            return -exc.code
        except _GetoptError:
            return self.usage(ct)


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------
def read_f(s: Session, argv: list[str]) -> int:
    ct = s.commands["read"]
    cflag = qflag = vflag = pflag = sflag = lflag = bflag = False
    pattern = 0
    pattern_offset = pattern_count = 0
    operands: list[str] = []
    for c, arg in getopt(argv, "bCl:pP:qs:v", operands):
        if c == "b":
            bflag = True
        elif c == "C":
            cflag = True
        elif c == "l":
            lflag = True
            pattern_count = parse_num(arg or "")
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
        elif c == "q":
            qflag = True
        elif c == "s":
            sflag = True
            pattern_offset = parse_num(arg or "")
        elif c == "v":
            vflag = True
    if len(operands) != 2:
        return s.usage(ct)
    offset = parse_num(operands[0])
    count = parse_num(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}\n")
        return -_errno.EINVAL
    if not pflag and (lflag or sflag):
        return s.usage(ct)
    if not lflag:
        pattern_count = count - pattern_offset
    if pattern_count < 0 or pattern_count + pattern_offset > count:
        out("pattern verification range exceeds end of read data\n")
        return -_errno.EINVAL
    if bflag:
        if offset % SECTOR:
            out(f"{offset} is not a sector-aligned value for 'offset'\n")
            return -_errno.EINVAL
        if count % SECTOR:
            out(f"{count} is not a sector-aligned value for 'count'\n")
            return -_errno.EINVAL
    t1 = time.monotonic_ns()
    try:
        if bflag:
            raise BlockError("vmstate is not supported", errno=_errno.ENOTSUP)
        s.check_request(offset, count)
        buf = s.node.read(offset, count) if count else b""
    except (BlockError, OSError) as exc:
        out(f"read failed: {strerror(io_errno(exc))}\n")
        return -io_errno(exc)
    t2 = time.monotonic_ns()
    ret = 0
    if pflag:
        region = buf[pattern_offset:pattern_offset + pattern_count]
        if region != bytes([pattern]) * pattern_count:
            out(f"Pattern verification failed at offset {offset + pattern_offset}, {pattern_count} bytes\n")
            ret = -_errno.EINVAL
    if qflag:
        return ret
    if vflag:
        dump_buffer(buf, offset)
    print_report("read", t2 - t1, offset, count, count, 1, cflag)
    return ret


def _load_pattern_file(name: str, length: int) -> bytes:
    try:
        with open(name, "rb") as f:
            data = f.read(length)
    except OSError as exc:
        err(f"{name}: {os_error_text(exc)}\n")
        raise CmdFailed(_errno.EINVAL) from None
    if not data:
        err(f"{name}: file is empty\n")
        raise CmdFailed(_errno.EINVAL)
    reps = -(-length // len(data))
    return (data * reps)[:length]


def write_f(s: Session, argv: list[str]) -> int:
    ct = s.commands["write"]
    bflag = cflag = big_c = fua = nflag = pflag = qflag = sflag = uflag = zflag = False
    pattern = 0xCD
    file_name = ""
    operands: list[str] = []
    for c, arg in getopt(argv, "bcCfnpP:qs:uz", operands):
        if c == "b":
            bflag = True
        elif c == "c":
            cflag = True
        elif c == "C":
            big_c = True
        elif c == "f":
            fua = True
        elif c == "n":
            nflag = True
        elif c == "P":
            pflag = True
            pattern = parse_pattern(arg or "")
        elif c == "q":
            qflag = True
        elif c == "s":
            sflag = True
            file_name = arg or ""
        elif c == "u":
            uflag = True
        elif c == "z":
            zflag = True
    if len(operands) != 2:
        return s.usage(ct)
    if bflag and zflag:
        out("-b and -z cannot be specified at the same time\n")
        return -_errno.EINVAL
    if fua and (bflag or cflag):
        out("-f and -b or -c cannot be specified at the same time\n")
        return -_errno.EINVAL
    if nflag and not zflag:
        out("-n requires -z to be specified\n")
        return -_errno.EINVAL
    if uflag and not zflag:
        out("-u requires -z to be specified\n")
        return -_errno.EINVAL
    if int(zflag) + int(pflag) + int(sflag) > 1:
        out("Only one of -z, -P, and -s can be specified at the same time\n")
        return -_errno.EINVAL
    offset = parse_num(operands[0])
    count = parse_num(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES and not nflag:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, given {operands[1]}\n")
        return -_errno.EINVAL
    if bflag or cflag:
        if offset % SECTOR:
            out(f"{offset} is not a sector-aligned value for 'offset'\n")
            return -_errno.EINVAL
        if count % SECTOR:
            out(f"{count} is not a sector-aligned value for 'count'\n")
            return -_errno.EINVAL
    data = b""
    if not zflag:
        data = _load_pattern_file(file_name, count) if sflag else bytes([pattern]) * count
    t1 = time.monotonic_ns()
    try:
        if bflag:
            raise BlockError("vmstate is not supported", errno=_errno.ENOTSUP)
        s.check_request(offset, count)
        if zflag:
            if count:
                s.node.write_zeroes(offset, count, unmap=uflag)
        elif cflag:
            s.node.write_compressed(offset, data)
        else:
            s.check_probed_raw(offset, data)
            if count:
                s.node.write(offset, data)
        if fua:
            s.node.flush()
    except (BlockError, OSError) as exc:
        if getattr(exc, "error_report", False):  # the driver's own message, as QEMU's error_report
            error_report(str(exc))
        out(f"write failed: {strerror(io_errno(exc))}\n")
        return -io_errno(exc)
    t2 = time.monotonic_ns()
    if qflag:
        return 0
    print_report("wrote", t2 - t1, offset, count, count, 1, big_c)
    return 0


def discard_f(s: Session, argv: list[str]) -> int:
    ct = s.commands["discard"]
    big_c = qflag = False
    operands: list[str] = []
    for c, _ in getopt(argv, "Cq", operands):
        if c == "C":
            big_c = True
        elif c == "q":
            qflag = True
    if len(operands) != 2:
        return s.usage(ct)
    offset = parse_num(operands[0])
    count = parse_num(operands[1])
    if count > BDRV_REQUEST_MAX_BYTES:
        out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}, given {operands[1]}\n")
        return -_errno.EINVAL
    t1 = time.monotonic_ns()
    try:
        s.check_request(offset, count)
        if count:
            s.node.discard(offset, count)
    except (BlockError, OSError) as exc:
        out(f"discard failed: {strerror(io_errno(exc))}\n")
        return -io_errno(exc)
    t2 = time.monotonic_ns()
    if not qflag:
        print_report("discard", t2 - t1, offset, count, count, 1, big_c)
    return 0


def flush_f(s: Session, argv: list[str]) -> int:
    try:
        s.node.flush()
    except (BlockError, OSError) as exc:
        return -io_errno(exc)
    return 0


def _map_is_allocated(s: Session, offset: int, length: int) -> tuple[bool, int]:
    ret, num = s.is_allocated(offset, length)
    first, pnum = ret, num
    while length > 0:
        offset += num
        length -= num
        ret, num = s.is_allocated(offset, length)
        if ret == first and num:
            pnum += num
        else:
            break
    return first, pnum


def map_f(s: Session, argv: list[str]) -> int:
    offset = 0
    try:
        remaining = s.node.size()
    except (BlockError, OSError) as exc:
        error_report(f"Failed to query image length: {strerror(io_errno(exc))}")
        return -io_errno(exc)
    lines = []
    while remaining:
        try:
            ret, num = _map_is_allocated(s, offset, remaining)
        except (BlockError, OSError) as exc:
            out("".join(lines))
            error_report(f"Failed to get allocation status: {strerror(io_errno(exc))}")
            return -io_errno(exc)
        if not num:
            out("".join(lines))
            error_report("Unexpected end of image")
            return -_errno.EIO
        retstr = "    allocated" if ret else "not allocated"
        lines.append(f"{cvtstr(float(num))} (0x{num:x}) bytes {retstr} at offset "
                     f"{cvtstr(float(offset))} (0x{offset:x})\n")
        offset += num
        remaining -= num
    out("".join(lines))
    return 0


def alloc_f(s: Session, argv: list[str]) -> int:
    start = offset = parse_num(argv[1])
    count = parse_num(argv[2]) if len(argv) == 3 else SECTOR
    remaining = count
    sum_alloc = 0
    try:
        while remaining:
            ret, num = s.is_allocated(offset, remaining)
            offset += num
            remaining -= num
            if ret:
                sum_alloc += num
            if num == 0:
                count -= remaining
                remaining = 0
    except (BlockError, OSError) as exc:
        out(f"is_allocated failed: {strerror(io_errno(exc))}\n")
        return -io_errno(exc)
    out(f"{sum_alloc}/{count} bytes allocated at offset {cvtstr(float(start))}\n")
    return 0


def _vm_state_offset(node: BlockDriver) -> int:
    cs = node.cluster_size() or 0
    l2 = getattr(node, "l2_entries", None)
    if node.format_name != "qcow2" or not cs or not l2:
        return 0
    per = cs * l2
    return -(-node.size() // per) * per


def info_f(s: Session, argv: list[str]) -> int:
    node = s.node
    lines = [f"format name: {node.format_name}\n"]
    try:
        cs = node.cluster_size() or 0
        vmoff = _vm_state_offset(node)
        lines.append(f"cluster size: {cvtstr(float(cs))}\n")
        lines.append(f"vm state offset: {cvtstr(float(vmoff))}\n")
        spec = node.info_specific()
    except (BlockError, OSError) as exc:
        out("".join(lines))
        return -io_errno(exc)
    if spec is not None:
        lines.append("Format specific information:\n")
        data = spec.get("data", {}) if isinstance(spec, dict) else {}
        dump_qobject(1, data, lines)
    out("".join(lines))
    return 0


def length_f(s: Session, argv: list[str]) -> int:
    try:
        size = s.node.size()
    except (BlockError, OSError) as exc:
        out(f"getlength: {strerror(io_errno(exc))}\n")
        return -io_errno(exc)
    out(cvtstr(float(size)) + "\n")
    return 0


def abort_f(s: Session, argv: list[str]) -> int:
    # like abort(3): no close, no flush of the image and none of our buffered stdout either
    _stdout.discard()
    sys.stdout.flush()  # holds nothing of ours: _stdout writes only whole blocks through it
    os.abort()


def sleep_f(s: Session, argv: list[str]) -> int:
    ms = c_strtol0(argv[1])
    if ms is None or ms < 0 or argv[1] == "":
        out(f"{argv[1]} is not a valid number\n")
        return -_errno.EINVAL
    time.sleep(ms / 1000.0)
    return 0


def quit_f(s: Session, argv: list[str]) -> int:
    s.quit = True
    return 0


def _command_table() -> dict[str, CmdInfo]:
    cmds = [
        CmdInfo("read", read_f, 2, -1, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                "reads a number of bytes at a specified offset", altname="r"),
        CmdInfo("write", write_f, 2, -1, "[-bcCfnquz] [-P pattern | -s source_file] off len",
                "writes a number of bytes at a specified offset", altname="w", write=True),
        CmdInfo("discard", discard_f, 2, -1, "[-Cq] off len",
                "discards a number of bytes at a specified offset", altname="d", write=True),
        CmdInfo("flush", flush_f, oneline="flush all in-core file state to disk", altname="f"),
        CmdInfo("map", map_f, 0, 0, "", "prints the allocated areas of a file"),
        CmdInfo("alloc", alloc_f, 1, 2, "offset [count]", "checks if offset is allocated in the file",
                altname="a"),
        CmdInfo("info", info_f, oneline="prints information about the current file", altname="i"),
        CmdInfo("length", length_f, oneline="gets the length of the current file", altname="l"),
        CmdInfo("abort", abort_f, oneline="simulate a program crash using abort(3)"),
        CmdInfo("sleep", sleep_f, 1, 1, oneline="waits for the given value in milliseconds"),
        CmdInfo("quit", quit_f, oneline="exit the program", altname="q"),
    ]
    return {c.name: c for c in cmds}


# --------------------------------------------------------------------------------------------------
# the click command
# --------------------------------------------------------------------------------------------------
@cli.command("io", context_settings={"ignore_unknown_options": False})
@click.option("-f", "--format", "fmt", metavar="FMT", help="image format (probed when absent)")
@click.option("-r", "--read-only", "read_only", is_flag=True, help="open the image read-only")
@click.option("-t", "--cache", "cache", metavar="CACHE", help="cache mode")
@click.option("-n", "--nocache", "nocache", is_flag=True, help="short for -t none")
@click.option("-U", "--force-share", "force_share", is_flag=True, help="force shared permissions (read-only opens only)")
@click.option("-c", "--cmd", "cmds", multiple=True, metavar="CMD", help="a qemu-io command line")
@click.argument("filename", metavar="FILE")
def io_cmd(fmt: str | None, read_only: bool, cache: str | None, nocache: bool, force_share: bool,
           cmds: tuple[str, ...], filename: str) -> None:
    """Run qemu-io commands (read, write, discard, flush, map, info, abort, ...) on an image."""
    if nocache and cache is None:
        cache = "none"
    try:
        cache_options(cache)
    except BlockError as exc:
        error_report(exc.message)
        raise CliExit(1) from None
    if force_share and not read_only:
        error_report(f"can't open device {filename}: force-share=on can only be used with read-only images")
        raise CliExit(1)
    ex = make_executor()
    try:
        node = open_image(filename, ex, fmt=fmt, read_only=read_only, backing=True,
                          options=cache_options(cache))
    except BlockError as exc:
        error_report(f"can't open device {filename}: {exc.message}")
        raise CliExit(1) from None
    except OSError as exc:
        error_report(f"can't open device {filename}: {os_error_text(exc)}")
        raise CliExit(1) from None
    last_error = 0
    try:
        # a dirty lazy-refcounts image opened read-write was repaired; QEMU prints the check's findings
        for line in getattr(node, "repair_messages", None) or ():
            err(f"{line}\n")
        probed_raw = fmt is None and node.format_name == "raw"
        if probed_raw and not read_only:
            err(f"WARNING: Image format was not specified for '{filename}' and probing guessed raw.\n"
                "         Automatically detecting the format is dangerous for raw images, write operations "
                "on block 0 will be restricted.\n"
                "         Specify the 'raw' format explicitly to remove the restrictions.\n")
        session = Session(node=node, read_only=read_only, probed_raw=probed_raw, commands=_command_table())
        for line in cmds:
            if session.quit:
                break
            ret = session.run(line)
            if ret < 0:
                last_error = ret
    finally:
        _stdout.flush()
        node.close()
    if last_error:
        raise CliExit(1)
