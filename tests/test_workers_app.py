"""App, tasks and result handles: submitting, options, outcomes, errors."""

from __future__ import annotations

import datetime as dt
import gc
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workers_harness import burst, load_tasks, queue_rows, queue_url, write_tasks

import workers
from workers import App, AsyncResult, states
from workers.app import TaskOptions
from workers.errors import (
    BrokerURLError,
    InvalidOptionError,
    JobExpired,
    JobRevoked,
    ResultTimeout,
    SerializationError,
    TaskError,
    TaskRegistrationError,
)

TASKS = """
import datetime

class Unbuildable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")

@app.task
def add(x, y):
    return x + y

@app.task(name="shout", queue="loud", priority=3)
def shout(text, *, suffix="!"):
    return text.upper() + suffix

@app.task
def fail(message):
    raise KeyError(message)

@app.task
def fail_oddly():
    raise Unbuildable(1, 2)

@app.task
def exits(message):
    import sys
    sys.exit(message)

@app.task
def returns_date():
    return datetime.date(2020, 1, 1)

@app.task(max_retries=2, retry_backoff=0.05)
def flaky(path):
    import os
    count = len(open(path).read()) if os.path.exists(path) else 0
    open(path, "a").write("x")
    if count < 2:
        raise ConnectionError(f"attempt {count + 1}")
    return count + 1
"""


