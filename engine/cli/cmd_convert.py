"""``parablock convert`` — qemu-img convert on the worker pool.

Same options and messages as qemu-img 7.2 (``-f -O -o -c -B -F -n -m -W -S -p -q -t -T -l
--target-is-zero``, several sources concatenated), plus ``--workers N``.  Deliberate differences:
``-C`` (copy offloading) is accepted and ignored; ``-r`` limits the bytes copied per second with QEMU's slice-based rate limiter;
``-s ID`` (removed from qemu-img before 7.2, which rejects it) is still accepted as ``-l ID``.
"""
from __future__ import annotations

import os

import click

from engine.cli.common import die, parse_o, parse_rate, start_pool
from engine.cli.main import cli
from engine.cli.progress import ByteProgress
from engine.convert import ConvertOptions, Converter
from engine.driver import driver_class
from engine.errors import BlockError, ImageOpenError
from engine.image import create_image, open_image, path_combine
from engine.units import parse_size


def _parse_snapshot_opts(text: str) -> tuple[str | None, str | None]:
    """(id, name) of ``-l snapshot.id=...,snapshot.name=...`` as QEMU's option parser reads it (``,,`` is
    a comma, the last of repeated keys wins, a bare key means "on")."""
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    vals: dict[str, str] = {}
    for part in parts:
        if not part:
            continue
        key, eq, val = part.partition("=")
        if key not in ("snapshot.id", "snapshot.name"):
            die(f"Invalid parameter '{key}'\nparablock: Failed in parsing snapshot param '{text}'")
        if not eq:
            import sys

            print(f"parablock: warning: short-form boolean option '{key}' deprecated\n"
                  f"Please use {key}=on instead", file=sys.stderr)
            val = "on"
        vals[key] = val
    return vals.get("snapshot.id"), vals.get("snapshot.name")


