"""``parablock jobs`` — list (or watch) the block jobs of a running ``parablock daemon`` (or any
qemu-storage-daemon / QEMU) over its QMP socket.  No qemu-img counterpart: it is what a person would do
with ``query-block-jobs`` in qmp-shell, made readable.

Layer: engine.cli.  The QMP client here is deliberately small and synchronous (standard library only):
greeting, ``qmp_capabilities``, ``execute`` with a reply matched by ``id``; events read while waiting for
a reply are kept in ``events`` (the watch reports job outcomes from them) and never mistaken for replies.
Every failure — no socket, refused, not a QMP server, connection closed — is a ``QmpClientError`` that
the command turns into one ``parablock: ...`` line and exit code 1.
"""
from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any

import click

from engine.cli.common import die
from engine.cli.main import cli


class QmpClientError(Exception):
    """Connection-level failure (the message is the whole user-visible text)."""


class QmpCommandError(QmpClientError):
    """An ``{"error": {"class", "desc"}}`` reply."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class QmpClient:
    """A synchronous QMP client on a unix socket.

    Raises QmpClientError from ``connect`` (cannot connect, no greeting, not QMP, capabilities refused)
    and from ``execute`` (connection lost, timeout, malformed reply); QmpCommandError for an error reply.
    """

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._next_id = 0

    # ---------------------------------------------------------------- connection
    def connect(self) -> dict[str, Any]:
        from engine.errors import os_error_text

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise QmpClientError(f"Could not connect to '{self.path}': {os_error_text(exc)}") from None
        self.sock = s
        try:
            greeting = self._recv()
        except QmpClientError as exc:
            self.close()
            raise QmpClientError(f"'{self.path}' is not a QMP server ({exc})") from None
        if not isinstance(greeting, dict) or not isinstance(greeting.get("QMP"), dict):
            self.close()
            raise QmpClientError(f"'{self.path}' is not a QMP server (no QMP greeting)")
        self.greeting = greeting
        try:
            self.execute("qmp_capabilities")
        except QmpCommandError as exc:
            self.close()
            raise QmpClientError(f"'{self.path}': qmp_capabilities failed: {exc.desc}") from None
        return greeting

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None

    # ---------------------------------------------------------------- messages
    def _recv(self) -> Any:
        """The next top-level JSON value from the stream."""
        assert self.sock is not None
        dec = json.JSONDecoder()
        while True:
            text = self.buf.lstrip()
            if text:
                try:
                    value, end = dec.raw_decode(text.decode("utf-8", "replace"))
                except ValueError:
                    if b"\n" in text:  # a complete line that is not JSON
                        raise QmpClientError("malformed message") from None
                else:
                    # raw_decode counts characters; re-encode the consumed prefix to find its byte length
                    consumed = len(text.decode("utf-8", "replace")[:end].encode("utf-8"))
                    self.buf = text[consumed:]
                    return value
            if len(self.buf) > 64 << 20:
                raise QmpClientError("message too long")
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise QmpClientError("timed out waiting for the server") from None
            except OSError as exc:
                raise QmpClientError(f"connection lost: {exc.strerror or exc}") from None
            if not data:
                raise QmpClientError("connection closed by the server")
            self.buf += data

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        if self.sock is None:
            raise QmpClientError("not connected")
        self._next_id += 1
        rid = f"pb{self._next_id}"
        req: dict[str, Any] = {"execute": name, "id": rid}
        if arguments:
            req["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except OSError as exc:
            raise QmpClientError(f"connection lost: {exc.strerror or exc}") from None
        while True:
            msg = self._recv()
            if not isinstance(msg, dict):
                raise QmpClientError("malformed message")
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != rid:
                continue  # a reply to somebody else's request cannot happen on our connection; skip it
            if "error" in msg:
                err = msg["error"] if isinstance(msg["error"], dict) else {}
                raise QmpCommandError(str(err.get("class", "GenericError")), str(err.get("desc", "")))
            if "return" not in msg:
                raise QmpClientError("malformed reply")
            return msg["return"]

    def take_events(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


# --------------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------------
def merged_jobs(client: QmpClient) -> list[dict[str, Any]]:
    """query-block-jobs entries, plus query-jobs entries that are not block jobs (offset/len from
    current-/total-progress), in the daemon's order."""
    block = client.execute("query-block-jobs")
    try:
        generic = client.execute("query-jobs")
    except QmpCommandError:  # a peer without query-jobs (very old QEMU)
        generic = []
    out = [dict(b) for b in block]
    known = {b.get("device") for b in block}
    for j in generic:
        if j.get("id") not in known:
            e = {"device": j.get("id"), "type": j.get("type"), "status": j.get("status"),
                 "offset": j.get("current-progress", 0), "len": j.get("total-progress", 0), "speed": 0}
            if "error" in j:
                e["error"] = j["error"]
            out.append(e)
    return out


