"""qemu-storage-daemon 7.2's command line, parsed into an ordered list of configuration actions.

Layer: pure engine module. Imports only ``engine.qapi`` and the standard library; no I/O (the
pidfile is not written, chardevs are not looked up, sockets are not opened).

Behaviour copied from qemu-storage-daemon 7.2 (``storage-daemon/qemu-storage-daemon.c``):

* Two passes, like qsd. The first runs getopt over everything and stops at the first
  ``-h``/``--help`` (``show_help``) or ``-V``/``--version`` (``show_version``), or at the first
  getopt error; so ``--object bad -h`` shows help but ``--bogus -h`` is an error. The second
  pass converts the options in command-line order into ``DaemonConfig.actions``.
* getopt_long rules: ``--opt value`` and ``--opt=value``, unique prefixes of long options
  (``--blockd``), clustered short options (``-hV``, ``-Tfoo``), ``--`` ends the options and
  the rest is ignored, a non-option argument is an error ("extra: Unexpected argument").
* ``--blockdev``, ``--object``, ``--nbd-server``, ``--export`` and ``--monitor`` take JSON when the
  argument starts with ``{`` and keyval otherwise (implied keys: driver, qom-type, none, type,
  chardev). ``--chardev`` uses QemuOpts syntax (implied ``backend``; short-form booleans such as
  ``server``/``nowait`` are accepted with qsd's deprecation warning).
* ``-T``/``--trace`` is accepted and ignored. ``--workers N`` is parablock's own.

Errors: ``CmdlineError``. qsd prints ``qemu-storage-daemon: <msg>`` and exits with status 1
(``EXIT_FAILURE``) for every command-line error; ``msg`` already includes qsd's location
prefix (``--blockdev driver=x: ``). getopt's own errors (``from_getopt=True``) are printed by
qsd as ``<argv[0]>: <msg>`` instead. Help and version exit with status 0.

Left to the caller (they need the daemon's state, and qsd reports them when it executes the
option): ``chardev "x" not found`` and then ``Only QMP is supported`` (``mode=readline``) for
``--monitor``; duplicate ids; node, object and TLS-credential lookups; ``Parameter 'id' expects
an identifier`` for ``--object`` (qsd adds the hint line "Identifiers consist of letters,
digits, '-', '.', '_', starting with a letter." on the command line).

Deliberate differences: ``--object help`` / ``--object TYPE,help`` and ``--chardev ...,help``
are errors here (qsd prints a list); ``--chardev`` supports only the ``socket`` backend (other
real backends are refused with a parablock message).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from engine.qapi import (
    QapiError,
    from_keyval,
    keyval_parse,
    keyval_parse_help,
    parse_json,
    visit_json,
)

__all__ = ["EXIT_FAILURE", "CmdlineError", "DaemonConfig", "parse_cmdline", "nbd_server_start_args"]

EXIT_FAILURE = 1
"""qsd's exit status for any command-line error."""

PROGRAM = "qemu-storage-daemon"


class CmdlineError(Exception):
    """A command-line error; ``msg`` is what qsd prints after ``qemu-storage-daemon: ``.

    ``from_getopt`` marks getopt's own messages (unknown option, missing or unwanted argument),
    which qsd prefixes with ``argv[0]`` rather than the program name. ``warnings`` are the
    warnings qsd printed before failing (each after ``qemu-storage-daemon: ``).
    """

    def __init__(self, msg: str, *, from_getopt: bool = False) -> None:
        super().__init__(msg)
        self.msg = msg
        self.from_getopt = from_getopt
        self.warnings: list[str] = []  # qsd warnings printed before the error


@dataclass(slots=True)
class DaemonConfig:
    """The parsed command line.

    ``actions`` keeps the configuration options in command-line order as ``(kind, args)``:

    * ``"blockdev"``: blockdev-add arguments (BlockdevOptions);
    * ``"object"``: object-add arguments (ObjectOptions);
    * ``"chardev"``: chardev-add arguments, ``{"id", "backend": {"type": "socket", "data":
      {"addr": <SocketAddressLegacy>, "server": bool, ...}}}``;
    * ``"monitor"``: MonitorOptions ``{"chardev", "id"?, "mode"?, "pretty"?}``;
    * ``"nbd-server"``: NbdServerOptions, i.e. the *flat* SocketAddress shape
      ``{"addr": {"type": "unix", "path": ...}, ...}``; ``nbd_server_start_args`` turns it into
      QMP nbd-server-start's legacy ``{"type": "unix", "data": {...}}`` shape;
    * ``"export"``: block-export-add arguments (BlockExportOptions).

    ``warnings`` holds qsd's warnings, each printed after ``qemu-storage-daemon: ``.
    """

    actions: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    pidfile: str | None = None
    daemonize: bool = False
    workers: int | None = None
    show_help: bool = False
    show_version: bool = False
    warnings: list[str] = field(default_factory=list)


