"""Client instructions per pool cycle, counted by valgrind: what each pool adds, without noise.

    python bench/instructions.py [--backend fake|pg|mysql|all] [--cycles 1000]

Wall-clock ratios on a shared two-core machine swing from run to run; the number of
instructions the client process executes per cycle does not. For each contender of
``bench/pools.py`` named below, a child process runs the same cycle (checkout, cursor,
``execute("SELECT 1")``, ``fetchone``, close cursor, return; one thread) under
``valgrind --tool=callgrind`` twice, with 200 and with 200 + ``--cycles`` cycles; the
difference over ``--cycles`` is the count per cycle, start-up and imports cancelled out.
The count covers the client process in user space (Python, the driver, libpq); not the
kernel, not the server. Servers as in ``bench/pools.py`` (``FORKSAFE_BENCH_PG``,
``FORKSAFE_BENCH_MYSQL``). Prints a table, then one line ``JSON {...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONTENDERS = ("raw", "forksafe PooledDB", "DBUtils PooledDB", "SQLAlchemy QueuePool")
BASE_CYCLES = 200


def load_pools() -> Any:
    """bench/pools.py as a module (this directory is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_pools", HERE / "pools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def child(backend_name: str, contender: str, cycles: int) -> None:
    """Run ``cycles`` cycles of ``contender`` (after three to connect and warm up)."""
    pools = load_pools()
    maker = {"fake": pools.fake_backend, "pg": pools.pg_backend, "mysql": pools.mysql_backend}
    backend = maker[backend_name]()
    rows, _ = pools.contenders(backend_name)
    (row,) = [c for c in rows if c.name == contender]
    tag = f"fsbench_instr_{os.getpid()}"
    drv = pools.Driver(backend.drivers[row.driver], backend.on_connect(tag))
    cycle, teardown = row.factory(drv, backend.connect_kwargs(row.driver, tag), 1)
    try:
        for _ in range(3 + cycles):
            cycle()
    finally:
        teardown()
        backend.close()


def collected(backend: str, contender: str, cycles: int) -> int:
    """Instructions valgrind counted for a child running ``cycles`` cycles."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        backend,
        contender,
        str(cycles),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"{backend}/{contender}: valgrind run failed:\n{tail}")
    return int(found.group(1))


def per_cycle(backend: str, contender: str, cycles: int) -> float:
    base = collected(backend, contender, BASE_CYCLES)
    more = collected(backend, contender, BASE_CYCLES + cycles)
    return (more - base) / cycles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("fake", "pg", "mysql", "all"), default="all")
    parser.add_argument("--cycles", type=int, default=1000, help="cycles counted (default 1000)")
    parser.add_argument("--child", nargs=3, metavar=("BACKEND", "CONTENDER", "CYCLES"))
    args = parser.parse_args(argv)
    if args.child:
        backend, contender, cycles = args.child
        child(backend, contender, int(cycles))
        return 0
    if args.cycles < 1:
        parser.error(f"--cycles must be at least 1, not {args.cycles}")
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    names = ["fake", "pg", "mysql"] if args.backend == "all" else [args.backend]
    # The fake driver has no raw row in bench/pools.py's sense worth counting: its cycle is
    # the pool alone.
    jobs = [(b, c) for b in names for c in CONTENDERS if not (b == "fake" and c == "raw")]
    counts: dict[tuple[str, str], float | str] = {}
    # Imported here: run as a script, this directory comes first on sys.path, and
    # bench/queue.py would shadow the standard library's queue module it needs.
    if os.path.abspath(sys.path[0]) == str(HERE):
        sys.path.pop(0)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as workers:
        futures = {job: workers.submit(per_cycle, *job, args.cycles) for job in jobs}
        for job, future in futures.items():
            try:
                counts[job] = future.result()
            except Exception as exc:  # an unreachable server skips its rows
                counts[job] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    print(f"client instructions per cycle (callgrind; {args.cycles} cycles counted)")
    print(
        f"{'backend':8s} {'contender':22s} {'per cycle':>12s} {'added to raw':>13s}"
        f" {'x DBUtils':>10s}"
    )
    print("(fake: no raw row; a cycle is the pool's own work and is compared as a whole)")
    rows = []
    for backend, contender in jobs:
        value = counts[(backend, contender)]
        if isinstance(value, str):
            print(f"{backend:8s} {contender:22s} {'error':>12s}  {value}")
            rows.append({"backend": backend, "contender": contender, "error": value})
            continue
        raw = counts.get((backend, "raw"), 0.0)
        dbutils = counts.get((backend, "DBUtils PooledDB"))
        floor = raw if isinstance(raw, float) else 0.0
        added = value - floor if floor and contender != "raw" else None
        share = (
            (value - floor) / (dbutils - floor)
            if isinstance(dbutils, float) and contender != "raw"
            else None
        )
        print(
            f"{backend:8s} {contender:22s} {value:12,.0f}"
            + (f" {added:+13,.0f}" if added is not None else f" {'':13s}")
            + (f" {share:9.2f}x" if share is not None else "")
        )
        rows.append(
            {"backend": backend, "contender": contender, "per_cycle": value, "vs_dbutils": share}
        )
    print("JSON " + json.dumps({"cycles": args.cycles, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