@cli.command("convert", context_settings={"ignore_unknown_options": False})
@click.option("-f", "src_fmt", default=None)
@click.option("-O", "out_fmt", default="raw")
@click.option("-o", "options", multiple=True)
@click.option("-c", "compress", is_flag=True)
@click.option("-B", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-n", "no_create", is_flag=True)
@click.option("-m", "coroutines", default="8")
@click.option("-W", "out_of_order", is_flag=True)
@click.option("-S", "sparse", default="4k")
@click.option("-p", "progress", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.option("-t", "cache", default=None)
@click.option("-T", "src_cache", default=None)
@click.option("-l", "snapshot_opt", default=None)
@click.option("-s", "snapshot_id", default=None)
@click.option("-C", "copy_offload", is_flag=True)
@click.option("-r", "rate", default=None)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--target-is-zero", "target_is_zero", is_flag=True)
@click.option("--workers", "workers", type=int, default=None,
              help="worker processes (default: CPUs with -c, else CPUs - 1, at least 1)")
@click.argument("files", nargs=-1, required=True)
def convert_cmd(src_fmt, out_fmt, options, compress, backing, backing_fmt, no_create, coroutines,
                out_of_order, sparse, progress, quiet, cache, src_cache, snapshot_opt, snapshot_id,
                copy_offload, rate, force_share, target_is_zero, workers, files):
    """Convert images to another format (qemu-img convert)."""
    # -l: "snapshot.id=ID,snapshot.name=NAME" (both must match) or a plain ID-or-name (even an empty one)
    snapshot = snapshot_opt if snapshot_opt is not None else snapshot_id
    snap_sel = _parse_snapshot_opts(snapshot) if snapshot is not None and snapshot.startswith("snapshot.") \
        else None
    if len(files) < 2:
        die("Must specify image file name")  # qemu-img 7.2's text when there is no target name
    sources, target_name = list(files[:-1]), files[-1]
    if target_is_zero and not no_create:
        die("--target-is-zero requires use of -n flag")
    if compress and copy_offload:
        die("Cannot enable copy offloading when -c is used")
    rate_bps = parse_rate(rate)
    # qemu-img 7.2: cvtnum() (a bare number counts bytes), then the alignment/limit check
    if sparse.strip().isdigit() and int(sparse) >= 1 << 63:
        die("Invalid buffer size for sparse output specified. Must be between 0 and 9223372036854775807.")
    try:
        sparse_bytes = parse_size(sparse, default_suffix="")
    except BlockError:
        die("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\n"
            "parablock: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    if sparse_bytes % 512 or sparse_bytes > 16 << 20:
        die("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to "
            "16777216. Select 0 to disable sparse detection (fully allocates output).")
    try:
        nco = int(coroutines)
        if nco < 1 or nco > 16:
            raise ValueError
    except ValueError:
        die("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16")
    try:
        cls = driver_class(out_fmt)
    except ImageOpenError:
        die(f"Unknown file format '{out_fmt}'")
    if cls.is_protocol:
        die(f"Unknown file format '{out_fmt}'")
    if compress and out_fmt != "qcow2":
        die("Compression not supported for this file format")
    try:
        create_opts = parse_o(options)
    except BlockError as exc:
        die(exc.message)
    if backing is None and create_opts.get("backing_file"):
        backing = create_opts.pop("backing_file")
        backing_fmt = backing_fmt or create_opts.pop("backing_fmt", None)
    if backing is not None:
        if not cls.supports_backing:
            die(f"Backing file not supported for file format '{out_fmt}'")
        if not backing_fmt:
            die("Use of backing file requires explicit backing format")
    if backing is not None and len(sources) > 1:
        die("Backing file not supported with multiple sources")  # same restriction as qemu-img
    if snapshot is not None and len(sources) > 1:
        die("No support for concatenating multiple snapshot")

    pool, ex = start_pool(workers, compress=compress)
    opened = []
    target = None
    bar = None
    try:
        for name in sources:
            try:
                node = open_image(name, ex, fmt=src_fmt, read_only=True)
            except BlockError as exc:
                die(f"Could not open '{name}': {exc.message}")
            opened.append(node)
            if snapshot is not None:
                try:
                    if snap_sel is not None:
                        sid, sname = snap_sel
                        found = [sn for sn in getattr(node, "snapshots", [])
                                 if (sid is not None or sname is not None)
                                 and (sid is None or sn.id_str == sid)
                                 and (sname is None or sn.name == sname)]
                        if not found:
                            raise BlockError("Can't find snapshot")
                        node.load_snapshot_readonly(found[0].id_str)  # type: ignore[attr-defined]
                    else:
                        node.load_snapshot_readonly(snapshot)  # type: ignore[attr-defined]
                except AttributeError:
                    die("Failed to load snapshot: Operation not supported")
                except BlockError:
                    die("Failed to load snapshot: Can't find snapshot")
        total = sum(n.size() for n in opened)
        if not no_create:
            opts = dict(create_opts)
            if backing is not None:
                opts["backing_file"] = backing
                opts["backing_fmt"] = backing_fmt
                try:
                    b = open_image(path_combine(target_name, backing), ex, fmt=backing_fmt, read_only=True)
                    b.close()
                except BlockError as exc:
                    die(f"Could not open backing image: {exc.message}")
            try:
                create_image(target_name, out_fmt, total, ex, opts)
            except BlockError as exc:
                die(f"{target_name}: error while converting {out_fmt}: {exc.message}")
        try:
            target = open_image(target_name, ex, fmt=out_fmt, read_only=False, backing=backing is not None,
                                options={"cache": cache or "unsafe"})
        except BlockError as exc:
            die(f"Could not open '{target_name}': {exc.message}")
        if no_create and target.size() < total:
            die("output file is smaller than input file")  # qemu-img 7.2's text
        zero_init = (not no_create and backing is None) or target_is_zero
        copts = ConvertOptions(compress=compress, sparse=sparse_bytes, target_has_backing=backing is not None,
                               target_zero_init=zero_init, max_inflight=max(nco, 2 * pool.nworkers),
                               out_of_order=out_of_order, rate=rate_bps)
        bar = ByteProgress(total, progress and not quiet, "convert")
        try:
            Converter(opened, target, pool, copts, progress=bar).run()
        except BlockError as exc:
            die(f"error while converting: {exc.message}")
        except OSError as exc:
            die(f"error while converting: {os.strerror(exc.errno or 5)}")
    finally:
        if bar is not None:
            bar.close()
        for n in opened:
            n.close()
        if target is not None:
            target.close()
        ex.close_all()
        pool.close()
