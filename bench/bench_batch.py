"""parablock batch vs a shell loop of qemu-img convert, 2 at a time: 16 images of mixed formats to qcow2.

The images are what a migration meets: qcow2, vdi, vpc (VHD) and raw, plus vmdk, vhdx and qed when this
parablock reads them; each made by qemu-img from one of two patterned raw disks (1 MiB of data, then a
1 MiB hole; one pattern random, one compressible text).  Both sides convert the same 16 images to qcow2
into an emptied directory, in rounds (each command first in turn); the loop is
``xargs -P 2 -L 1 qemu-img convert ...`` (qemu-img's default target cache, which never flushes) and the
same with ``-t writeback`` (one flush per target, as parablock batch does before recording an item done);
parablock is ``parablock batch MANIFEST`` with its defaults.
Printed and written to bench/results/batch.json: median wall times, the median per-pair ratio
parablock/loop, and the peak PSS of each side's whole process tree.  ``--compress`` runs both with -c.

    python bench/bench_batch.py                       # 16 x 256 MiB, 3 pairs
    python bench/bench_batch.py --size 64M --pairs 1  # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_convert import parse_size, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
# (format, qemu-img -o options): cycled over the 16 images
MIX = [("qcow2", []), ("vdi", []), ("vpc", ["-o", "force_size=on"]), ("raw", []), ("vmdk", []),
       ("vhdx", []), ("qed", []), ("vmdk", ["-o", "subformat=streamOptimized"])]


def supported_formats() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from engine.driver import format_names

    return set(format_names())


def make_images(d: Path, size: int) -> list[tuple[Path, str]]:
    d.mkdir(parents=True, exist_ok=True)
    bases = []
    for kind in ("random", "text"):
        p = d / f"base-{kind}.raw"
        if not p.exists() or p.stat().st_size != size:
            with open(p, "wb") as f:
                f.truncate(size)
                for off in range(0, size, 2 * MiB):
                    f.seek(off)
                    if kind == "random":
                        f.write(os.urandom(MiB))
                    else:
                        f.write((b"parablock batch bench line %08d\n" % (off // MiB)) * (MiB // 32))
        bases.append(p)
    have = supported_formats()
    mix = [m for m in MIX if m[0] in have]
    out = []
    for i in range(16):
        fmt, opts = mix[i % len(mix)]
        ext = {"vpc": "vhd"}.get(fmt, fmt)
        img = d / f"disk{i:02d}.{ext}"
        if not img.exists():
            subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *opts, str(bases[i % 2]), str(img)],
                           check=True)
        out.append((img, fmt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/parablock-bench-batch")
    ap.add_argument("--compress", action="store_true")
    args = ap.parse_args()
    if not shutil.which("qemu-img"):
        raise SystemExit("qemu-img is needed for the side-by-side runs (apt-get install qemu-utils)")
    size = parse_size(args.size)
    d = Path(args.dir)
    images = make_images(d / "src", size)
    out = d / "out"
    manifest = d / "batch.json"
    items = [{"name": img.stem, "source": str(img), "source_format": fmt, "target": str(out / f"{img.stem}.qcow2"),
              "compress": args.compress} for img, fmt in images]
    manifest.write_text(json.dumps({"item": items}))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "engine"), str(ROOT / "ipc"),
                    str(ROOT / "workers")], check=False)
    par = [sys.executable, "-m", "engine", "batch", str(manifest), "-q", "--state", str(d / "state.json")]
    c = " -c" if args.compress else ""
    lines = "\n".join(f"-f {fmt} {img} {out / (img.stem + '.qcow2')}" for img, fmt in images)
    (d / "list.txt").write_text(lines + "\n")
    loop = ["sh", "-c", f"xargs -P 2 -L 1 sh -c 'qemu-img convert{c} -O qcow2 \"$@\"' _ < {d / 'list.txt'}"]
    # like for like: parablock batch flushes every target before recording it done; qemu-img convert's
    # default target cache (unsafe) never flushes, -t writeback flushes once at the end
    loop_sync = ["sh", "-c", f"xargs -P 2 -L 1 sh -c 'qemu-img convert{c} -t writeback -O qcow2 \"$@\"' _ "
                             f"< {d / 'list.txt'}"]

    def fresh() -> None:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (d / "state.json").unlink(missing_ok=True)

    rows: dict[str, list] = {"parablock": [], "loop": [], "loop_sync": []}
    cmds = [("parablock", par), ("loop", loop), ("loop_sync", loop_sync)]
    for i in range(args.pairs):
        order = cmds[i % 3:] + cmds[:i % 3]  # each command runs first in turn
        for name, cmd in order:
            fresh()
            subprocess.run(["sync"], check=False)
            rows[name].append(run_measured(cmd, env))
            # every output must equal its source, or the timing means nothing
            for img, fmt in images:
                r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "qcow2", str(img),
                                    str(out / f"{img.stem}.qcow2")])
                if r.returncode != 0:
                    raise SystemExit(f"{name}: {img.name} converted wrongly")
    ratios = [p[0] / q[0] for p, q in zip(rows["parablock"], rows["loop"])]
    ratios_sync = [p[0] / q[0] for p, q in zip(rows["parablock"], rows["loop_sync"])]
    total = 16 * size
    res = {
        "images": [f"{img.name} ({fmt})" for img, fmt in images], "size_each": size, "compress": args.compress,
        "parablock_s": statistics.median(r[0] for r in rows["parablock"]),
        "loop_s": statistics.median(r[0] for r in rows["loop"]),
        "loop_sync_s": statistics.median(r[0] for r in rows["loop_sync"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_vs_flushing_loop": statistics.median(ratios_sync), "ratio_vs_flushing_loop_min": min(ratios_sync),
        "parablock_peak_pss_mib": max(r[1] for r in rows["parablock"]) / MiB,
        "loop_peak_pss_mib": max(r[1] for r in rows["loop"]) / MiB,
        "cpus": len(os.sched_getaffinity(0)),
    }
    print(f"16 images ({', '.join(sorted({f for _, f in images}))}), {size / MiB:.0f} MiB each, "
          f"{'compressed ' if args.compress else ''}to qcow2:")
    print(f"  parablock batch   {res['parablock_s']:.2f} s  ({total / MiB / res['parablock_s']:.0f} MiB/s virtual)"
          f"  peak PSS {res['parablock_peak_pss_mib']:.0f} MiB")
    print(f"  qemu-img loop -P2 {res['loop_s']:.2f} s  ({total / MiB / res['loop_s']:.0f} MiB/s virtual)"
          f"  peak PSS {res['loop_peak_pss_mib']:.0f} MiB")
    print(f"  qemu-img loop -P2 -t writeback {res['loop_sync_s']:.2f} s")
    print(f"  ratio parablock/loop: {res['ratio']:.2f} (min {res['ratio_min']:.2f}); against the loop that "
          f"flushes its targets as parablock does: {res['ratio_vs_flushing_loop']:.2f} "
          f"(min {res['ratio_vs_flushing_loop_min']:.2f})")
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / ("batch-compressed.json" if args.compress else "batch.json")).write_text(
        json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
