"""``parablock batch MANIFEST`` — many conversions and backups in one command, locally or on Dask.

No qemu-img counterpart (the shell loop it replaces: ``qemu-img convert`` per image).  The manifest's
schema is in ``engine/batch/manifest.py`` and docs/BATCH.md.  Output: one progress display with ``-p``
(stderr), the JSON report on stdout (or ``--report FILE``), one ``NAME: failed: ERROR`` line on stderr per
failed item.  Exit status: 0 when every item is done or skipped, 1 when any failed or the manifest is
invalid.
"""
from __future__ import annotations

import json
import sys

import click

from engine.cli.common import die
from engine.cli.main import cli
from engine.errors import BlockError
from engine.units import parse_size


@cli.command("batch")
@click.argument("manifest")
@click.option("--scheduler", default=None, metavar="tcp://HOST:PORT",
              help="Run the items on this Dask distributed scheduler's cluster.")
@click.option("-j", "--jobs", type=int, default=None, help="Items run at once (local runs).")
@click.option("--workers", type=int, default=None,
              help="Worker processes: shared by all items (local), per item (Dask).")
@click.option("--memory", default="64M", help="Shared-memory budget for data buffers (local runs).")
@click.option("--verify", is_flag=True, help="Compare content digests of every source and its target.")
@click.option("--dry-run", is_flag=True, help="Print the plan with size estimates; change nothing.")
@click.option("--state", "state_file", default=None, help="State file (default: MANIFEST.state.json).")
@click.option("--report", "report_file", default=None, help="Write the JSON report here instead of stdout.")
@click.option("-p", "progress", is_flag=True, help="Show progress.")
@click.option("-q", "quiet", is_flag=True, help="No report on stdout.")
@click.option("--target-dir", default=None, help="MANIFEST is a directory: convert every image in it to here.")
@click.option("-O", "out_fmt", default="qcow2", help="With a directory: the target format.")
@click.option("-c", "compress", is_flag=True, help="With a directory: compressed qcow2 targets.")
@click.option("-o", "options", multiple=True, help="With a directory: creation options.")
@click.option("--save-manifest", default=None, help="With a directory: write the manifest made from it.")
def batch_cmd(manifest, scheduler, jobs, workers, memory, verify, dry_run, state_file, report_file, progress,
              quiet, target_dir, out_fmt, compress, options, save_manifest):
    """Run the conversions and backups of a manifest (TOML or JSON) in parallel, or convert every image of
    a directory (``parablock batch DIR --target-dir OUT``)."""
    import os

    from engine.batch.manifest import load
    from engine.batch.runner import load_state, plan, state_path

    if os.path.isdir(manifest):
        m = _from_dir(manifest, target_dir, out_fmt, compress, options, save_manifest, dry_run)
    else:
        if target_dir or save_manifest:
            die("--target-dir and --save-manifest go with a directory of images, not a manifest")
        try:
            m = load(manifest)
        except BlockError as exc:
            die(exc.message)
    if jobs is not None and jobs < 1:
        die("--jobs must be at least 1")
    if workers is not None and workers < 1:
        die("--workers must be at least 1")
    try:
        mem = parse_size(memory)
    except BlockError:
        die(f"Invalid --memory '{memory}'")
    if dry_run:
        doc = {"manifest": m.path, "plan": plan(m, load_state(state_path(m, state_file)), verify)}
        _emit(doc, report_file, quiet)
        for e in doc["plan"]:
            if not quiet:
                est = e.get("measure") or e.get("estimate") or {}
                sizes = ", ".join(f"{k} {v}" for k, v in est.items())
                click.echo(f"{e['name']}: {e['action']} {e['kind']} {e['source']} -> {e['target']} "
                           f"({e['format']}{'; ' + sizes if sizes else ''})"
                           + (f": {e['error']}" if e["error"] else ""), err=True)
        return
    try:
        if scheduler:
            from engine.batch.dask_runner import run_dask

            rep = run_dask(m, scheduler, workers=workers, verify=verify, state_file=state_file,
                           progress=progress)
        else:
            from engine.batch.runner import run_local

            rep = run_local(m, jobs=jobs, workers=workers, memory=mem, verify=verify, state_file=state_file,
                            progress=progress)
    except BlockError as exc:
        die(exc.message)
    _emit(rep, report_file, quiet)
    failed = [r for r in rep["items"] if r["status"] == "failed"]
    if not progress:  # the display already printed them
        for r in failed:
            print(f"{r['name']}: failed: {r['error']}", file=sys.stderr)
    if failed:
        raise SystemExit(1)


def _from_dir(src_dir, target_dir, out_fmt, compress, options, save_manifest, dry_run):
    import os

    from engine.batch.manifest import TARGET_FORMATS
    from engine.batch.scan import manifest_from_dir
    from engine.cli.common import make_executor, parse_o

    if not target_dir:
        die(f"'{src_dir}' is a directory: give --target-dir for the converted images")
    if out_fmt not in TARGET_FORMATS:
        die(f"Unknown target format '{out_fmt}' (one of {', '.join(TARGET_FORMATS)})")
    try:
        opts = {k: ("on" if v is True else "off" if v is False else str(v)) for k, v in parse_o(options).items()}
    except BlockError as exc:
        die(exc.message)
    if not dry_run:
        try:
            os.makedirs(target_dir, exist_ok=True)
        except OSError as exc:
            die(f"Could not create '{target_dir}': {exc.strerror}")
    ex = make_executor()
    try:
        m, items, notes = manifest_from_dir(src_dir, target_dir, out_fmt, compress, opts, ex,
                                            target_dir if os.path.isdir(target_dir) else src_dir)
    except BlockError as exc:
        die(exc.message)
    finally:
        ex.close_all()
    for note in notes:
        click.echo(f"parablock: {note}", err=True)
    if save_manifest:
        try:
            with open(save_manifest, "w") as f:
                f.write(json.dumps({"item": items}, indent=2) + "\n")
        except OSError as exc:
            die(f"Could not write '{save_manifest}': {exc.strerror}")
    return m


def _emit(doc: dict, report_file: str | None, quiet: bool) -> None:
    text = json.dumps(doc, indent=2)
    if report_file:
        try:
            with open(report_file, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            die(f"Could not write the report '{report_file}': {exc.strerror}")
    elif not quiet:
        click.echo(text)
