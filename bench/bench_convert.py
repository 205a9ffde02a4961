"""parablock convert vs qemu-img convert, side by side in the same run.

Builds the images of ../shared/reference/perf-anchors.md (a virtual disk, half allocated: alternating
1 MiB of random data and a 1 MiB hole), then runs each case as A/B pairs (parablock and qemu-img, the
order swapped every other pair) after one uncounted warm-up pair.  Before each run the previous output is
removed, the file system synced and --prefault GiB of memory touched (see ``prefault``).  Prints the
medians, the median of the per-pair ratios parablock/qemu-img, MiB/s and the peak PSS summed over each
tool's whole process tree.  Results, every run's figures included, also go to
bench/results/convert.json.

    python bench/bench_convert.py                 # 4 GiB image, 5 pairs
    python bench/bench_convert.py --size 1G --pairs 3 --cases raw-qcow2,qcow2-raw
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def _pss(pid: int) -> int:
    """Proportional set size: shared memory (our slot segment) counted once across the tree."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """Wall time and the peak of the summed PSS of the process and all its descendants (sampled every
    20 ms, light enough not to slow a 2-core machine down)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    proc = psutil.Process(p.pid)
    peak = 0
    while p.poll() is None:
        try:
            pids = [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except psutil.Error:
            pids = []
        peak = max(peak, sum(_pss(pid) for pid in pids))
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode() if p.stderr else ''}")
    return wall, peak