# long option -> takes an argument
_LONG: dict[str, bool] = {
    "blockdev": True,
    "chardev": True,
    "daemonize": False,
    "export": True,
    "help": False,
    "monitor": True,
    "nbd-server": True,
    "object": True,
    "pidfile": True,
    "trace": True,
    "version": False,
    "workers": True,
}
_SHORT: dict[str, str] = {"h": "help", "T": "trace", "V": "version"}


@dataclass(frozen=True, slots=True)
class _Opt:
    name: str  # canonical long name, or "" for a non-option argument
    arg: str | None
    where: str  # the words as written, for error locations


def _getopt(argv: list[str]) -> Iterator[_Opt]:
    """Split argv like getopt_long(argc, argv, "-hT:V", ...); raises CmdlineError(from_getopt)."""
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            break
        if word.startswith("--"):
            body = word[2:]
            name, eq, value = body.partition("=")
            matches = [n for n in _LONG if n == name] or [n for n in _LONG if n.startswith(name)]
            if not matches:
                raise CmdlineError(f"unrecognized option '--{name}'", from_getopt=True)
            if len(matches) > 1:
                options = " ".join(f"'--{m}'" for m in matches)
                raise CmdlineError(
                    f"option '--{name}' is ambiguous; possibilities: {options}", from_getopt=True
                )
            full = matches[0]
            if _LONG[full]:
                if eq:
                    yield _Opt(full, value, word)
                elif i < len(argv):
                    yield _Opt(full, argv[i], f"{word} {argv[i]}")
                    i += 1
                else:
                    raise CmdlineError(f"option '--{full}' requires an argument", from_getopt=True)
            else:
                if eq:
                    raise CmdlineError(
                        f"option '--{full}' doesn't allow an argument", from_getopt=True
                    )
                yield _Opt(full, None, word)
            continue
        if word.startswith("-") and word != "-":
            j = 1
            while j < len(word):
                letter = word[j]
                j += 1
                if letter not in _SHORT:
                    raise CmdlineError(f"invalid option -- '{letter}'", from_getopt=True)
                full = _SHORT[letter]
                if _LONG[full]:
                    if j < len(word):
                        yield _Opt(full, word[j:], word)
                    elif i < len(argv):
                        yield _Opt(full, argv[i], f"{word} {argv[i]}")
                        i += 1
                    else:
                        raise CmdlineError(
                            f"option requires an argument -- '{letter}'", from_getopt=True
                        )
                    break
                yield _Opt(full, None, word)
            continue
        yield _Opt("", word, word)


def parse_cmdline(argv: list[str]) -> DaemonConfig:
    """Parse qemu-storage-daemon's arguments (without the program name).

    Returns a DaemonConfig; with ``show_help``/``show_version`` set, nothing after that option
    was looked at (qsd prints and exits 0).

    Raises CmdlineError with qsd's message (see the module docstring).
    """
    config = DaemonConfig()
    for opt in _getopt(argv):  # qsd's first pass: getopt errors, help and version, in order
        if opt.name == "help":
            config.show_help = True
            return config
        if opt.name == "version":
            config.show_version = True
            return config
    for opt in _getopt(argv):
        _apply(config, opt)
    return config


_KEYVAL_TYPES = {
    "blockdev": ("BlockdevOptions", "driver"),
    "object": ("ObjectOptions", "qom-type"),
    "nbd-server": ("NbdServerOptions", None),
    "export": ("BlockExportOptions", "type"),
    "monitor": ("MonitorOptions", "chardev"),
}


def _apply(config: DaemonConfig, opt: _Opt) -> None:
    if opt.name == "":
        raise CmdlineError(f"{opt.where}: Unexpected argument")
    arg = opt.arg
    if opt.name == "trace":
        return
    if opt.name == "daemonize":
        config.daemonize = True
        return
    assert arg is not None
    if opt.name == "pidfile":
        config.pidfile = arg
        return
    if opt.name == "workers":
        number = arg.strip()
        if not number.isdigit() or int(number) < 1:
            raise CmdlineError(f"{opt.where}: Parameter 'workers' expects a positive integer")
        config.workers = int(number)
        return
    try:
        if opt.name == "chardev":
            args = _chardev(arg, opt.where, config.warnings)
        else:
            type_name, implied = _KEYVAL_TYPES[opt.name]
            args = _structured(opt.name, type_name, implied, arg)
    except QapiError as err:
        error = CmdlineError(f"{opt.where}: {err.desc}")
        error.warnings = list(config.warnings)
        raise error from None
    config.actions.append((opt.name, args))


