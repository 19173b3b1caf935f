"""Submit a batch of example jobs, drain them with two forked workers, show the results.

    python examples/quickstart.py

Finishes by itself in a few seconds: it queues 24 jobs from examples/tasks.py in a
SQLite queue in a temporary directory, runs ``forksafe run examples/tasks.py
--burst --workers 2`` (which exits once the queue is empty), shows progress while
it works, then prints each job's result and the pid of the worker that ran it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="forksafe-quickstart-"))
    os.environ["FORKSAFE_BROKER"] = f"sqlite:///{workdir / 'queue.db'}"
    os.environ["FORKSAFE_EXAMPLE_DB"] = str(workdir / "examples.db")
    sys.path.insert(0, str(HERE))
    import tasks  # imported after the environment names the queue

    calls = (
        [tasks.add.s(i, i * 10) for i in range(6)]
        + [tasks.slow_square.s(i, 0.25) for i in range(8)]
        + [tasks.word_count.s(text) for text in ("fork safe pools", "one two", "a b c d")]
        + [tasks.record_visit.s(page) for page in ("/", "/about", "/", "/", "/about", "/", "/")]
    )
    results = tasks.app.submit_many(calls)
    print(f"queued {len(results)} jobs in {workdir / 'queue.db'}")

    command = [
        sys.executable,
        "-m",
        "workers.cli",
        "--log-level",
        "warning",
        "run",
        str(HERE / "tasks.py"),
        "--burst",
        "--workers",
        "2",
    ]
    print("running:", "forksafe run examples/tasks.py --burst --workers 2")
    worker = subprocess.Popen(command, cwd=workdir)
    deadline = time.monotonic() + 50
    while worker.poll() is None and time.monotonic() < deadline:
        done = sum(result.ready() for result in results)
        bar = "#" * (30 * done // len(results))
        print(f"\r  [{bar:<30}] {done}/{len(results)} done", end="", flush=True)
        time.sleep(0.2)
    if worker.poll() is None:
        worker.terminate()
        print("\nthe workers did not finish in time", file=sys.stderr)
        return 1
    print(f"\r  [{'#' * 30}] {len(results)}/{len(results)} done")

    print(f"\n{'task':<14} {'arguments':<22} {'state':<8} {'result':<26} worker pid")
    for call, result in zip(calls, results, strict=True):
        args = ", ".join(repr(a) for a in call.args)
        value = result.get(timeout=5, propagate=False)
        pid = (result.worker or "::").split(":")[1]
        name = call.task if isinstance(call.task, str) else call.task.name
        print(f"{name:<14} {args[:22]:<22} {result.state:<8} {str(value)[:26]:<26} {pid}")
    return 0 if worker.returncode == 0 and all(r.successful() for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
