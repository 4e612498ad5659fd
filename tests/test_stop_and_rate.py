"""A stop signal starts no new request, and `--max-rps` holds for the whole run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from support import TOKEN, cli_env, copy_mappings, run_cli, seed

from etl.delivery.load import RateLimiter, deliver, make_client
from etl.mapping.parse import load_mappings
from etl.model import BatchResult, Outgoing, Secret
from etl.receiver.faults import FaultPlan
from etl.receiver.server import RunningReceiver, start_receiver
from etl.run.options import Collaborators, RunOptions
from etl.run.pipeline import run
from etl.settings import DeliverySettings, EventIdentity
from etl.state.store import StateStore

ENDPOINT = "http://127.0.0.1:9/api/v1/s2s/event"  # MockTransport answers; nothing is dialled
OK = {"status": "ok"}


def outgoing(count: int) -> list[Outgoing]:
    return [
        Outgoing(key=f"k{n}", event_id=f"id-{n}", body=b'{"n":%d}' % n, ref=n) for n in range(count)
    ]


def config(**overrides: object) -> DeliverySettings:
    base = {"endpoint": ENDPOINT, "batch_size": 1, "concurrency": 1}
    return DeliverySettings(**{**base, **overrides})  # type: ignore[arg-type]


def test_stop_during_a_request_starts_no_further_request() -> None:
    """Stopped while batch 0 is in flight and batch 1 waits for its slot: batch 0 is
    reported, batch 1 never starts."""
    stop = threading.Event()
    seen: list[bytes] = []
    results: list[BatchResult] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        stop.set()  # the signal arrives while this request is in flight
        return httpx.Response(200, json=OK)

    settings = config()
    with make_client(settings, Secret(TOKEN), transport=httpx.MockTransport(handler)) as client:
        stats = deliver(
            outgoing(10), settings=settings, on_result=results.append, client=client, stop=stop
        )
    assert seen == [b'[{"n":0}]']
    assert [[o.ref for o in r.acked] for r in results] == [[0]]
    assert stats.batches == 1


def test_stop_during_a_backoff_makes_no_further_attempt() -> None:
    """A batch backing off from a 503 when the stop comes is given up, not retried;
    it is not reported (the next run sends it)."""
    stop = threading.Event()
    seen: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        stop.set()
        return httpx.Response(503)

    settings = config(max_attempts=5)
    with make_client(settings, Secret(TOKEN), transport=httpx.MockTransport(handler)) as client:
        stats = deliver(
            outgoing(3),
            settings=settings,
            on_result=lambda r: pytest.fail(f"reported {r}"),
            client=client,
            stop=stop,
            sleep=lambda _s: None,
        )
    assert len(seen) == 1
    assert stats.batches == 0


class FakeTime:
    """A clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds


def test_one_rate_limiter_spaces_requests_across_deliveries() -> None:
    """Two deliver() calls sharing a limiter at 4/s: every start, the second call's first
    included, is 0.25 s after the one before."""
    time_ = FakeTime()
    starts: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        starts.append(time_.clock())
        return httpx.Response(200, json=OK)

    limiter = RateLimiter(4.0, clock=time_.clock, sleep=time_.sleep)
    settings = config(max_rps=4.0)
    with make_client(settings, Secret(TOKEN), transport=httpx.MockTransport(handler)) as client:
        for _ in range(2):
            deliver(
                outgoing(3),
                settings=settings,
                on_result=lambda _r: None,
                client=client,
                sleep=time_.sleep,
                clock=time_.clock,
                limiter=limiter,
            )
    assert starts == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def test_max_rps_is_counted_over_the_whole_run(tmp_path: Path, receiver: RunningReceiver) -> None:
    """A run of two streams at 2 requests/s: its 7 requests span exactly 3 s of the run's
    limiter clock (a limiter per stream would let the second stream start at once)."""
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    seed(source_url, n_workspaces=3, n_users=10)
    copy_mappings(tmp_path / "mappings")
    time_ = FakeTime()
    settings = DeliverySettings(
        endpoint=receiver.url,
        batch_size=2,
        concurrency=1,
        max_rps=2.0,
    )
    source = sa.create_engine(source_url)
    state = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        with make_client(settings, Secret(TOKEN)) as client:
            io = Collaborators(
                source=source,
                state=state,
                identity=EventIdentity(api_key="k", workspace_key="w"),
                delivery=settings,
                client=client,
                pace=RateLimiter(2.0, clock=time_.clock, sleep=time_.sleep),
            )
            run(load_mappings(tmp_path / "mappings"), command="sync", options=RunOptions(), io=io)
    finally:
        source.dispose()
        state.close()
    assert len(receiver.requests()) == 2 + 5
    assert time_.now == pytest.approx(6 * 0.5)


@pytest.fixture
def slow_receiver(tmp_path: Path) -> Iterator[RunningReceiver]:
    """The real receiver, answering each request after 400 ms."""
    plan = FaultPlan.from_json('{"latency_ms": [400, 400]}')
    with start_receiver(store=tmp_path / "received.db", tokens={TOKEN}, faults=plan) as rx:
        yield rx


def test_sigterm_with_requests_queued_starts_no_new_request(
    tmp_path: Path, slow_receiver: RunningReceiver
) -> None:
    """SIGTERM while a request is in flight and the next batch waits for the slot: only the
    in-flight request completes, the run exits 1, and the next run delivers the rest."""
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    seed(source_url, n_workspaces=3, n_users=20)
    copy_mappings(tmp_path / "mappings")
    env = {**os.environ, **cli_env(tmp_path, source_url, slow_receiver.url)}
    args = ["sync", "--batch-size", "2", "--concurrency", "1"]
    child = subprocess.Popen(
        [sys.executable, "-m", "etl", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while len(slow_receiver.requests()) < 3:  # into the users stream, requests queued
            assert child.poll() is None, child.communicate()
            time.sleep(0.02)
        answered = len(slow_receiver.requests())
        child.send_signal(signal.SIGTERM)
        _, stderr = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    print(
        f"exit {child.returncode}; answered at SIGTERM {answered}, in all "
        f"{len(slow_receiver.requests())}; {stderr.strip().splitlines()[-1]}"
    )
    assert child.returncode == 1
    assert "stopped by a signal" in stderr
    assert "Traceback" not in stderr
    # the one request in flight at the signal (concurrency 1) finished; none started after
    assert len(slow_receiver.requests()) <= answered + 1
    again = run_cli(args, cli_env(tmp_path, source_url, slow_receiver.url))
    assert again.exit_code == 0, again.stderr
    counts = Counter(e["event_id"] for e in slow_receiver.events())
    assert len(counts) == 3 + 20
    assert sum(counts.values()) - len(counts) <= 1  # at most the batch in flight