def _structured(kind: str, type_name: str, implied: str | None, arg: str) -> dict[str, object]:
    if arg.startswith("{"):
        return visit_json(type_name, parse_json(arg))
    if kind == "object":
        tree, wants_help = keyval_parse_help(arg, implied)
        if wants_help:
            raise QapiError("Help is not available for this option")
    else:
        tree = keyval_parse(arg, implied)
    return from_keyval(type_name, tree)


def nbd_server_start_args(options: dict[str, object]) -> dict[str, object]:
    """Turn ``--nbd-server`` options (flat SocketAddress) into nbd-server-start arguments.

    ``{"addr": {"type": "unix", "path": p}, ...}`` becomes ``{"addr": {"type": "unix",
    "data": {"path": p}}, ...}``; other members are copied.
    """
    addr = dict(options["addr"])  # type: ignore[call-overload]
    kind = addr.pop("type")
    return {**options, "addr": {"type": kind, "data": addr}}


# --------------------------------------------------------------------------------------------
# --chardev (QemuOpts syntax, util/qemu-option.c; socket backend of chardev/char-socket.c)
# --------------------------------------------------------------------------------------------

_CHARDEV_BOOL = {
    "abstract", "append", "clipboard", "delay", "ipv4", "ipv6", "logappend", "mouse", "mux",
    "nodelay", "server", "signal", "telnet", "tight", "tn3270", "wait", "websocket",
}  # fmt: skip
_CHARDEV_NUMBER = {"cols", "debug", "height", "reconnect", "rows", "to", "width"}
_CHARDEV_STR = {
    "backend", "chardev", "fd", "host", "localaddr", "localport", "logfile", "name", "path",
    "port", "tls-authz", "tls-creds",
}  # fmt: skip
_CHARDEV_SIZE = {"size"}
_CHARDEV_BACKENDS = {
    "pty", "udp", "memory", "file", "socket", "stdio", "ringbuf", "null", "pipe", "serial",
    "parallel", "tty", "parport", "msmouse", "wctablet", "testdev", "braille", "spicevmc",
    "spiceport", "qemu-vdagent", "vc", "dbus",
}  # fmt: skip
_ID_HINT = "Identifiers consist of letters, digits, '-', '.', '_', starting with a letter."


def _opt_value(text: str, pos: int) -> tuple[str, int]:
    """QemuOpts get_opt_value: up to an unescaped comma, ',,' is ','; returns (value, end)."""
    out: list[str] = []
    while pos < len(text):
        if text[pos] == ",":
            if text[pos + 1 : pos + 2] != ",":
                break
            pos += 1
        out.append(text[pos])
        pos += 1
    return "".join(out), pos


def _qemu_opts_split(text: str, firstname: str | None) -> list[tuple[str, str, str | None]]:
    """QemuOpts tokens as (name, value, short-form-flag-as-written or None)."""
    out: list[tuple[str, str, str | None]] = []
    pos = 0
    while pos < len(text):
        rest = text[pos:]
        length = next((k for k, c in enumerate(rest) if c in "=,"), len(rest))
        if rest[length : length + 1] != "=":
            if firstname is not None:
                value, end = _opt_value(text, pos)
                out.append((firstname, value, None))
                pos = end
            else:
                name = rest[:length]
                pos += length
                if name.startswith("no"):
                    out.append((name[2:], "off", name))
                else:
                    out.append((name, "on", name))
        else:
            name = rest[:length]
            value, end = _opt_value(text, pos + length + 1)
            out.append((name, value, None))
            pos = end
        if text[pos : pos + 1] == ",":
            pos += 1
        firstname = None
    return out


def _id_wellformed(ident: str) -> bool:
    if not (ident[:1].isascii() and ident[:1].isalpha()):
        return False
    return all(c.isascii() and (c.isalnum() or c in "-._") for c in ident)


