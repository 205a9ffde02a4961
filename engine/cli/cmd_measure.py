"""``parablock measure`` — qemu-img measure for the qcow2 and raw target formats.

The numbers follow qemu 7.2 exactly: ``qcow2_measure`` (qcow2_calc_prealloc_size with
qcow2_refcount_metadata_size's fixed point, data counted per cluster from the source's block status over
its whole chain, ``bitmaps`` from the source's persistent bitmaps when source and target are qcow2 v3)
and ``raw_measure`` (the virtual size, twice).
"""
from __future__ import annotations

import sys
from typing import Any

import click

from engine.block import block_status_above
from engine.cli.common import PROG, CliExit, json_dumps, make_executor, parse_o
from engine.cli.main import cli
from engine.driver import BlockDriver, Status
from engine.errors import BlockError, InvalidArgument, os_error_text
from engine.image import open_image
from engine.units import _SIZE_RE, parse_size, round_up

# qemu-img 7.2's format drivers: those with creation options but no size measurement, and those
# without creation at all (messages differ).
_NO_MEASURE = {"file", "gluster", "host_cdrom", "host_device", "iscsi", "iser", "nbd", "nfs", "nvme",
               "parallels", "qcow", "qed", "rbd", "ssh", "vdi", "vhdx", "vmdk", "vpc"}
_NO_CREATE = {"blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write",
              "copy-on-read", "dmg", "ftp", "ftps", "http", "https", "null-aio", "null-co", "preallocate",
              "quorum", "replication", "snapshot-access", "throttle", "vvfat"}

_FILE_OPTS = {"size", "preallocation", "nocow", "extent_size_hint"}
_QCOW2_OPTS = _FILE_OPTS | {
    "compat", "backing_file", "backing_fmt", "data_file", "data_file_raw", "encryption", "encrypt.format",
    "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time", "cluster_size", "extended_l2",
    "lazy_refcounts", "refcount_bits", "compression_type"}
_RAW_OPTS = set(_FILE_OPTS)
_LUKS_OPTS = _FILE_OPTS | {"key-secret", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg",
                           "hash-alg", "iter-time", "detached-header"}

_PREALLOC_MODES = ("off", "metadata", "falloc", "full")

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MIN_CLUSTER_BITS_EXTL2 = 14
QCOW_MAX_L1_SIZE = 32 << 20
L1E_SIZE = 8
REFTABLE_ENTRY_SIZE = 8
BME_TABLE_ENTRY_SIZE = 8


