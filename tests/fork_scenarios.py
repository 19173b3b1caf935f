"""Fork scenarios run in a fresh interpreter, so children can really ``sys.exit()``.

``sys.exit()`` in a child forked inside pytest would unwind into pytest itself; here
the child unwinds to the top of this script and the interpreter shuts down for real,
running every finaliser, which is exactly what kills sessions with other pools.

Usage: ``python fork_scenarios.py SCENARIO DRIVER KWARGS_JSON`` prints one JSON object.
"""

from __future__ import annotations

import gc
import importlib
import json
import sys
import time
import uuid
from typing import Any

from forking import fork_child

import forksafe
from forksafe import PersistentDB, PooledDB

SESSION_SQL = {
    "psycopg2": "SELECT pg_backend_pid(), %s",
    "psycopg": "SELECT pg_backend_pid(), %s",
    "pymysql": "SELECT CONNECTION_ID(), %s",
}


ALIVE_SQL = {
    "psycopg2": "SELECT pid FROM pg_stat_activity WHERE pid IN ({ids})",
    "psycopg": "SELECT pid FROM pg_stat_activity WHERE pid IN ({ids})",
    "pymysql": "SELECT id FROM information_schema.processlist WHERE id IN ({ids})",
}


def alive(
    module: Any, driver: str, kwargs: dict[str, Any], sessions: list[int], wait: float = 0.0
) -> list[int]:
    """Which of these sessions the server still has, asked on a connection of its own.

    The server notices a closed socket asynchronously: with ``wait``, poll up to that
    many seconds for the sessions to be gone.
    """
    if not sessions:
        return []
    deadline = time.monotonic() + wait
    con = module.connect(**kwargs)
    try:
        while True:
            cur = con.cursor()
            cur.execute(ALIVE_SQL[driver].format(ids=",".join(str(int(s)) for s in sessions)))
            found = sorted(int(row[0]) for row in cur.fetchall())
            cur.close()
            con.rollback()
            if not found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)
    finally:
        con.close()


def report(
    module: Any,
    driver: str,
    kwargs: dict[str, Any],
    parent: list[int],
    after: list[int],
    children: list[int],
    **extra: Any,
) -> dict[str, Any]:
    """The scenario's answer, with the server's view taken while the parent still lives."""
    return {
        "parent": parent,
        "after": after,
        "children": children,
        "children_alive": alive(module, driver, kwargs, children, wait=10.0),
        "parent_alive": alive(module, driver, kwargs, parent),
        **extra,
    }


def ask(con: Any, driver: str) -> int:
    """Run one query with a fresh token; return the server's session id for it."""
    token = uuid.uuid4().hex
    cur = con.cursor()
    cur.execute(SESSION_SQL[driver], (token,))
    session, echoed = cur.fetchone()
    cur.close()
    if echoed != token:
        raise AssertionError(f"sent token {token}, got {echoed}: another process's answer")
    return int(session)


def use_pool(pool: Any, driver: str, n: int = 2) -> list[int]:
    """Check out ``n`` connections at once, query each, return them; their session ids."""
    cons = [pool.connection() for _ in range(n)]
    try:
        return sorted(ask(con, driver) for con in cons)
    finally:
        for con in cons:
            con.close()


def matrix(module: Any, driver: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    """4 children that use the pool or not (``use``/``idle``), then exit by ``how``."""
    use, how = mode.split("+")
    pool = PooledDB(module, 2, **kwargs)
    parent = use_pool(pool, driver)
    children: list[int] = []
    for _ in range(4):
        children += fork_child(
            lambda: use_pool(pool, driver) if use == "use" else [], exit_with=how
        )
    after = use_pool(pool, driver)
    return report(
        module, driver, kwargs, parent, after, children, reconnects=pool.stats()["reconnects"]
    )


def del_pool(module: Any, driver: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    """The child deletes the pool, collects garbage and exits through sys.exit()."""
    holder = {"pool": PooledDB(module, 2, **kwargs)}
    parent = use_pool(holder["pool"], driver)

    def child() -> list[int]:
        del holder["pool"]
        gc.collect()
        return []

    fork_child(child, exit_with="sys.exit")
    return report(module, driver, kwargs, parent, use_pool(holder["pool"], driver), [])


def grandchild(module: Any, driver: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    """A child uses the pool, forks a grandchild that uses it, then uses it again."""
    pool = PooledDB(module, 1, **kwargs)
    parent = use_pool(pool, driver, 1)

    def child() -> dict[str, list[int]]:
        mine = use_pool(pool, driver, 1)
        grand = fork_child(lambda: use_pool(pool, driver, 1), exit_with="sys.exit")
        return {"mine": mine, "grand": grand, "mine_after": use_pool(pool, driver, 1)}

    seen = fork_child(child, exit_with="sys.exit")
    after = use_pool(pool, driver, 1)
    children = seen["mine"] + seen["grand"]
    kept = seen["mine_after"] == seen["mine"]
    return report(module, driver, kwargs, parent, after, children, child_kept_its_session=kept)


def checked_out(module: Any, driver: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    """Fork with a connection checked out and a transaction open in it."""
    pool = PooledDB(module, **kwargs)
    con = pool.connection()
    con.begin()
    parent = [ask(con, driver)]

    def child() -> dict[str, Any]:
        try:
            con.cursor()
        except forksafe.ForkedConnectionError as error:
            message = str(error)
        else:
            message = ""
        con.close()  # inert here: no rollback, no goodbye on the parent's socket
        return {"message": message, "own": use_pool(pool, driver, 1)}

    seen = fork_child(child, exit_with="sys.exit")
    after = [ask(con, driver)]
    con.commit()
    con.close()
    return report(module, driver, kwargs, parent, after, seen["own"], error=seen["message"])


def persistent(module: Any, driver: str, kwargs: dict[str, Any], mode: str) -> dict[str, Any]:
    """PersistentDB: the forking thread's connection must not follow it into children."""
    persist = PersistentDB(module, **kwargs)
    parent = [ask(persist.connection(), driver)]
    children = [
        fork_child(lambda: ask(persist.connection(), driver), exit_with=how)
        for how in ("sys.exit", "os._exit")
    ]
    after = [ask(persist.connection(), driver)]
    return report(module, driver, kwargs, parent, after, children)


SCENARIOS = {f.__name__: f for f in (matrix, del_pool, grandchild, checked_out, persistent)}


def main(argv: list[str]) -> None:
    scenario, driver, kwargs_json = argv[1], argv[2], argv[3]
    mode = argv[4] if len(argv) > 4 else ""
    module = importlib.import_module(driver)
    result = SCENARIOS[scenario](module, driver, json.loads(kwargs_json), mode)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv)
