"""``parablock create`` — qemu-img create: same options, same echo line, same errors.

Deliberate difference: only preallocation=off|metadata for qcow2 (off|falloc|full for raw).
"""
from __future__ import annotations

import click

from engine.cli.common import die, make_executor, opened, parse_o
from engine.cli.main import cli
from engine.driver import driver_class
from engine.errors import BlockError, ImageOpenError
from engine.image import create_image, path_combine
from engine.units import parse_size

_QCOW2_ORDER = ["cluster_size", "extended_l2", "preallocation", "compression_type", "size", "compat",
                "backing_file", "backing_fmt", "lazy_refcounts", "refcount_bits"]
_QCOW2_DEFAULTS = {"cluster_size": 65536, "extended_l2": False, "compression_type": "zlib",
                   "lazy_refcounts": False, "refcount_bits": 16}


def _fmt_val(v) -> str:
    if v is True:
        return "on"
    if v is False:
        return "off"
    return str(v)


# other formats: qemu-img 7.2's option order and the defaults it always prints
_ECHO = {
    "vmdk": (["size", "adapter_type", "backing_file", "backing_fmt", "compat6", "hwversion", "toolsversion",
              "subformat", "zeroed_grain"], {"compat6": False, "hwversion": "undefined"}),
    "vpc": (["size", "subformat", "force_size"], {}),
    "vhdx": (["size", "log_size", "block_size", "subformat", "block_state_zero"],
             {"log_size": 1048576, "block_size": 0}),
    "vdi": (["size", "static"], {"static": False}),
    "qed": (["size", "backing_file", "backing_fmt", "cluster_size", "table_size"], {"cluster_size": 65536}),
}


def echo_line(filename: str, fmt: str, opts: dict) -> str:
    parts = [f"Formatting '{filename}', fmt={fmt}"]
    if fmt == "qcow2" or fmt in _ECHO:
        order, defaults = (_QCOW2_ORDER, _QCOW2_DEFAULTS) if fmt == "qcow2" else _ECHO[fmt]
        merged = {**defaults, **opts}
        for k in order:
            if k in merged and merged[k] is not None:
                parts.append(f"{k}={_fmt_val(merged[k])}")
    else:
        for k in ("size", "preallocation"):
            if k in opts:
                parts.append(f"{k}={_fmt_val(opts[k])}")
    return " ".join(parts)


@cli.command("create")
@click.option("-f", "fmt", default="raw")
@click.option("-b", "backing", default=None)
@click.option("-F", "backing_fmt", default=None)
@click.option("-o", "options", multiple=True)
@click.option("-u", "unsafe", is_flag=True)
@click.option("-q", "quiet", is_flag=True)
@click.argument("filename")
@click.argument("size", required=False)
def create_cmd(fmt, backing, backing_fmt, options, unsafe, quiet, filename, size):
    """Create a new disk image (qemu-img create)."""
    try:
        driver_class(fmt)
    except ImageOpenError:
        die(f"{filename}: Unknown file format '{fmt}'")
    opts = parse_o(options)
    if opts.pop("help", False):
        click.echo("Supported options: backing_file backing_fmt cluster_size compat compression_type "
                   "extended_l2 lazy_refcounts preallocation refcount_bits size")
        return
    if backing:
        opts["backing_file"] = backing
    if backing_fmt:
        opts["backing_fmt"] = backing_fmt
    nbytes = None
    if size is not None:
        try:
            nbytes = parse_size(size)
        except BlockError:
            die("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
                "parablock: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    elif "size" in opts:
        nbytes = opts["size"]
    opts.pop("size", None)
    if opts.get("backing_file"):
        if not driver_class(fmt).supports_backing:
            die(f"{filename}: Backing file not supported for file format '{fmt}'")
        if not opts.get("backing_fmt"):
            die(f"{filename}: Backing file specified without backing format")
        if not unsafe:
            full = path_combine(filename, opts["backing_file"])
            try:
                with opened(full, opts["backing_fmt"], read_only=True) as b:
                    if nbytes is None:
                        nbytes = b.size()
            except BlockError as exc:
                die(f"{filename}: {exc.message}\nCould not open backing image.")
    if nbytes is not None:
        nbytes = (nbytes + 511) // 512 * 512
    echo_opts = dict(opts)
    if nbytes is not None:
        echo_opts["size"] = nbytes
    if not quiet:
        click.echo(echo_line(filename, fmt, echo_opts))
    if nbytes is None:
        die(f"{filename}: Image creation needs a size parameter")
    try:
        create_image(filename, fmt, nbytes, make_executor(), opts)
    except BlockError as exc:
        die(f"{filename}: {exc.message}")