class MeasureError(Exception):
    """A measurement failure: the lines qemu prints (each prefixed with the program name)."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0])
        self.lines = lines


# ---------------------------------------------------------------------------------------------------
# qcow2 size math (block/qcow2.c, block/qcow2-refcount.c, block/qcow2-bitmap.c)
# ---------------------------------------------------------------------------------------------------
def _div_round_up(a: int, b: int) -> int:
    return -(-a // b)


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> int:
    """qcow2_refcount_metadata_size: bytes of refcount table plus blocks covering ``clusters``."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = 0
    blocks = 0
    n = 0
    while True:
        last = n
        blocks = _div_round_up(clusters + table + blocks, refcounts_per_block)
        table = _div_round_up(blocks, blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += _div_round_up(table, 2)
            n = 0
            generous_increase = False
        if n == last:
            break
    return (blocks + table) * cluster_size


def calc_prealloc_size(total_size: int, cluster_size: int, refcount_order: int, extended_l2: bool) -> int:
    """qcow2_calc_prealloc_size: file size of a fully allocated image of ``total_size`` bytes."""
    aligned = round_up(total_size, cluster_size)
    l2e_size = 16 if extended_l2 else 8
    meta = cluster_size  # header
    nl2e = aligned // cluster_size
    nl2e = round_up(nl2e, cluster_size // l2e_size)
    meta += nl2e * l2e_size
    nl1e = nl2e * l2e_size // cluster_size
    nl1e = round_up(nl1e, cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size, refcount_order)
    return meta + aligned


def bitmaps_size(node: BlockDriver, cluster_size: int) -> int:
    """qcow2_get_persistent_dirty_bitmap_size for the source's persistent bitmaps."""
    lister = getattr(node, "_bitmap_list", None)
    bitmaps = lister() if lister is not None else None
    total = 0
    dir_size = 0
    size = node.size()
    for bm in bitmaps or []:
        gran = int(bm["granularity"])
        nbytes = _div_round_up(_div_round_up(size, gran), 8)
        nclusters = _div_round_up(nbytes, cluster_size)
        total += nclusters * cluster_size
        total += round_up(nclusters * BME_TABLE_ENTRY_SIZE, cluster_size)
        dir_size += round_up(24 + len(bm["name"].encode("utf-8")), 8)
    return total + round_up(dir_size, cluster_size)


def _supports_persistent_bitmaps(node: BlockDriver) -> bool:
    if node.format_name != "qcow2":
        return False
    h = getattr(node, "h", None)
    return h is not None and h.version >= 3


def allocated_bytes(node: BlockDriver, cluster_size: int) -> int:
    """The data part of ``required``: qcow2_measure's loop over the source's block status."""
    ssize = node.size()
    required = 0
    offset = 0
    while offset < ssize:
        st, pnum = block_status_above(node, offset, ssize - offset)
        if st & Status.ZERO:
            pass
        elif st & (Status.DATA | Status.ALLOCATED) == (Status.DATA | Status.ALLOCATED):
            pnum = round_up(offset + pnum, cluster_size) - offset
            required += offset % cluster_size + pnum
        offset += pnum
    return required


def qcow2_measure(opts: dict[str, Any], node: BlockDriver | None) -> dict[str, int]:
    extended_l2 = bool(opts.get("extended_l2", False))
    cluster_size = int(opts.get("cluster_size", 65536))
    cbits = (cluster_size & -cluster_size).bit_length() - 1 if cluster_size else 0
    if cbits < MIN_CLUSTER_BITS or cbits > MAX_CLUSTER_BITS or (1 << cbits) != cluster_size:
        raise MeasureError(f"Cluster size must be a power of two between {1 << MIN_CLUSTER_BITS} and "
                           f"{1 << (MAX_CLUSTER_BITS - 10)}k")
    if extended_l2 and cbits < MIN_CLUSTER_BITS_EXTL2:
        raise MeasureError("Extended L2 entries are only supported with cluster sizes of at least "
                           f"{1 << MIN_CLUSTER_BITS_EXTL2} bytes")
    compat = opts.get("compat")
    version = 3
    if compat is not None:
        if compat == "0.10":
            version = 2
        elif compat == "1.1":
            version = 3
        else:
            raise MeasureError(f"Invalid compatibility level: '{compat}'")
    refcount_bits = int(opts.get("refcount_bits", 16))
    if refcount_bits > 64 or refcount_bits <= 0 or refcount_bits & (refcount_bits - 1):
        raise MeasureError("Refcount width must be a power of two and may not exceed 64 bits")
    if version < 3 and refcount_bits != 16:
        raise MeasureError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                           "(use compat=1.1 or greater)")
    prealloc = str(opts.get("preallocation", "off"))
    if prealloc not in _PREALLOC_MODES:
        raise MeasureError(f"invalid parameter value: {prealloc}")
    has_backing = bool(opts.get("backing_file"))
    if opts.get("encrypt.format") == "luks":
        if not opts.get("encrypt.key-secret"):
            raise MeasureError("Parameter 'encrypt.key-secret' is required for cipher")
        raise MeasureError("parablock cannot measure qcow2 images with LUKS encryption")

    virtual_size = round_up(int(opts.get("size", 0)), cluster_size)
    l2e_size = 16 if extended_l2 else 8
    l2_tables = _div_round_up(virtual_size // cluster_size, cluster_size // l2e_size)
    if l2_tables * l2e_size > QCOW_MAX_L1_SIZE:
        raise MeasureError("The image size is too large (try using a larger cluster size)")

    required = 0
    if node is not None:
        ssize = node.size()
        virtual_size = round_up(ssize, cluster_size)
        if has_backing:
            required = virtual_size
        else:
            try:
                required = allocated_bytes(node, cluster_size)
            except (BlockError, OSError) as exc:
                text = exc.message if isinstance(exc, BlockError) else os_error_text(exc)
                raise MeasureError(f"Unable to get block status: {text}") from None
    if prealloc in ("full", "falloc"):
        required = virtual_size

    refcount_order = refcount_bits.bit_length() - 1
    fully = calc_prealloc_size(virtual_size, cluster_size, refcount_order, extended_l2)
    info: dict[str, int] = {}
    if version >= 3 and node is not None and _supports_persistent_bitmaps(node):
        info["bitmaps"] = bitmaps_size(node, cluster_size)
    info["required"] = fully - virtual_size + required
    info["fully-allocated"] = fully
    # qemu-img prints the QDict in its hash order: bitmaps, required, fully-allocated
    return info


def raw_measure(opts: dict[str, Any], node: BlockDriver | None) -> dict[str, int]:
    required = node.size() if node is not None else int(opts.get("size", 0))
    return {"required": required, "fully-allocated": required}


def _parse_opts(out_fmt: str, options: list[str]) -> dict[str, Any]:
    if not options:
        return {}
    valid = {"qcow2": _QCOW2_OPTS, "raw": _RAW_OPTS, "luks": _LUKS_OPTS}[out_fmt]
    try:
        opts = parse_o(options)
    except InvalidArgument as exc:
        raise MeasureError(*exc.message.split("\n"), f"Invalid options for file format '{out_fmt}'") from None
    for k in opts:
        if k not in valid:
            raise MeasureError(f"Invalid parameter '{k}'", f"Invalid options for file format '{out_fmt}'")
    for k in ("nocow", "encryption"):
        v = opts.get(k)
        if isinstance(v, str):
            if v.lower() in ("on", "yes", "true", "1"):
                opts[k] = True
            elif v.lower() in ("off", "no", "false", "0"):
                opts[k] = False
            else:
                raise MeasureError(f"Parameter '{k}' expects 'on' or 'off'",
                                   f"Invalid options for file format '{out_fmt}'")
    return opts


def _parse_img_size(text: str) -> int:
    if not _SIZE_RE.match(text):
        raise MeasureError("Invalid image size specified. You may use k, M, G, T, P or E suffixes for",
                           "kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    try:
        return parse_size(text)
    except InvalidArgument:
        raise MeasureError("Invalid image size specified. Must be between 0 and 9223372036854775807.") from None


def measure(output: str, out_fmt: str, options: list[str], size_text: str | None, fmt: str | None,
            snapshot: str | None, files: tuple[str, ...]) -> None:
    if output not in ("human", "json"):
        raise MeasureError("--output must be used with human or json as argument.")
    img_size = _parse_img_size(size_text) if size_text is not None else None
    if len(files) > 1:
        raise MeasureError("At most one filename argument is allowed.")
    filename = files[0] if files else None
    if filename is None and (fmt is not None or snapshot is not None):
        raise MeasureError("--image-opts, -f, and -l require a filename argument.")
    if filename is not None and img_size is not None:
        raise MeasureError("--size N cannot be used together with a filename.")
    if filename is None and img_size is None:
        raise MeasureError("Either --size N or one filename must be specified.")

    node: BlockDriver | None = None
    try:
        if filename is not None:
            try:
                node = open_image(filename, make_executor(), fmt=fmt, read_only=True, backing=True)
            except BlockError as exc:
                raise MeasureError(f"Could not open '{filename}': {exc.message}") from None
            except OSError as exc:
                raise MeasureError(f"Could not open '{filename}': {os_error_text(exc)}") from None
            if snapshot is not None:
                _load_snapshot(node, snapshot)

        if out_fmt in _NO_CREATE:
            raise MeasureError(f"Format driver '{out_fmt}' does not support image creation")
        if out_fmt in _NO_MEASURE:
            raise MeasureError(f"Block driver '{out_fmt}' does not support size measurement")
        if out_fmt not in ("qcow2", "raw", "luks"):
            raise MeasureError(f"Unknown file format '{out_fmt}'")
        opts = _parse_opts(out_fmt, options)
        if img_size is not None:
            opts["size"] = round_up(img_size, 512)
        if out_fmt == "qcow2":
            info = qcow2_measure(opts, node)
        elif out_fmt == "raw":
            info = raw_measure(opts, node)
        else:
            if not opts.get("key-secret"):
                raise MeasureError("Parameter 'key-secret' is required for cipher")
            raise MeasureError("parablock cannot measure the luks format")
    finally:
        if node is not None:
            try:
                node.close()
            except (BlockError, OSError):
                pass

    if output == "human":
        click.echo(f"required size: {info['required']}")
        click.echo(f"fully allocated size: {info['fully-allocated']}")
        if "bitmaps" in info:
            click.echo(f"bitmaps size: {info['bitmaps']}")
    else:
        click.echo(json_dumps(info))


def _load_snapshot(node: BlockDriver, name: str) -> None:
    """bdrv_snapshot_load_tmp_by_id_or_name with qemu-img measure's messages."""
    find = getattr(node, "find_snapshot", None)
    if find is None:
        raise MeasureError(f"Failed to load snapshot: Block format '{node.format_name}' used by device '' "
                           "does not support temporarily loading internal snapshots")
    if find(name) is None:
        raise MeasureError("Failed to load snapshot: Can't find snapshot")
    # qemu switches only the L1 table; the node keeps its current virtual size
    size = node.size()
    try:
        node.load_snapshot_readonly(name)  # type: ignore[attr-defined]
    except BlockError as exc:
        raise MeasureError(f"Failed to load snapshot: {exc.message}") from None
    h = getattr(node, "h", None)
    if h is not None and hasattr(h, "size"):
        h.size = size


@cli.command("measure")
@click.option("--output", "output", default="human")
@click.option("-O", "out_fmt", default="raw")
@click.option("-o", "options", multiple=True)
@click.option("--size", "size_text", default=None)
@click.option("-f", "fmt", default=None)
@click.option("-l", "snapshot", default=None)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.option("--object", "objects", multiple=True, hidden=True)
@click.argument("files", nargs=-1)
def measure_cmd(output, out_fmt, options, size_text, fmt, snapshot, force_share, image_opts, objects, files):
    """Calculate the file size required for a new image (qemu-img measure)."""
    try:
        if image_opts:
            raise MeasureError("--image-opts is not supported")
        measure(output, out_fmt, list(options), size_text, fmt, snapshot, files)
    except MeasureError as exc:
        sys.stdout.flush()
        for line in exc.lines:
            print(f"{PROG}: {line}", file=sys.stderr)
        raise CliExit(1) from None
