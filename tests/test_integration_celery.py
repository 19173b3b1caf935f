"""The real Celery worker, prefork pool, with a task on a module-level forksafe pool.

The broker is Celery's filesystem transport and results go to its file backend, so nothing
but the database server is needed. The tasks module runs a query at import, in the worker's
main process, before the pool processes are forked.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from test_integration_support import running, server_sessions, sessions_left, wait_until

pytestmark = pytest.mark.timeout(180)

TASKS_MODULE = textwrap.dedent(
    """
    import importlib
    import json
    import os
    import time
    from pathlib import Path

    from celery import Celery

    import forksafe.integrations.celery  # noqa: F401
    from forksafe import PooledDB

    driver = importlib.import_module(os.environ["FS_DRIVER"])
    pool = PooledDB(driver, maxconnections=2, **json.loads(os.environ["FS_KWARGS"]))


    def session_id():
        with pool.connection() as db:
            cursor = db.cursor()
            cursor.execute(os.environ["FS_SESSION_SQL"])
            session = cursor.fetchone()[0]
            db.commit()
        return int(session)


    PARENT = {"pid": os.getpid(), "session": session_id()}
    Path(os.environ["FS_PARENT_FILE"]).write_text(json.dumps(PARENT))

    app = Celery("fs_celery_app")
    app.config_from_object(json.loads(os.environ["FS_CELERY_CONF"]))


    @app.task(name="fs.session")
    def session(token):
        from celery.signals import worker_process_init

        time.sleep(0.02)
        hooked = any(
            key[0] == "forksafe.integrations.celery" for key, _ in worker_process_init.receivers
        )
        return {"pid": os.getpid(), "session": session_id(), "token": token, "hooked": hooked}
    """
)


SESSION_SQL = {"postgres": "SELECT pg_backend_pid()", "mysql": "SELECT CONNECTION_ID()"}


def celery_conf(tmp_path: Path) -> dict[str, Any]:
    queue = tmp_path / "queue"
    (queue / "processed").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    return {
        "broker_url": "filesystem://",
        "broker_transport_options": {
            "data_folder_in": str(queue),
            "data_folder_out": str(queue),
            "processed_folder": str(queue / "processed"),
            "control_folder": str(tmp_path / "control"),  # default: ./control in the cwd
            "polling_interval": 0.05,
        },
        "result_backend": f"file://{tmp_path / 'results'}",
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
    }


@pytest.mark.parametrize("kind", ["postgres", "mysql"])
def test_celery_prefork_children_each_get_their_own_session_and_the_parent_keeps_its_own(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from celery import Celery
    from celery.exceptions import TimeoutError as ResultTimeout

    db = request.getfixturevalue(kind)
    before = server_sessions(db)
    (tmp_path / "fs_celery_app.py").write_text(TASKS_MODULE)
    conf = celery_conf(tmp_path)
    parent_file = tmp_path / "parent.json"
    env = {
        "PYTHONPATH": str(tmp_path),
        "FS_DRIVER": "psycopg2" if kind == "postgres" else "pymysql",
        "FS_KWARGS": json.dumps(db.kwargs),
        "FS_SESSION_SQL": SESSION_SQL[kind],
        "FS_PARENT_FILE": str(parent_file),
        "FS_CELERY_CONF": json.dumps(conf),
    }
    argv = [sys.executable, "-m", "celery", "-A", "fs_celery_app", "worker", "-P", "prefork"]
    argv += ["-c", "4", "-O", "fair", "--max-tasks-per-child", "10", "-l", "INFO"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    client = Celery("client")
    client.config_from_object(conf)
    # Queued before the worker starts: the filesystem transport writes a message file in
    # place, and a worker reading one being written sees it empty and stops.
    results = [client.send_task("fs.session", args=[f"t{n}"]) for n in range(80)]
    log = tmp_path / "celery.log"
    with running(argv, env, log, "", ready_path=None, cwd=tmp_path) as worker:
        written = lambda: parent_file.exists() and parent_file.stat().st_size > 0  # noqa: E731
        assert wait_until(written, 60), worker.log_tail()
        parent = json.loads(parent_file.read_text())
        try:
            answers = [r.get(timeout=90, interval=0.05) for r in results]
        except ResultTimeout as exc:  # say what the worker was doing
            raise AssertionError(f"{exc}; worker log:\n{worker.log_tail(80)}") from exc
        assert [a["token"] for a in answers] == [f"t{n}" for n in range(80)]
        assert all(a["hooked"] for a in answers)
        by_pid: dict[int, set[int]] = {}
        for a in answers:
            by_pid.setdefault(a["pid"], set()).add(a["session"])
        assert parent["pid"] not in by_pid
        # --max-tasks-per-child 10: at least 8 pool processes, each forked from the parent.
        assert len(by_pid) >= 8, by_pid
        assert all(len(s) == 1 for s in by_pid.values()), by_pid
        sessions = [next(iter(s)) for s in by_pid.values()]
        assert len(set(sessions)) == len(sessions), by_pid
        assert parent["session"] not in sessions
        assert parent["session"] in server_sessions(db), "the parent's session was killed"
    assert not sessions_left(db, before)


def test_celery_worker_process_init_runs_the_reset() -> None:
    from celery.signals import worker_process_init

    import forksafe.integrations.celery

    responses = worker_process_init.send(sender=None)
    assert (forksafe.integrations.celery.reset_worker_process, None) in responses
