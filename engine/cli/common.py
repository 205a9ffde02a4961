"""Helpers shared by the CLI commands: executor construction, image opening with qemu-img's error
texts, ``-o`` option parsing, and the one place where errors become a stderr line and an exit code.

Layer: engine.cli (composition root; imports ``workers``).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator, NoReturn

from engine.driver import BlockDriver
from engine.errors import BlockError, InvalidArgument
from engine.image import open_image
from engine.units import parse_size

PROG = "parablock"


class CliExit(Exception):
    """Raised to end a command with an exit code after its message was printed."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def die(message: str, code: int = 1) -> NoReturn:
    """Print ``parablock: message`` on stderr and exit with ``code``."""
    print(f"{PROG}: {message}", file=sys.stderr)
    raise CliExit(code)


_settings: dict[str, Any] = {"workers": None}
_pools: list[Any] = []


def set_global_workers(n: int | None) -> None:
    _settings["workers"] = n


def global_workers() -> int | None:
    """The group-level ``parablock --workers N``: also the default of convert/commit/bench's own option."""
    return _settings["workers"]


def make_executor():
    """The executor for a command: in-process by default (metadata-bound commands start faster), the
    worker pool when ``parablock --workers N`` asked for it."""
    n = _settings["workers"]
    if not n:
        from workers.inproc import InProcessExecutor

        return InProcessExecutor()
    from workers.pool import PoolExecutor, WorkerPool

    pool = WorkerPool(n, wait=False)
    _pools.append(pool)
    return PoolExecutor(pool)


def copy_workers(compress: bool) -> int:
    """Default worker count of convert and commit: the CPU count when clusters are compressed, else one
    CPU fewer (at least one).  An uncompressed copy is page-cache copying into one target file, and
    buffered writes to one file serialise on its inode lock: a second writer process only spins on that
    lock (``rwsem_spin_on_owner`` in perf) while the coordinator, whose block-status walk and planning
    are the other half of the work, loses its core.  Measured on 2 CPUs, 1 GiB, 7-9 alternating runs:
    1 worker used 7-25% less CPU than 2 and had an equal or lower median wall time in every case
    (chain to raw 0.87 s against 1.37 s)."""
    from workers.pool import default_workers

    n = default_workers()
    return n if compress else max(1, n - 1)


def start_pool(workers: int | None, *, compress: bool = True, **kw: Any):
    """A worker pool for a bulk command (its own ``--workers``, else ``parablock --workers``, else
    ``copy_workers(compress)``) whose start-up overlaps the command's metadata work; returns (pool,
    executor)."""
    from workers.pool import PoolExecutor, WorkerPool

    pool = WorkerPool(workers or global_workers() or copy_workers(compress), wait=False, **kw)
    return pool, PoolExecutor(pool)


def parse_rate(rate: str | None) -> int:
    """``-r RATE`` of convert and commit: bytes per second, 0 when not given.  Dies with qemu-img's
    message for anything but a positive size."""
    if rate is None:
        return 0
    try:
        value = parse_size(rate)
    except BlockError:
        value = -1
    if value <= 0:
        die("Invalid rate limit specified. You may use k, M, G, T, P or E suffixes for\n"
            f"{PROG}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    return value


def shutdown_pools() -> None:
    while _pools:
        _pools.pop().close()


_BOOL_TRUE = {"on", "yes", "true", "1"}
_BOOL_FALSE = {"off", "no", "false", "0"}
_BOOL_OPTS = {"lazy_refcounts", "extended_l2", "data_file_raw", "force_size", "static", "compat6",
              "zeroed_grain", "block_state_zero"}
_SIZE_OPTS = {"cluster_size", "size", "block_size", "log_size"}


def parse_o(opts: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse repeated ``-o a=b,c=d`` into a dict with qemu's value types.

    A ``,,`` is an escaped comma.  Raises InvalidArgument for a malformed option.
    """
    out: dict[str, Any] = {}
    for chunk in opts:
        parts: list[str] = []
        cur = ""
        i = 0
        while i < len(chunk):
            c = chunk[i]
            if c == ",":
                if i + 1 < len(chunk) and chunk[i + 1] == ",":
                    cur += ","
                    i += 2
                    continue
                parts.append(cur)
                cur = ""
            else:
                cur += c
            i += 1
        parts.append(cur)
        for part in parts:
            if not part:
                continue
            if part == "help" or part == "?":
                out["help"] = True
                continue
            if "=" not in part:
                raise InvalidArgument(f"Invalid parameter '{part}'")
            k, v = part.split("=", 1)
            k = k.strip()
            if k in _BOOL_OPTS:
                if v.lower() in _BOOL_TRUE:
                    out[k] = True
                elif v.lower() in _BOOL_FALSE:
                    out[k] = False
                else:
                    raise InvalidArgument(f"Parameter '{k}' expects 'on' or 'off'")
            elif k in _SIZE_OPTS:
                try:
                    out[k] = parse_size(v)
                except InvalidArgument:
                    raise InvalidArgument(f"Parameter '{k}' expects a non-negative number below 2^64\n"
                                          "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                                          "tera-, peta-\nand exabytes, respectively.") from None
            elif k == "refcount_bits":
                try:
                    out[k] = int(v)
                except ValueError:
                    raise InvalidArgument(f"Parameter '{k}' expects a number") from None
            else:
                out[k] = v
    return out


def cache_options(cache: str | None) -> dict[str, Any]:
    valid = {"none", "writeback", "writethrough", "directsync", "unsafe"}
    if cache is None:
        return {}
    if cache not in valid:
        raise InvalidArgument(f"Invalid cache option: {cache}")
    return {"cache": cache}


@contextmanager
def opened(filename: str, fmt: str | None = None, read_only: bool = True, backing: bool = True,
           cache: str | None = None, executor=None, open_error_code: int = 1) -> Iterator[BlockDriver]:
    """Open an image for a command and close it (flushing) afterwards.

    An open failure prints qemu-img's "Could not open 'FILE': reason" and exits ``open_error_code``.
    """
    ex = executor or make_executor()
    try:
        node = open_image(filename, ex, fmt=fmt, read_only=read_only, backing=backing,
                          options=cache_options(cache))
    except BlockError as exc:
        die(f"Could not open '{filename}': {exc.message}", open_error_code)
    try:
        yield node
    finally:
        node.close()


def json_dumps(obj: Any, _level: int = 0) -> str:
    """qemu-img's JSON pretty printing: 4-space indent, ``key": value`` separators, and (as QEMU's
    json-writer) an empty list or object still gets its newline: ``[\n<indent>]``."""
    import json

    pad = " " * (4 * _level)
    inner = " " * (4 * (_level + 1))
    if isinstance(obj, dict):
        items = [f"{inner}{json.dumps(str(k))}: {json_dumps(v, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + ("\n" if items else "") + pad + "}"
    if isinstance(obj, (list, tuple)):
        items = [inner + json_dumps(v, _level + 1) for v in obj]
        return "[\n" + ",\n".join(items) + ("\n" if items else "") + pad + "]"
    return json.dumps(obj)