def _opts_bool(name: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise QapiError(f"Parameter '{name}' expects 'on' or 'off'")


def _opts_number(name: str, value: str) -> int:
    text = value.lstrip(" \t\n\v\f\r")
    negative = text.startswith("-")
    body = text.lstrip("+-") if text[:1] in "+-" else text
    try:
        if body[:2].lower() == "0x":
            number = int(body[2:], 16)
        elif body[:1] == "0" and len(body) > 1:
            number = int(body[1:], 8)
        else:
            number = int(body, 10)
    except ValueError:
        raise QapiError(f"Parameter '{name}' expects a number") from None
    if len(text) - len(body) > 1 or number >= 2**64:
        raise QapiError(f"Parameter '{name}' expects a number")
    return (-number) % 2**64 if negative else number


def _chardev(arg: str, where: str, warnings: list[str]) -> dict[str, object]:
    tokens = _qemu_opts_split(arg, "backend")
    # The id is the first "id=" (looked up without the implied backend), like opts_parse_id.
    ident = next((v for n, v, _ in _qemu_opts_split(arg, None) if n == "id"), None)
    if ident is not None and not _id_wellformed(ident):
        raise QapiError(f"Parameter 'id' expects an identifier\n{_ID_HINT}")
    opts: dict[str, str] = {}
    for name, value, flag in tokens:
        if flag is not None and name != "help":
            prefix = "no" if flag.startswith("no") else ""
            if name == "delay":
                hint = f"nodelay={'on' if prefix else 'off'}"
            else:
                hint = f"{name}={value}"
            warnings.append(
                f"{where}: warning: short-form boolean option '{flag}' deprecated\n"
                f"Please use {hint} instead"
            )
        if name == "id":
            continue
        if name == "help":
            raise QapiError("Help is not available for this option")
        known = _CHARDEV_BOOL | _CHARDEV_NUMBER | _CHARDEV_STR | _CHARDEV_SIZE
        if name not in known:
            raise QapiError(f"Invalid parameter '{name}'")
        if name in _CHARDEV_BOOL:
            _opts_bool(name, value)
        elif name in _CHARDEV_NUMBER:
            _opts_number(name, value)
        opts[name] = value
    backend = opts.get("backend")
    if backend in ("help", "?"):
        raise QapiError("Help is not available for this option")
    if ident is None:
        raise QapiError("chardev: no id specified")
    if backend is None:
        raise QapiError(f'chardev: "{ident}" missing backend')
    if backend not in _CHARDEV_BACKENDS:
        raise QapiError(f"'{backend}' is not a valid char driver name")
    if backend != "socket":
        raise QapiError(f"chardev backend '{backend}' is not supported by parablock")
    return {"id": ident, "backend": {"type": "socket", "data": _socket_backend(opts)}}


def _socket_backend(opts: dict[str, str]) -> dict[str, object]:
    path, host, port, fd = (opts.get(k) for k in ("path", "host", "port", "fd"))
    if (path is not None) + (fd is not None) + (host is not None) > 1:
        raise QapiError("None or one of 'path', 'fd' or 'host' option required.")
    if host is not None and port is None:
        raise QapiError("chardev: socket: no port given")
    if "delay" in opts and "nodelay" in opts:
        raise QapiError("'delay' and 'nodelay' are mutually exclusive")
    data: dict[str, object] = {}
    addr: dict[str, object]
    if path is not None:
        unix: dict[str, object] = {"path": path}
        for key in ("abstract", "tight"):
            if key in opts:
                unix[key] = _opts_bool(key, opts[key])
        addr = {"type": "unix", "data": unix}
    elif host is not None:
        inet: dict[str, object] = {"host": host, "port": port}
        if "to" in opts:
            inet["to"] = _opts_number("to", opts["to"])
        for key in ("ipv4", "ipv6"):
            if key in opts:
                inet[key] = _opts_bool(key, opts[key])
        addr = {"type": "inet", "data": inet}
    else:
        addr = {"type": "fd", "data": {"str": fd or ""}}
    data["addr"] = addr
    server = _opts_bool("server", opts["server"]) if "server" in opts else False
    data["server"] = server
    for key in ("wait", "telnet", "tn3270", "websocket", "logappend"):
        if key in opts:
            data[key] = _opts_bool(key, opts[key])
    if "delay" in opts or "nodelay" in opts:
        data["nodelay"] = (
            not _opts_bool("delay", opts["delay"]) if "delay" in opts
            else _opts_bool("nodelay", opts["nodelay"])
        )  # fmt: skip
    if "reconnect" in opts:
        data["reconnect"] = _opts_number("reconnect", opts["reconnect"])
    for key in ("tls-creds", "tls-authz", "logfile"):
        if key in opts:
            data[key] = opts[key]
    # qmp_chardev_validate_socket, in QEMU's order.
    if addr["type"] == "fd" and "reconnect" in data:
        raise QapiError("'reconnect' option is incompatible with 'fd' address type")
    if "tls-authz" in data and "tls-creds" not in data:
        raise QapiError("'tls_authz' option requires 'tls_creds' option")
    if server:
        if "reconnect" in data:
            raise QapiError("'reconnect' option is incompatible with socket in server listen mode")
    else:
        if data.get("websocket"):
            raise QapiError("Websocket client is not implemented")
        if "wait" in data:
            raise QapiError("'wait' option is incompatible with socket in client connect mode")
    if addr["type"] == "fd":
        fd_text = str(addr["data"]["str"])  # type: ignore[index]
        if not fd_text.isdigit():
            raise QapiError(f"Unable to parse FD number {fd_text}")
    return data