def _size(n: int) -> str:
    from engine.units import human_size

    return human_size(n)


def human_table(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "No active jobs"
    rows = [("ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "")]
    for j in jobs:
        off, ln = int(j.get("offset") or 0), int(j.get("len") or 0)
        pct = f"{100.0 * off / ln:6.2f}%" if ln else "   -   "
        speed = int(j.get("speed") or 0)
        flags = []
        if j.get("paused"):
            flags.append("paused")
        if j.get("io-status", "ok") != "ok":
            flags.append(f"io-status={j['io-status']}")
        if j.get("error"):
            flags.append(f"error: {j['error']}")
        rows.append((str(j.get("device")), str(j.get("type")), str(j.get("status")),
                     f"{off}/{ln} ({pct.strip()})", f"{_size(speed)}/s" if speed else "unlimited",
                     ", ".join(flags)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        cells = [r[i].ljust(widths[i]) for i in range(5)] + ([r[5]] if r[5] else [])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def outcome_line(ev: dict[str, Any]) -> str | None:
    name, data = ev.get("event"), ev.get("data") or {}
    jid, jtype = data.get("device", data.get("id")), data.get("type", "job")
    if name == "BLOCK_JOB_COMPLETED":
        if data.get("error"):
            return f"{jid}: {jtype} failed: {data['error']}"
        return f"{jid}: {jtype} completed ({data.get('offset', 0)}/{data.get('len', 0)} bytes)"
    if name == "BLOCK_JOB_CANCELLED":
        return f"{jid}: {jtype} cancelled"
    if name == "BLOCK_JOB_READY":
        return f"{jid}: {jtype} ready (waiting for job-complete)"
    if name == "BLOCK_JOB_ERROR":
        return f"{jid}: I/O error on {data.get('operation')} (action {data.get('action')})"
    return None


def watch(client: QmpClient, interval: float, output: str) -> None:
    from engine.cli.progress import JobBars

    if output == "json":
        while True:
            jobs = client.execute("query-jobs")
            click.echo(json.dumps(jobs))
            if not jobs:
                return
            time.sleep(interval)
    bars = JobBars(file=sys.stdout, leave=False)
    try:
        while True:
            jobs = merged_jobs(client)
            for ev in client.take_events():
                line = outcome_line(ev)
                if line:
                    bars.note(line)
            bars.update(jobs)
            if not jobs:
                return
            time.sleep(interval)
    finally:
        bars.close()


@cli.command("jobs")
@click.option("--qmp", "sock", required=True, metavar="SOCKET", help="the daemon's QMP (unix) socket")
@click.option("--watch", "-w", "watch_", is_flag=True,
              help="refresh a live display (one bar per job) until no job remains, or Ctrl-C")
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=0.5, show_default=True,
              metavar="S", help="seconds between refreshes with --watch")
@click.option("--output", type=click.Choice(["human", "json"]), default="human", show_default=True)
def jobs_cmd(sock: str, watch_: bool, interval: float, output: str) -> None:
    """List the block jobs of a running daemon (query-block-jobs / query-jobs).

    Shows each job's id, type, status, progress (offset/len) and speed limit.  --output json prints
    query-jobs' raw list (with --watch: one JSON line per refresh until the list is empty).  --watch
    draws one progress bar per job with rate and ETA, notes how each job ended, and returns when no job
    is left; Ctrl-C just stops watching (exit 0).
    """
    client = QmpClient(sock)
    try:
        client.connect()
        if watch_:
            try:
                watch(client, interval, output)
            except KeyboardInterrupt:
                pass
            return
        if output == "json":
            from engine.cli.common import json_dumps

            click.echo(json_dumps(client.execute("query-jobs")))
        else:
            click.echo(human_table(merged_jobs(client)))
    except QmpCommandError as exc:
        die(f"{exc.cls}: {exc.desc}")
    except QmpClientError as exc:
        die(str(exc))
    finally:
        client.close()
