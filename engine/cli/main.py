"""Entry point of the ``parablock`` command (also ``python -m engine``).

Each qemu-img command lives in its own module and registers itself on the click group ``cli``, which
imports only the module of the command being run.  Errors
never escape as tracebacks: click usage errors, BlockError and OSError each become one
``parablock: ...`` line on stderr and qemu-img's exit code (1 unless the command defines its own).
"""
from __future__ import annotations

import os
import sys

import click

from engine.cli.common import PROG, CliExit
from engine.errors import BlockError, os_error_text
from ipc.wire import IpcError


class LazyGroup(click.Group):
    """Commands are the modules ``engine/cli/cmd_<name>.py``; only the one being run is imported, so a
    quick ``info`` does not pay for asyncio, the pipeline or the worker pool."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        import pkgutil

        import engine.cli as pkg

        return sorted(m.name[4:] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cmd_"))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.list_commands(ctx):
            import importlib

            importlib.import_module(f"engine.cli.cmd_{name}")  # registers itself on ``cli``
        return self.commands.get(name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option("0.1.0", "-V", "--version", prog_name="parablock")
@click.option("--workers", "workers", type=click.IntRange(1, 256), default=None,
              help="run the command's I/O on N worker processes (convert, commit and bench always do)")
def cli(workers: int | None) -> None:
    """parablock: qemu-img's commands on a multiprocess block engine."""
    from engine.cli.common import set_global_workers

    set_global_workers(workers)


def entry() -> None:
    """The console script (and ``python -m engine``): run, flush, and leave without the interpreter's
    teardown, which costs tens of milliseconds per command; every file and worker is closed by then."""
    rc = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing left to say
            pass
    os._exit(rc)


def main(argv: list[str] | None = None) -> int:
    from engine.cli.common import set_global_workers, shutdown_pools

    set_global_workers(None)
    try:
        return _run(argv)
    finally:
        shutdown_pools()


def _run(argv: list[str] | None) -> int:
    try:
        cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except CliExit as exc:
        return exc.code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
    except click.ClickException as exc:
        print(f"{PROG}: {exc.format_message()}", file=sys.stderr)
        return 1
    except BlockError as exc:
        print(f"{PROG}: {exc.message}", file=sys.stderr)
        return 1
    except IpcError as exc:  # a worker died or the pool could not start: an I/O failure, not a bug
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        name = f"'{exc.filename}': " if exc.filename else ""
        print(f"{PROG}: {name}{os_error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: still one line, never a traceback (PARABLOCK_DEBUG=1 shows it)
        if os.environ.get("PARABLOCK_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0
