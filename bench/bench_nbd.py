"""parablock daemon's NBD export vs qemu-storage-daemon's, side by side in the same run.

Both servers export the same qcow2 image (a copy each) over a unix socket, and the same clients drive
them, alternating: `qemu-img bench` over NBD for 4 KiB reads and writes at queue depth 16 (offsets spread
by a 1 MiB + 4 KiB step over the disk), `nbdcopy` for 1 MiB sequential reads, and `parablock stress` as
a client for truly random 4 KiB reads and writes (16 clients over 4 connections, verified).  It prints the medians,
the ratio parablock/qsd and the peak PSS of each server's process tree.  Results also go to
bench/results/nbd.json.

    python bench/bench_nbd.py                     # 1 GiB image, 3 rounds
    python bench/bench_nbd.py --size 256M --rounds 1 --count 5000
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def find_qsd() -> str | None:
    for p in (shutil.which("qemu-storage-daemon"), str(ROOT / ".cache/qsd/usr/bin/qemu-storage-daemon"),
              "/tmp/qsd/root/usr/bin/qemu-storage-daemon"):
        if p and os.access(p, os.X_OK):
            return p
    return None


def pss_tree(pid: int) -> int:
    total = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            with open(f"/proc/{p.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Server:
    def __init__(self, name: str, prog: list[str], work: Path, image: Path) -> None:
        self.name = name
        self.sock = work / f"{name}.nbd"
        self.qmp = work / f"{name}.qmp"
        for p in (self.sock, self.qmp):
            if p.exists():
                p.unlink()
        self.proc = subprocess.Popen(
            [*prog, "--chardev", f"socket,id=m,path={self.qmp},server=on,wait=off", "--monitor", "chardev=m",
             "--blockdev", f"driver=qcow2,node-name=disk,file.driver=file,file.filename={image}",
             "--nbd-server", f"addr.type=unix,addr.path={self.sock}",
             "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name} did not start: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            time.sleep(0.05)
        time.sleep(0.2)
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, pss_tree(self.proc.pid))
            time.sleep(0.1)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed: {r.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=20000, help="requests per qemu-img bench run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/parablock-bench-nbd")
    args = ap.parse_args()
    qsd = find_qsd()
    if qsd is None or not shutil.which("nbdcopy"):
        raise SystemExit("needs qemu-storage-daemon (tests/run.sh unpacks it into .cache/) and nbdcopy (libnbd-bin)")
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base.qcow2"
    if not base.exists():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), args.size], check=True)
        subprocess.run(["qemu-io", "-c", f"write -P 0x5a 0 {args.size}", str(base)], check=True,
                       capture_output=True)
    size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(base)], capture_output=True,
                                         text=True, check=True).stdout)["virtual-size"])
    step = str(MiB + 4096)
    tools = {"parablock": [sys.executable, "-m", "engine", "daemon", "--workers", str(args.workers)], "qsd": [qsd]}
    results: dict[str, dict[str, list[float]]] = {t: {"read4k": [], "write4k": [], "seq1m": [], "rand4k": []}
                                                  for t in tools}
    peaks = {t: 0 for t in tools}
    for _ in range(args.rounds):
        for name, prog in tools.items():
            img = work / f"{name}.qcow2"
            shutil.copyfile(base, img)
            srv = Server(name, prog, work, img)
            try:
                bench = ["qemu-img", "bench", "-f", "raw", "-c", str(args.count), "-d", "16", "-s", "4096",
                         "-S", step, srv.uri]
                results[name]["read4k"].append(args.count / timed(bench))
                results[name]["write4k"].append(args.count / timed([*bench[:2], "-w", *bench[2:]]))
                results[name]["seq1m"].append(size / MiB / timed(["nbdcopy", "--request-size=1048576", srv.uri,
                                                                   "null:"]))
                # truly random 4 KiB reads and writes, 16 clients (parablock stress as the client)
                st = subprocess.run([sys.executable, "-m", "engine", "stress", "--nbd", srv.uri, "-c",
                                     str(args.count), "-j", "16", "--connections", "4", "--size-min", "4096",
                                     "--size-max", "4096", "--align", "4096", "--mix", "read=50,write=50",
                                     "--output", "json"], capture_output=True, text=True,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
                if st.returncode != 0:
                    raise SystemExit(f"stress against {name} failed: {st.stderr}")
                results[name]["rand4k"].append(json.loads(st.stdout)["total"]["iops"])
            finally:
                srv.stop()
                peaks[name] = max(peaks[name], srv.peak)
    out = []
    for metric, unit in (("read4k", "IOPS"), ("write4k", "IOPS"), ("seq1m", "MiB/s"), ("rand4k", "IOPS")):
        a = statistics.median(results["parablock"][metric])
        b = statistics.median(results["qsd"][metric])
        out.append({"metric": metric, "unit": unit, "parablock": a, "qsd": b, "ratio": a / b})
        print(f"{metric:8s} parablock {a:10.0f} {unit:5s}  qsd {b:10.0f} {unit:5s}  ratio {a / b:.2f}")
    print(f"peak PSS  parablock {peaks['parablock'] / MiB:.0f} MiB  qsd {peaks['qsd'] / MiB:.0f} MiB")
    (ROOT / "bench/results").mkdir(exist_ok=True)
    (ROOT / "bench/results/nbd.json").write_text(json.dumps(
        {"size": size, "rounds": args.rounds, "count": args.count, "workers": args.workers, "metrics": out,
         "peak_pss_MiB": {k: v / MiB for k, v in peaks.items()}}, indent=2))


if __name__ == "__main__":
    main()
