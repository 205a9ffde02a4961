"""``parablock snapshot`` — qemu-img snapshot: list, create, apply and delete internal snapshots."""
from __future__ import annotations

import click

from engine.cli.cmd_info import snapshot_table
from engine.cli.common import die, opened
from engine.cli.main import cli
from engine.errors import BlockError


@cli.command("snapshot")
@click.option("-f", "fmt", default=None)
@click.option("-l", "do_list", is_flag=True)
@click.option("-a", "apply_name", default=None)
@click.option("-c", "create_name", default=None)
@click.option("-d", "delete_name", default=None)
@click.option("-q", "quiet", is_flag=True)
@click.option("-U", "--force-share", "force_share", is_flag=True)
@click.option("--image-opts", "image_opts", is_flag=True, hidden=True)
@click.argument("filename")
def snapshot_cmd(fmt, do_list, apply_name, create_name, delete_name, quiet, force_share, image_opts, filename):
    """List, create, apply or delete internal snapshots (qemu-img snapshot)."""
    actions = [a for a in (do_list or None, apply_name, create_name, delete_name) if a is not None]
    if len(actions) > 1:
        die("Cannot mix '-l', '-a', '-c', '-d'")
    writing = not (do_list or not actions)
    with opened(filename, fmt, read_only=not writing, backing=False) as node:
        if not writing:
            snaps = getattr(node, "snapshots", [])
            if snaps:
                from engine.cli.cmd_info import image_info

                click.echo("Snapshot list:")
                click.echo("\n".join(snapshot_table(image_info(node, filename)["snapshots"])))
            return
        if node.format_name != "qcow2":
            verb = "create" if create_name else "apply" if apply_name else "delete"
            name = create_name or apply_name or delete_name
            die(f"Could not {verb} snapshot '{name}': -95 (Operation not supported)")
        try:
            if create_name is not None:
                node.snapshot_create(create_name)  # type: ignore[attr-defined]
            elif apply_name is not None:
                try:
                    node.snapshot_apply(apply_name)  # type: ignore[attr-defined]
                except BlockError as exc:
                    die(f"Could not apply snapshot '{apply_name}': {exc.message}")
            else:
                try:
                    node.snapshot_delete(delete_name)  # type: ignore[attr-defined]
                except BlockError as exc:
                    die(f"Could not delete snapshot '{delete_name}': "
                        f"{exc.message.split(': ', 1)[-1]}")
        except BlockError as exc:
            die(exc.message)
