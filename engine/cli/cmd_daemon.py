"""``parablock daemon`` — qemu-storage-daemon's command line: ``--blockdev``, ``--object``, ``--chardev``,
``--monitor``, ``--nbd-server``, ``--export``, ``--pidfile``, ``--daemonize``, plus ``--workers N``.

Options are taken in command-line order, as qemu-storage-daemon does (engine.daemon.cmdline parses them);
engine.daemon.main runs the daemon.
"""
from __future__ import annotations

import click

from engine.cli.common import die, global_workers
from engine.cli.main import cli


@cli.command("daemon", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def daemon_cmd(argv: tuple[str, ...]) -> None:
    """Run a storage daemon driven over QMP (qemu-storage-daemon's options)."""
    from engine.daemon.cmdline import CmdlineError, parse_cmdline

    try:
        cfg = parse_cmdline(list(argv))
    except CmdlineError as exc:
        die(str(exc))
    for w in cfg.warnings:
        click.echo(f"parablock: warning: {w}", err=True)
    if cfg.show_help:
        click.echo(__doc__.strip())
        return
    if cfg.show_version:
        from engine.daemon.core import VERSION

        v = VERSION["qemu"]
        click.echo(f"parablock daemon, qemu-storage-daemon {v['major']}.{v['minor']}.{v['micro']} compatible")
        return
    if cfg.workers is None:
        cfg.workers = global_workers()
    from engine.daemon.main import run

    code = run(cfg)
    if code:
        raise SystemExit(code)
