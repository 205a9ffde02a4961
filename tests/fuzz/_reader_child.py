"""Child process for the qcow2 reader fuzz: reads one image path per stdin line, runs every read-only
operation on it in process and answers one JSON line per image.

It runs under ``RLIMIT_AS`` (the parent's argv[1] MiB above the address space it has after importing the
engine), so a huge allocation surfaces as a MemoryError, which we report as a bug.  The parent enforces
the per-image time limit by killing this process.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import sys
import traceback

MiB = 1 << 20
READ_CAP = 64 * MiB         # bytes of guest data read per image (seeds are a few MiB)
STATUS_STEPS = 20000        # block_status calls per image


def _vmsize() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def api_walk(path: str) -> dict:
    """open_image read-only, read the whole guest disk (capped) and walk block status over all of it."""
    from engine.block import block_status_above
    from engine.errors import BlockError
    from engine.image import open_image
    from workers.inproc import InProcessExecutor

    ex = InProcessExecutor()
    node = None
    try:
        node = open_image(path, ex, read_only=True)
        size = node.size()
        off = 0
        while off < min(size, READ_CAP):
            n = min(MiB, size - off)
            data = node.read(off, n)
            if len(data) != n:
                return {"bug": f"read({off}, {n}) returned {len(data)} bytes"}
            off += n
        off, steps = 0, 0
        while off < size and steps < STATUS_STEPS:
            _st, pnum = block_status_above(node, off, size - off)
            if pnum <= 0:
                return {"bug": f"block_status_above({off}) made no progress ({pnum})"}
            off += pnum
            steps += 1
        return {"ok": True}
    except (BlockError, OSError) as exc:  # OSError: what the CLI, too, reports as one clear line
        return {"error": f"{type(exc).__name__}: {exc}"}
    except MemoryError:
        return {"bug": "MemoryError (huge allocation)\n" + traceback.format_exc()}
    except Exception:  # noqa: BLE001 - any other exception is the bug this fuzz looks for
        return {"bug": traceback.format_exc()}
    finally:
        if node is not None:
            with contextlib.suppress(Exception):
                node.close()
        with contextlib.suppress(Exception):
            ex.close()


def cli(argv: list[str], results: tuple[int, ...] = (0,)) -> dict:
    """Run one CLI command; exit codes in ``results`` are answers (check: 2 corruptions, 3 leaks),
    any other must come with a ``parablock:`` line."""
    from engine.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    except MemoryError:
        return {"bug": "MemoryError escaped main()\n" + traceback.format_exc()}
    except BaseException:  # noqa: BLE001 - nothing may escape main()
        return {"bug": "exception escaped main()\n" + traceback.format_exc()}
    e = err.getvalue()
    res: dict = {"rc": rc, "err": e[-2000:]}
    if "Traceback" in e or "internal error" in e:
        res["bug"] = e[-4000:]
    elif rc not in results and not any(line.startswith("parablock: ") for line in e.splitlines()):
        res["bug"] = f"exit {rc} without a 'parablock:' line: {e[-2000:]!r}"
    return res


def run_all(path: str) -> dict:
    results = {"api": api_walk(path)}
    for name, argv, ok in (("info", ["info", "--output=json", path], (0,)),
                           ("map", ["map", "--output=json", path], (0,)),
                           ("check", ["check", "--output=json", path], (0, 2, 3))):
        results[name] = cli(argv, ok)
    return results


def main() -> None:
    import engine.cli.main
    import engine.formats  # noqa: F401
    import workers.inproc  # noqa: F401

    os.environ["PARABLOCK_DEBUG"] = "1"  # our own bugs escape main() with their traceback
    extra = int(sys.argv[1]) * MiB
    limit = _vmsize() + extra
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            res = run_all(path)
        except BaseException:  # noqa: BLE001 - report, keep serving
            res = {"child": {"bug": traceback.format_exc()}}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
