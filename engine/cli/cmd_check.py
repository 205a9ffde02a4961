"""``parablock check`` — qemu-img check: find (and with -r, repair) qcow2 metadata problems.

Exit codes are qemu-img's: 0 clean, 1 check failed, 2 corruptions, 3 leaks only, 63 no check support.
The checker reads the image file directly (not through the qcow2 driver) so that dirty, corrupt and
hostile images are judged as they are on disk.
"""
from __future__ import annotations

import sys

import click

from engine.cli.common import CliExit, die, json_dumps, make_executor
from engine.cli.main import cli
from engine.errors import BlockError, NotSupported
from engine.formats.file import FileDriver
from engine.image import probe_file


def human_report(r, quiet: bool) -> str:
    lines: list[str] = []
    if not (r.corruptions or r.leaks or r.check_errors):
        lines.append("No errors were found on the image.")
    else:
        if r.corruptions:
            lines += ["", f"{r.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if r.leaks:
            lines += ["", f"{r.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if r.check_errors:
            lines += ["", f"{r.check_errors} internal errors have occurred during the check."]
    if r.total_clusters and r.allocated_clusters:
        lines.append(f"{r.allocated_clusters}/{r.total_clusters} = "
                     f"{r.allocated_clusters * 100.0 / r.total_clusters:.2f}% allocated, "
                     f"{r.fragmented_clusters * 100.0 / r.allocated_clusters:.2f}% fragmented, "
                     f"{r.compressed_clusters * 100.0 / r.allocated_clusters:.2f}% compressed clusters")
    if r.image_end_offset:
        lines.append(f"Image end offset: {r.image_end_offset}")
    return "\n".join(lines)


def json_report(r, filename: str, fmt: str) -> dict:
    """qemu-img's ImageCheck as its QDict prints it: keys in hash-bucket order (corruptions and
    corruptions-fixed come before check-errors), the optional ones only when non-zero."""
    out: dict = {}
    for key, val in (("image-end-offset", r.image_end_offset), ("compressed-clusters", r.compressed_clusters),
                     ("total-clusters", r.total_clusters), ("corruptions", r.corruptions),
                     ("corruptions-fixed", r.corruptions_fixed)):
        if val:
            out[key] = val
    out["check-errors"] = r.check_errors
    for key, val in (("leaks", r.leaks), ("leaks-fixed", r.leaks_fixed),
                     ("allocated-clusters", r.allocated_clusters)):
        if val:
            out[key] = val
    out["filename"] = filename
    out["format"] = fmt
    if r.fragmented_clusters:
        out["fragmented-clusters"] = r.fragmented_clusters
    return out


@cli.command("check")
@click.option("-f", "fmt", default=None)
@click.option("--output", "output", default="human")
@click.option("-r", "repair", default=None)
@click.option("-T", "cache", default=None)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def check_cmd(fmt, output, repair, cache, force_share, quiet, filename, image_opts):
    """Check an image for consistency (qemu-img check)."""
    from engine.formats.qcow2_check import FIX_ERRORS, FIX_LEAKS, check_qcow2

    if output not in ("human", "json"):
        die("--output must be used with human or json as argument.")
    fix = 0
    if repair is not None:
        if repair == "leaks":
            fix = FIX_LEAKS
        elif repair == "all":
            fix = FIX_LEAKS | FIX_ERRORS
        else:
            die(f"Unknown option for -r: '{repair}'. Valid options are 'leaks' and 'all'.")
    ex = make_executor()
    try:
        if fmt is None:
            fmt = probe_file(filename, ex)
        f = FileDriver(filename, ex, read_only=not fix)
    except BlockError as exc:
        die(f"Could not open '{filename}': {exc.message}")
    if fmt != "qcow2":
        f.close()
        r = _check_other(filename, fmt, fix)
    else:
        try:
            try:
                r = check_qcow2(f.read, f.size(), fix, write=f.write if fix else None,
                                truncate=f.truncate if fix else None, flush=f.flush if fix else None)
            except BlockError as exc:
                die(f"Could not open '{filename}': {exc.message}")
        finally:
            f.close()
    for msg in r.messages:
        print(msg, file=sys.stderr)
    if r.error:
        die(f"Check failed: {r.error}")
    if (r.corruptions_fixed or r.leaks_fixed) and output == "human" and not quiet:
        click.echo("The following inconsistencies were found and repaired:\n\n"
                   f"    {r.leaks_fixed} leaked clusters\n    {r.corruptions_fixed} corruptions\n\n"
                   "Double checking the fixed image now...")
    if output == "json":
        click.echo(json_dumps(json_report(r, filename, fmt)))
    elif not quiet:
        click.echo(human_report(r, quiet))
    if r.check_errors:
        die("Check failed")
    if r.corruptions:
        raise CliExit(2)
    if r.leaks:
        raise CliExit(3)


def _check_other(filename: str, fmt: str, fix: int):
    """Formats other than qcow2 check themselves: ``check_image(fix)`` returns a CheckResult, or raises
    NotSupported when the format has no check (or no repair), as qemu-img answers with exit code 63.
    The image is opened with the ``check`` option (QEMU's BDRV_O_CHECK): drivers then let through what
    the check is there to report (vhdx BAT entries past EOF, vdi map entries out of range)."""
    from engine.driver import driver_class
    from engine.image import open_image

    try:
        cls = driver_class(fmt)
    except BlockError:
        die(f"Unknown file format '{fmt}'")
    if not hasattr(cls, "check_image"):
        die("This image format does not support checks", 63)
    try:
        node = open_image(filename, make_executor(), fmt=fmt, read_only=not fix, backing=True,
                          options={"check": True})
    except BlockError as exc:
        die(f"Could not open '{filename}': {exc.message}")
    try:
        return node.check_image(fix)  # type: ignore[attr-defined]
    except NotSupported:
        die("This image format does not support checks", 63)
    except BlockError as exc:
        die(f"Could not open '{filename}': {exc.message}")
    finally:
        node.close()
