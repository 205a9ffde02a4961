"""``parablock daemon``: qemu-storage-daemon's process — command-line actions in order, monitors, the
worker pool, signals, pidfile, daemonize, and a clean shutdown.

Layer: engine.daemon (composition root: imports ``workers``).  Start-up runs the command line's
``--blockdev``/``--object``/``--chardev``/``--monitor`` actions in order; any failure prints one
``parablock: ...`` line and exits 1 with nothing left behind.  ``quit``, SIGTERM, SIGINT and SIGHUP
cancel the jobs, flush and close every image, stop the workers and remove the sockets and pidfile.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any, Callable

from engine.daemon.core import Daemon, QmpError
from engine.errors import BlockError


class StartupError(Exception):
    pass


def _chardev_path(opts: dict[str, Any]) -> str:
    """The unix socket path of a ``--chardev socket,id=,path=,server=on,wait=off`` (ChardevBackend shape)."""
    backend = opts.get("backend") or {}
    data = backend.get("data") or {}
    addr = data.get("addr") or {}
    path = (addr.get("data") or {}).get("path") if addr.get("type") == "unix" else None
    if backend.get("type") != "socket" or not path:
        raise StartupError(f"chardev '{opts.get('id')}': only unix socket chardevs (path=...) are supported")
    if data.get("server") is False:
        raise StartupError(f"chardev '{opts.get('id')}': only server=on sockets are supported")
    return path


async def _setup(daemon: Daemon, cfg: Any, servers: list[Any]) -> None:
    from engine.daemon.server import MonitorServer

    chardevs: dict[str, dict[str, Any]] = {}
    for kind, opts in cfg.actions:
        try:
            if kind == "blockdev":
                daemon.graph.blockdev_add(opts)
            elif kind == "object":
                daemon.object_add(opts)
            elif kind == "chardev":
                cid = opts.get("id")
                if cid in chardevs:
                    raise StartupError(f"attempt to add duplicate property '{cid}' to object (type 'container')")
                _chardev_path(opts)
                chardevs[cid] = opts
            elif kind == "monitor":
                cid = opts.get("chardev")
                if cid not in chardevs:
                    raise StartupError(f"chardev \"{cid}\" not found")
                if opts.get("mode", "control") != "control":
                    raise StartupError("Only QMP is supported")
                srv = MonitorServer(daemon, _chardev_path(chardevs[cid]))
                await srv.start()
                servers.append(srv)
            elif kind == "nbd-server":
                from engine.daemon.cmdline import nbd_server_start_args

                await daemon.execute("nbd-server-start", nbd_server_start_args(opts))
            elif kind == "export":
                await daemon.execute("block-export-add", opts)
        except (BlockError, QmpError) as exc:
            raise StartupError(f"--{kind}: {getattr(exc, 'message', None) or getattr(exc, 'desc', str(exc))}") \
                from None
        except OSError as exc:
            raise StartupError(f"--{kind}: {exc.strerror or exc}") from None


def _make_executor(workers: int | None) -> tuple[Any, Any]:
    if workers == 0:
        from workers.inproc import InProcessExecutor

        return None, InProcessExecutor()
    from workers.pool import PoolExecutor, WorkerPool

    pool = WorkerPool(workers or os.cpu_count() or 1, wait=False)
    return pool, PoolExecutor(pool)


async def serve(cfg: Any, ready: Callable[[str | None], None]) -> int:
    """Run the daemon until quit or a signal; ``ready(None)`` once started, ``ready(msg)`` on failure."""
    pool, executor = _make_executor(cfg.workers)
    daemon = Daemon(executor)
    servers: list[Any] = []
    loop = asyncio.get_running_loop()
    code = 0
    try:
        try:
            await _setup(daemon, cfg, servers)
            if cfg.pidfile:
                with open(cfg.pidfile, "w") as f:
                    f.write(f"{os.getpid()}\n")
        except StartupError as exc:
            ready(str(exc))
            code = 1
            return code
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.add_signal_handler(sig, daemon.stop_requested.set)
        ready(None)
        await daemon.stop_requested.wait()
        return code
    finally:
        try:
            await daemon.shutdown()
        finally:
            for srv in servers:
                await srv.close()
            if pool is not None:
                pool.close()
            if cfg.pidfile and code == 0:
                try:
                    os.unlink(cfg.pidfile)
                except OSError:
                    pass


def run(cfg: Any) -> int:
    """Entry point: returns the exit code.  With ``--daemonize`` the parent returns once the child has
    started (0) or failed (1, after printing the child's message)."""
    if not cfg.daemonize:
        msgs: list[str] = []

        def ready(msg: str | None) -> None:
            if msg:
                msgs.append(msg)
                print(f"parablock: {msg}", file=sys.stderr)

        return asyncio.run(serve(cfg, ready))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            status = r.readline()  # one line, not EOF: the daemon's workers may hold the pipe open
        if status.startswith(b"ok"):
            return 0
        msg = status.decode(errors="replace").strip() or "daemon exited during start-up"
        print(f"parablock: {msg}", file=sys.stderr)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        return 1
    # child: a new session, stdio on /dev/null before any worker starts (so no worker keeps the
    # caller's terminal or pipes open); start-up errors travel through the status pipe instead
    os.close(rfd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    os.set_inheritable(wfd, False)

    def ready_child(msg: str | None) -> None:
        try:
            os.write(wfd, b"ok\n" if msg is None else msg.replace("\n", " ").encode() + b"\n")
            os.close(wfd)
        except OSError:
            pass

    code = asyncio.run(serve(cfg, ready_child))
    os._exit(code)