def prefault(gib: float) -> None:
    """Touch ``gib`` GiB of anonymous memory and free it again (perf-anchors.md, series S2).  This VM hands
    freed pages back to its host (virtio-balloon free page reporting) and the next first touch of such a
    page costs a host fault: a run that writes GiBs of new page cache then takes 2-4x longer, depending
    on what ran before it.  Prefaulting before every run gives each tool the same start."""
    if gib <= 0:
        return
    import mmap

    populate = getattr(mmap, "MAP_POPULATE", 0x8000)
    m = mmap.mmap(-1, int(gib * (1 << 30)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
    m.close()


def _order(k: int, pair: tuple) -> tuple:
    """A, B in even pairs and B, A in odd ones: neither tool always runs right after the other."""
    return pair if k % 2 == 0 else pair[::-1]


def default_workers(compress: bool) -> int:
    """The worker count parablock picks without --workers (engine.cli.common.copy_workers)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return n if compress else max(1, n - 1)


def make_images(d: Path, size: int) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    a = d / "a.raw"
    if not a.exists() or a.stat().st_size != size:
        rnd = os.urandom(MiB)
        with open(a, "wb") as f:
            f.truncate(size)
            for off in range(0, size, 2 * MiB):
                f.seek(off)
                f.write(rnd if off % (8 * MiB) else os.urandom(MiB))
    b = d / "b.qcow2"
    if not b.exists():
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(a), str(b)], check=True)
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    if not top.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(size)], check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(mid)],
                       check=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", str(top)],
                       check=True)
        for img, start, pat in ((base, 0, 1), (mid, 2 * MiB, 2), (top, 4 * MiB, 3)):
            cmds = []
            for off in range(start, size, 6 * MiB):
                cmds += ["-c", f"write -q -P {pat} {off} {2 * MiB}"]
            for i in range(0, len(cmds), 400):
                subprocess.run(["qemu-io", "-f", "qcow2", *cmds[i:i + 400], str(img)], check=True,
                               stdout=subprocess.DEVNULL)
    c = d / "c.raw"
    csize = min(size // 8, 512 * MiB)
    if not c.exists() or c.stat().st_size != csize:
        words = [os.urandom(8).hex().encode() for _ in range(4096)]
        import random

        rng = random.Random(1)
        with open(c, "wb") as f:
            while f.tell() < csize:
                f.write(b" ".join(rng.choice(words) for _ in range(8192))[:csize - f.tell()])
    return {"a": a, "b": b, "top": top, "c": c}


CASES = {
    # name: (source key, source fmt, extra args, output fmt, virtual size key)
    "raw-qcow2": ("a", "raw", [], "qcow2"),
    "qcow2-raw": ("b", "qcow2", [], "raw"),
    "chain-raw": ("top", "qcow2", [], "raw"),
    "compressed-raw-qcow2": ("c", "raw", ["-c"], "qcow2"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="4G")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/parablock-bench")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cases", default=",".join([*CASES, "commit"]))
    ap.add_argument("--prefault", type=float, default=None,
                    help="GiB of memory to touch and free before every run (default: the image size, 0 = off)")
    args = ap.parse_args()
    if not shutil.which("qemu-img"):
        raise SystemExit("qemu-img is needed for the side-by-side runs (apt-get install qemu-utils)")
    size = parse_size(args.size)
    warm = args.prefault if args.prefault is not None else size / (1 << 30)
    d = Path(args.dir) / args.size  # images of each size apart: a stale smaller image would skew the case
    imgs = make_images(d, size)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}  # a user has .pyc files
    env["PYTHONPATH"] = str(ROOT)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "engine"), str(ROOT / "ipc"),
                    str(ROOT / "workers")], check=False)
    eng = [sys.executable, "-m", "engine"] + (["--workers", str(args.workers)] if args.workers else [])
    par = eng + ["convert"]
    results = []
    for name in args.cases.split(","):
        if name not in CASES:
            continue
        src_key, sfmt, extra, ofmt = CASES[name]
        src = imgs[src_key]
        out = d / f"out.{ofmt}"
        vsize = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-f", sfmt, str(src)],
                                              capture_output=True, text=True, check=True).stdout)["virtual-size"])
        rows = {"parablock": [], "qemu-img": []}
        ratios = []
        for k in range(-1, args.pairs):  # pair -1 is a warm-up, not counted
            pair = {}
            for tool in _order(k, ("parablock", "qemu-img")):
                if out.exists():
                    out.unlink()
                os.sync()  # clean slate: no run pays for the previous one's writeback (perf-anchors §3.1)
                prefault(warm)
                cmd = (par if tool == "parablock" else ["qemu-img", "convert"]) + \
                    ["-f", sfmt, "-O", ofmt, *extra, str(src), str(out)]
                wall, rss = run_measured(cmd, env)
                if k >= 0:
                    rows[tool].append((wall, rss))
                pair[tool] = wall
                if tool == "parablock":
                    psize = out.stat().st_size
                else:
                    qsize = out.stat().st_size
            if k >= 0:
                ratios.append(pair["parablock"] / pair["qemu-img"])
        res = {"case": name, "virtual_size": vsize, "pairs": args.pairs,
               "workers": args.workers or default_workers("-c" in extra)}
        for tool, vals in rows.items():
            walls = [w for w, _ in vals]
            res[tool] = {"median_s": statistics.median(walls), "min_s": min(walls), "walls": walls,
                         "MiB_per_s": vsize / MiB / statistics.median(walls),
                         "peak_pss_MiB": max(r for _, r in vals) / MiB}
        res["ratio_median"] = statistics.median(ratios)
        res["ratio_min"] = min(ratios)
        res["ratios"] = ratios
        res["output_size_ratio"] = psize / qsize
        results.append(res)
        print(f"{name:22s} parablock {res['parablock']['median_s']:.3f}s ({res['parablock']['MiB_per_s']:.0f} MiB/s,"
              f" {res['parablock']['peak_pss_MiB']:.0f} MiB)  qemu-img {res['qemu-img']['median_s']:.3f}s "
              f"({res['qemu-img']['MiB_per_s']:.0f} MiB/s, {res['qemu-img']['peak_pss_MiB']:.0f} MiB)  "
              f"ratio {res['ratio_median']:.2f} (min {res['ratio_min']:.2f})  output size ratio "
              f"{res['output_size_ratio']:.3f}", flush=True)
    if "commit" in args.cases.split(","):
        # commit of the 3-deep chain into its base (qemu-img commit -b): a fresh copy of the chain each run
        work = d / "commit"
        rows = {"parablock": [], "qemu-img": []}
        ratios = []
        for k in range(-1, args.pairs):
            pair = {}
            for tool in _order(k, ("parablock", "qemu-img")):
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                for name in ("base.qcow2", "mid.qcow2", "top.qcow2"):
                    subprocess.run(["cp", "--sparse=always", str(d / name), str(work / name)], check=True)
                os.sync()
                prefault(warm)
                cmd = (eng if tool == "parablock" else ["qemu-img"]) + \
                    ["commit", "-q", "-b", str(work / "base.qcow2"), str(work / "top.qcow2")]
                wall, pss = run_measured(cmd, env)
                if k >= 0:
                    rows[tool].append((wall, pss))
                pair[tool] = wall
            if k >= 0:
                ratios.append(pair["parablock"] / pair["qemu-img"])
        res = {"case": "commit-chain", "pairs": args.pairs, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "workers": args.workers or default_workers(False)}
        for tool, vals in rows.items():
            res[tool] = {"median_s": statistics.median(w for w, _ in vals), "min_s": min(w for w, _ in vals),
                         "peak_pss_MiB": max(r for _, r in vals) / MiB}
        results.append(res)
        print(f"{'commit-chain':22s} parablock {res['parablock']['median_s']:.3f}s "
              f"({res['parablock']['peak_pss_MiB']:.0f} MiB)  qemu-img {res['qemu-img']['median_s']:.3f}s "
              f"({res['qemu-img']['peak_pss_MiB']:.0f} MiB)  ratio {res['ratio_median']:.2f} "
              f"(min {res['ratio_min']:.2f})", flush=True)
    if "compressed-raw-qcow2" in args.cases.split(","):
        # worker scaling on the CPU-bound case: 1 worker against 2, alternating
        src = imgs["c"]
        out = d / "scale.qcow2"
        walls: dict[int, list[float]] = {1: [], 2: []}
        for k in range(-1, args.pairs):
            for n in _order(k, (1, 2)):
                if out.exists():
                    out.unlink()
                os.sync()
                prefault(warm)
                wall, _ = run_measured([sys.executable, "-m", "engine", "convert", "--workers", str(n), "-c",
                                        "-f", "raw", "-O", "qcow2", str(src), str(out)], env)
                if k >= 0:
                    walls[n].append(wall)
        speedup = statistics.median(walls[1]) / statistics.median(walls[2])
        results.append({"case": "compressed-scaling", "workers_1_s": statistics.median(walls[1]),
                        "workers_2_s": statistics.median(walls[2]), "workers_1_min_s": min(walls[1]),
                        "workers_2_min_s": min(walls[2]), "speedup": speedup})
        print(f"{'compressed-scaling':22s} 1 worker {statistics.median(walls[1]):.3f}s  2 workers "
              f"{statistics.median(walls[2]):.3f}s  speedup {speedup:.2f}", flush=True)
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "convert.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