@pytest.fixture
def tasks(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_tasks(write_tasks(tmp_path, TASKS))


pytest_plugins = ["test_workers_harness"]  # the any_broker fixture
pytestmark = pytest.mark.usefixtures("any_broker")  # every test, on every broker


def db_rows(tmp_path: Path, sql: str) -> list[tuple[object, ...]]:
    return queue_rows(tmp_path, sql)


def test_plain_call_runs_inline(tasks) -> None:  # type: ignore[no-untyped-def]
    assert tasks.add(2, 3) == 5
    assert tasks.shout("hi", suffix="?") == "HI?"


def test_delay_returns_a_pending_handle_and_get_times_out_clearly(tasks) -> None:  # type: ignore[no-untyped-def]
    result = tasks.add.delay(2, 3)
    assert result.state == states.PENDING
    assert not result.ready()
    with pytest.raises(ResultTimeout, match=f"job {result.id} is still PENDING after 0.05 s"):
        result.get(timeout=0.05)


def test_job_id_makes_submission_idempotent(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    first = tasks.add.apply_async((2, 3), job_id="k1")
    second = tasks.add.apply_async((20, 30), job_id="k1")
    assert first.id == second.id == "k1"
    assert db_rows(tmp_path, "SELECT payload FROM forksafe_jobs") == [
        (b'{"args":[2,3],"kwargs":{}}',)
    ]


def test_apply_async_options_are_stored(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    before = time.time()
    tasks.add.apply_async((2, 3), countdown=5, expires=60, priority=5, queue="fast", job_id="o")
    tasks.shout.delay("x")
    record = tasks.app.broker.fetch("o")
    queue, state, priority, eta, expires = (
        record.queue,
        record.state,
        record.priority,
        record.eta,
        record.expires_at,
    )
    assert (queue, state, priority) == ("fast", states.SCHEDULED, 5)
    assert before + 5 <= eta <= time.time() + 5
    assert before + 60 <= expires <= time.time() + 60
    assert db_rows(tmp_path, "SELECT queue, priority FROM forksafe_jobs WHERE task='shout'") == [
        ("loud", 3)
    ]


def test_eta_and_expires_accept_datetimes(tasks) -> None:  # type: ignore[no-untyped-def]
    eta = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    expires = eta + dt.timedelta(seconds=60)
    tasks.add.apply_async((1, 2), eta=eta, expires=expires, job_id="dated")
    record = tasks.app.broker.fetch("dated")
    assert record.state == states.SCHEDULED
    assert abs(record.eta - eta.timestamp()) < 0.01
    assert abs(record.expires_at - expires.timestamp()) < 0.01


def test_map_submits_every_call_in_one_transaction(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = tasks.add.starmap([(i, i) for i in range(100)])
    assert len({r.id for r in results}) == 100
    with pytest.raises(SerializationError):
        tasks.add.map([1, 2, object()])  # one bad call submits nothing
    assert db_rows(tmp_path, "SELECT count(*) FROM forksafe_jobs") == [(100,)]


def test_submission_options_and_arguments_of_the_wrong_kind_are_refused_naming_them(tasks) -> None:  # type: ignore[no-untyped-def]
    for options, message in [
        ({"countdown": "soon"}, "countdown='soon' must be a number: seconds"),
        ({"countdown": float("nan")}, "countdown=nan must be a number"),
        ({"eta": "tomorrow"}, "eta='tomorrow' must be a number: a datetime or a Unix time"),
        ({"expires": [60]}, "expires=[60] must be a number"),
        ({"priority": "high"}, "priority='high' must be a whole number"),
        ({"priority": 2.5}, "priority=2.5 must be a whole number"),
    ]:
        with pytest.raises(InvalidOptionError) as caught:
            tasks.add.apply_async((1, 2), **options)
        assert message in str(caught.value)
    for args, kwargs, message in [
        ("12", None, "args='12' must be a list or tuple of positional arguments, not str"),
        (b"12", None, "args=b'12' must be a list or tuple"),
        (12, None, "args=12 must be a list or tuple"),
        ({1, 2}, None, "args={1, 2} must be a list or tuple"),
        ((1,), [("y", 2)], "kwargs=[('y', 2)] must be a mapping"),
    ]:
        with pytest.raises(InvalidOptionError) as caught:
            tasks.add.apply_async(args, kwargs)
        assert message in str(caught.value)
    with pytest.raises(InvalidOptionError, match="args='12' must be"):
        tasks.app.send("add", "12")
    assert tasks.app.broker.jobs(None, 10) == []  # nothing was submitted
    fine = tasks.add.apply_async([1], {"y": 2}, countdown="5", priority="3", job_id="fine")
    assert fine.state == states.SCHEDULED and tasks.app.broker.fetch("fine").priority == 3


def test_unserialisable_argument_is_refused_naming_the_argument_and_the_fix(tasks) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SerializationError) as caught:
        tasks.add.delay(1, dt.datetime(2020, 1, 1))
    message = str(caught.value)
    assert "argument 1 (y)" in message
    assert "datetime" in message
    assert "isoformat" in message and "serializer='pickle'" in message
    with pytest.raises(SerializationError, match="keyword argument 'suffix'"):
        tasks.shout.delay("x", suffix={1, 2})


def test_results_exceptions_and_retries_come_back_from_a_worker(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ok = tasks.add.delay(2, 3)
    failed = tasks.fail.delay("missing")
    odd = tasks.fail_oddly.delay()
    bad_result = tasks.returns_date.delay()
    flaky = tasks.flaky.delay(str(tmp_path / "attempts"))
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "2")

    assert ok.get(timeout=5) == 5 and ok.successful() and ok.state == states.SUCCESS

    assert failed.failed() and failed.ready()
    with pytest.raises(KeyError, match="missing") as caught:
        failed.get(timeout=5)
    assert "raise KeyError(message)" in caught.value.remote_traceback  # type: ignore[attr-defined]
    assert "raise KeyError(message)" in (failed.traceback or "")
    assert isinstance(failed.get(propagate=False), KeyError)

    with pytest.raises(TaskError, match="Unbuildable: 1/2") as wrapped:
        odd.get(timeout=5)
    assert wrapped.value.exc_type == "tasks.Unbuildable"
    assert "raise Unbuildable(1, 2)" in (wrapped.value.remote_traceback or "")

    with pytest.raises(SerializationError, match="returned a date"):
        bad_result.get(timeout=5)

    assert flaky.get(timeout=5) == 3
    assert (tmp_path / "attempts").read_text() == "xxx"


@pytest.mark.timeout(60)
def test_a_task_that_exits_fails_with_a_task_error_not_system_exit(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    exited = tasks.exits.delay("negative input")
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    assert exited.failed()
    with pytest.raises(TaskError, match="SystemExit: negative input") as caught:
        exited.get(timeout=5)  # SystemExit here would end the calling program
    assert caught.value.exc_type == "SystemExit"
    assert "sys.exit(message)" in (caught.value.remote_traceback or "")
    returned = exited.get(propagate=False)
    assert isinstance(returned, TaskError) and isinstance(exited.result, TaskError)


def test_waiting_for_many_results_in_turn_reads_them_in_batches(  # type: ignore[no-untyped-def]
    tasks, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Handles that stay unfinished, made first: they must not crowd out the others.
    unserved = [tasks.add.apply_async((0, 0), queue="nobody") for _ in range(40)]
    results = [tasks.add.delay(i, i) for i in range(100)]
    dropped = tasks.add.apply_async((0, 0), queue="nobody")
    dropped_id = dropped.id
    del dropped
    gc.collect()
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "2")

    broker = tasks.app.broker
    read = broker.fetch_finished
    asked: list[list[str]] = []

    def counting(job_id: str, others: list[str]) -> list[object]:
        asked.append(list(others))
        return read(job_id, others)

    monkeypatch.setattr(broker, "fetch_finished", counting)
    assert [r.get(timeout=5) for r in results] == [2 * i for i in range(100)]
    assert 1 <= len(asked) <= 8, [len(others) for others in asked]  # not one per result
    reads = len(asked)
    assert all(r.state == states.SUCCESS for r in results)
    assert len(asked) == reads  # final states are kept: no more reads

    # One handle polled while the others stay unfinished asks after fewer and fewer.
    for _ in range(6):
        assert unserved[0].state == states.PENDING
    sizes = [len(others) for others in asked[reads:]]
    assert sizes[-1] < sizes[0] and sizes == sorted(sizes, reverse=True), sizes
    assert not any(dropped_id in others for others in asked)  # dropped handles drop out


def test_a_child_forked_while_a_thread_makes_result_handles_can_make_them(  # type: ignore[no-untyped-def]
    tasks,
) -> None:
    from forking import fork_child

    from workers.result import _unfinished_of

    held = _unfinished_of(tasks.app)._lock
    with held:  # as if another thread were making a handle at the fork
        answer = fork_child(lambda: AsyncResult("made-in-child", app=tasks.app).id, timeout=10)
    assert answer == "made-in-child"


def test_async_result_is_rebuilt_from_an_id_in_another_process(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = tasks.add.delay(20, 22)
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    code = (
        "from workers import App, AsyncResult\n"
        f"app = App({queue_url(tmp_path)!r})\n"
        f"r = AsyncResult({job.id!r}, app=app)\n"
        "print(r.state, r.get(timeout=5), r.worker.split(':')[1].isdigit())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["SUCCESS", "42", "True"]


def test_revoked_job_never_runs(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = tasks.fail.delay("should not run")
    assert job.revoke()
    assert not job.revoke()  # already final
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    assert job.state == states.REVOKED
    with pytest.raises(JobRevoked, match=job.id):
        job.get(timeout=1)


def test_expired_job_never_runs(tasks, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    job = tasks.fail.apply_async(("late",), expires=0.001)
    time.sleep(0.01)  # let the expiry time pass (it is the point of the test)
    burst(tmp_path, tmp_path / "tasks.py", "--workers", "1")
    tasks.app.broker.sweep(10, time.time())
    assert job.state == states.EXPIRED
    with pytest.raises(JobExpired):
        job.get(timeout=1)


def test_submit_many_mixes_tasks_and_options(tasks) -> None:  # type: ignore[no-untyped-def]
    results = tasks.app.submit_many(
        [tasks.add.s(1, 2), tasks.shout.s("a").with_options(priority=9, job_id="s1")]
    )
    assert [r.id for r in results][1] == "s1"
    record = tasks.app.broker.fetch("s1")
    assert record is not None and record.priority == 9 and record.queue == "loud"


def test_unknown_broker_scheme_suggests_the_fix_and_masks_the_password() -> None:
    with pytest.raises(BrokerURLError) as caught:
        App("sqlte:///x.db")
    assert "did you mean 'sqlite'" in str(caught.value)
    with pytest.raises(BrokerURLError) as caught:
        App("postgress://bob:s3cret@db/app")
    assert "s3cret" not in str(caught.value) and "bob:***@db" in str(caught.value)
    with pytest.raises(BrokerURLError, match="in-memory"):
        App("sqlite:///:memory:").broker  # noqa: B018


def test_task_options_are_checked_when_declared(tmp_path: Path) -> None:
    app = App(f"sqlite:///{tmp_path / 'q.db'}")
    with pytest.raises(TaskRegistrationError, match="soft_time_limit=5 must be below"):
        app.task(time_limit=5, soft_time_limit=5)(lambda: None)

    @app.task(name="same")
    def one() -> None: ...

    with pytest.raises(TaskRegistrationError, match="two tasks are named 'same'"):

        @app.task(name="same")
        def two() -> None: ...


def test_lease_seconds_is_checked_and_sets_the_heartbeat_interval(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    assert App(url).heartbeat_interval == 15  # workers beat every second anyway
    assert App(url, lease_seconds=0.5).heartbeat_interval == 0.125
    for bad in (0, -1, 0.1, "soon", None, float("nan")):
        with pytest.raises(InvalidOptionError, match=f"lease_seconds={bad!r} must be"):
            App(url, lease_seconds=bad)  # type: ignore[arg-type]
    app = App(url)
    with pytest.raises(InvalidOptionError, match="lease_seconds=0 must be"):
        app.lease_seconds = 0
    assert app.lease_seconds == 60


def test_retry_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    options = TaskOptions(retry_backoff=True, retry_backoff_max=10)
    for retries, full in [(0, 1), (1, 2), (2, 4), (3, 8), (4, 10), (9, 10)]:
        delays = {options.retry_delay(retries) for _ in range(20)}
        assert all(full / 2 <= d <= full for d in delays)
        assert len(delays) > 1  # jitter
    assert TaskOptions(retry_backoff=False).retry_delay(3) == 0
    assert TaskOptions(retry_backoff=0.5, retry_jitter=False).retry_delay(2) == 2.0


def test_pickle_serializer_carries_what_json_cannot(tmp_path: Path) -> None:
    path = write_tasks(
        tmp_path,
        """
app = App(app.broker_url, serializer="pickle")

@app.task
def call(func, value):
    return func(value)
""",
    )
    # Submitted from a script: dill carries a lambda of __main__ by value.
    code = (
        "from workers.loader import load_app\n"
        f"app, tasks = load_app({str(path)!r})\n"
        "print(tasks.call.delay(lambda v: {v, v + 1}, 1).id)\n"
    )
    submitted = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    burst(tmp_path, path, "--workers", "1")
    tasks = load_tasks(path)
    assert tasks.app.AsyncResult(submitted.stdout.strip()).get(timeout=5) == {1, 2}


def test_package_exports_states_and_errors() -> None:
    assert workers.SUCCESS == "SUCCESS" and workers.states.ALL_STATES[0] == "PENDING"
    assert issubclass(workers.SerializationError, workers.WorkersError)
    assert AsyncResult is workers.AsyncResult
